"""The largest intermediate a traced function builds, found in its jaxpr.

Used by tests that prove a sparse plan never materialises a T x S array: it
walks every equation, sub-jaxprs (scan, cond, pjit, custom_vjp) included.
"""

from __future__ import annotations

import math

import jax

from eval import matmul_flops


def _largest(jaxpr, best):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = getattr(var.aval, "shape", ())
      size = math.prod(shape)
      if size > best[0]:
        best = (size, tuple(shape), str(eqn.primitive))
    for sub in matmul_flops.sub_jaxprs(eqn.params):
      best = _largest(sub, best)
  return best


def largest_intermediate(fn, *args, **kwargs) -> tuple[int, tuple, str]:
  """(elements, shape, primitive) of the biggest array `fn` creates.

  Inputs are not counted, only values produced by equations.
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return _largest(closed.jaxpr, (0, (), ""))
