"""The loop every training script shares: resume, step, log, save, stop.

A script builds its state and one `step_fn(step) -> metrics` (which may switch
phases by step), then:

  loop = loop_lib.Loop(workdir, {"state": state}, total, ...)
  step = loop.run(step_fn)
  if step < total:  # stopped early (SIGTERM): the finished step is saved
    return {}

Resume: the latest checkpoint in `workdir`/checkpoints is restored into the
items when the loop is built. A checkpoint is written every
`checkpoint_every` steps, at every phase boundary and at the last step
reached, so no finished step is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from absl import logging
from flax import nnx
import jax
import numpy as np

from train.lib import checkpoint
from train.lib import preemption
from train.lib import report


class Loop:
  """Checkpointed, resumable, preemptible training loop.

  Attributes:
    start: the first step this run executes (0, or the restored step).
    resumed: whether a checkpoint was restored.
    writer: the metrics writer (also for the caller's eval metrics).
    last: the last flushed metrics (means over the logging interval).
  """

  def __init__(self, workdir: str, items: dict[str, nnx.Module], total: int,
               *, keep_checkpoints: int, log_every: int,
               checkpoint_every: int, boundaries: Iterable[int] = (),
               extra_metrics: Callable[[int], dict[str, float]] | None = None,
               after_step: Callable[[int], None] | None = None):
    """Builds the checkpoint manager and restores the latest checkpoint.

    Args:
      workdir: checkpoints, metrics.jsonl.
      items: the named modules a checkpoint holds.
      total: the number of steps of the whole run.
      keep_checkpoints: how many checkpoints orbax keeps.
      log_every: metrics are averaged and written every this many steps.
      checkpoint_every: checkpoint period in steps.
      boundaries: steps (phase ends) that are always logged and saved.
      extra_metrics: step -> scalars added to each flush (e.g. the lr).
      after_step: called with the number of finished steps after each step
        (e.g. a periodic evaluation).
    """
    self.items = items
    self.total = total
    self.log_every = log_every
    self.checkpoint_every = checkpoint_every
    self.boundaries = frozenset(int(b) for b in boundaries)
    self.extra_metrics = extra_metrics
    self.after_step = after_step
    self.manager = checkpoint.make_manager(workdir, keep_checkpoints)
    latest = self.manager.latest_step()
    self.resumed = latest is not None
    if self.resumed:
      checkpoint.restore(self.manager, latest, items)
      logging.info("resumed from step %d", latest)
    self.start = latest or 0
    self.writer = report.MetricWriter(workdir)
    self.last: dict[str, float] = {}

  def run(self, step_fn: Callable[[int], dict]) -> int:
    """Runs `step_fn` from `start` to `total` or a stop request.

    Args:
      step_fn: runs one step; returns a dict of scalar (device) metrics
        holding at least "train/loss".

    Returns:
      The number of finished steps (all saved).
    """
    progress = report.Progress(self.start, self.total)
    stop = preemption.StopRequest()
    step, pending = self.start, []

    def flush():
      fetched = jax.device_get(pending)
      self.last = {k: float(np.mean([m[k] for m in fetched]))
                   for k in fetched[0]}
      if self.extra_metrics is not None:
        self.last.update(self.extra_metrics(step))
      self.last["perf/steps_per_sec"] = progress.update(
          step, self.last["train/loss"])
      self.writer.write(step, self.last)
      pending.clear()

    while step < self.total:
      pending.append(step_fn(step))
      step += 1
      if step % self.log_every == 0 or step in self.boundaries:
        flush()
      if self.after_step is not None:
        self.after_step(step)
      if step % self.checkpoint_every == 0 or step in self.boundaries:
        self._save(step)
      if stop.should_stop(step):
        logging.info("stop requested: saving step %d and exiting", step)
        break
    if pending:
      flush()
    if self.manager.latest_step() != step:
      self._save(step)
    self.manager.close()
    progress.close()
    stop.restore()
    return step

  def _save(self, step: int) -> None:
    """Writes checkpoint `step` and waits: once logged, it is on disk."""
    checkpoint.save(self.manager, step, self.items)
    self.manager.wait_until_finished()
    logging.info("checkpoint %d saved", step)
