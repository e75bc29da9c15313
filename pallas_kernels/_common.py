"""Small helpers shared by the kernels and the layout."""

from __future__ import annotations

import functools

import jax


def numpy_broadcasting(fn):
  """Runs `fn` with NumPy rank promotion, whatever the caller's setting.

  The library relies on NumPy broadcasting internally; callers who set
  `jax_numpy_rank_promotion="raise"` for their own code keep that setting
  outside our functions (custom-VJP rules are traced later, so they carry
  the decorator too).
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with jax.numpy_rank_promotion("allow"):
      return fn(*args, **kwargs)

  return wrapper
