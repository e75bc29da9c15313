"""Shared trace and compile counters for the no-retrace tests."""

from __future__ import annotations

import contextlib

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations inside the block.

  Yields:
    A list whose length is the number of compilations so far.
  """
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _COMPILE_EVENT:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)

