"""Stop requests: SIGTERM (and Ctrl-C) end the run after a checkpoint.

The loop saves the finished step and exits with status 128 + the signal
number (143 for SIGTERM, 130 for Ctrl-C), so a scheduler can tell a
preempted run from a finished one (status 0).
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Tells the loop when to save the finished step and exit.

  One process: a SIGTERM/SIGINT handler records the signal, which the loop
  reads after each step. Several processes: JAX's preemption service
  (started by jax.distributed) catches SIGTERM, and all processes stop at
  the same step through `reached_preemption_sync_point`.

  Attributes:
    signal: the signal that asked to stop (None: none yet).
  """

  def __init__(self):
    self.signal: int | None = None
    self.multi = jax.process_count() > 1
    self._previous = {}
    if not self.multi:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def should_stop(self, step: int) -> bool:
    if self.multi:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal = signal.SIGTERM
      except RuntimeError:  # the preemption service is disabled
        pass
    return self.signal is not None

  @property
  def exit_code(self) -> int:
    """128 + the signal number, the shell's status of a signalled job."""
    return 128 + int(self.signal)

  def restore(self) -> None:
    """Puts the previous signal handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
