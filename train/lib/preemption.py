"""Stop requests: SIGTERM (and Ctrl-C) end the run after a checkpoint."""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Tells the loop when to save the finished step and exit.

  One process: a SIGTERM/SIGINT handler sets a flag that the loop reads
  after each step. Several processes: JAX's preemption service (started by
  jax.distributed) catches SIGTERM, and all processes stop at the same step
  through `reached_preemption_sync_point`.
  """

  def __init__(self):
    self.requested = False
    self.multi = jax.process_count() > 1
    self._previous = {}
    if not self.multi:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self.multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is disabled
        return False
    return self.requested

  def restore(self) -> None:
    """Puts the previous signal handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
