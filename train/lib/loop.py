"""The loop every training script shares: resume, step, log, save, stop.

A script checks its settings, prepares the workdir, builds its state and one
`step_fn(step) -> metrics` (which may switch phases by step), then:

  loop_lib.check_settings(config, "num_steps")
  workdir = workdir_lib.prepare(workdir, config, allow_config_change)
  ...
  loop = loop_lib.Loop(workdir, {"state": state}, config.num_steps, ...)
  step = loop.run(step_fn)  # a SIGTERM saves and exits 143 in here
  ...evaluate...
  loop.summary(samples=path)

Resume: the newest checkpoint in `workdir`/checkpoints that restores is
restored into the items when the loop is built (see
`checkpoint.restore_latest`), and metrics.jsonl is cut back to its step. A
checkpoint is written every `checkpoint_every` steps, at every phase
boundary and at the last step reached, so no finished step is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import os
import sys
import time

from flax import nnx
import jax
import numpy as np

from train.lib import checkpoint
from train.lib import preemption
from train.lib import report


def _check_int(config, name: str, minimum: int) -> int:
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(
        f"config.{name} must be an integer >= {minimum}, got {value!r}")
  return value


def check_settings(config, *step_fields: str) -> None:
  """Validates the loop's config fields before any work.

  Args:
    config: holds batch_size, log_every, checkpoint_every, keep_checkpoints
      (integers >= 1) and the `step_fields`.
    step_fields: the fields whose sum is the run's length (phases), each an
      integer >= 0.

  Raises:
    ValueError: naming the field and what it must be.
  """
  for name in ("batch_size", "log_every", "checkpoint_every",
               "keep_checkpoints"):
    _check_int(config, name, 1)
  total = sum(_check_int(config, name, 0) for name in step_fields)
  if total < 1:
    raise ValueError(
        f"config.{' + config.'.join(step_fields)} must be >= 1, got {total}")


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
        Checkpoint steps are logged too.
      extra_metrics: step -> scalars added to each flush (e.g. the lr).
      after_step: called with the number of finished steps after each step
        (e.g. a periodic evaluation).

    Raises:
      RuntimeError: checkpoints exist but none restores.
    """
    self.workdir = workdir
    self.items = items
    self.total = total
    self.log_every = log_every
    self.checkpoint_every = checkpoint_every
    self.boundaries = frozenset(int(b) for b in boundaries)
    self.extra_metrics = extra_metrics
    self.after_step = after_step
    self.started = time.perf_counter()
    self.manager = checkpoint.make_manager(workdir, keep_checkpoints)
    latest = checkpoint.restore_latest(self.manager, items)
    self.resumed = latest is not None
    self.start = latest or 0
    self.writer = report.MetricWriter(workdir)
    if self.resumed:
      report.log("resumed from checkpoint %d", latest)
      self.writer.truncate(latest)
    else:
      self.writer.set_aside()
    self.last: dict[str, float] = {}

  def run(self, step_fn: Callable[[int], dict]) -> int:
    """Runs `step_fn` from `start` to `total`.

    A stop request (SIGTERM, Ctrl-C) saves the finished step and exits the
    process with status 128 + signal (143 for SIGTERM).

    Args:
      step_fn: runs one step; returns a dict of scalar (device) metrics
        holding at least "train/loss".

    Returns:
      The number of finished steps (all saved), `total`.
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
      self.writer.write(step, self.last, echo=False)
      pending.clear()

    while step < self.total:
      pending.append(step_fn(step))
      step += 1
      # Stay one step ahead of the device at most: dispatching runs ahead
      # to the next flush otherwise, and a stop request waits for it.
      if len(pending) > 1:
        jax.block_until_ready(pending[-2])
      save = step % self.checkpoint_every == 0 or step in self.boundaries
      if save or step % self.log_every == 0:
        flush()
      if self.after_step is not None:
        self.after_step(step)
      if save:
        self._save(step)
      if stop.should_stop(step):
        break
    if pending:
      flush()
    if self.manager.latest_step() != step:
      self._save(step)
    self.manager.close()
    progress.close()
    stop.restore()
    if stop.signal is not None:
      report.log("stopped by signal %d after step %d (saved); exiting with "
                 "status %d", stop.signal, step, stop.exit_code)
      sys.exit(stop.exit_code)
    return step

  def _save(self, step: int) -> None:
    """Writes checkpoint `step` and waits: once logged, it is on disk."""
    checkpoint.save(self.manager, step, self.items)
    self.manager.wait_until_finished()
    report.log("step %d: checkpoint saved; %s", step,
               report.format_metrics(self.last))

  def summary(self, **outputs: str) -> None:
    """Logs the end of the run: time, final loss and where the files are.

    Args:
      **outputs: name -> path of the caller's further outputs.
    """
    files = {"checkpoints": os.path.join(self.workdir, "checkpoints"),
             "metrics": self.writer.path, **outputs}
    report.log(
        "done: steps %d-%d of %d in %.0f s, final train/loss %s\n%s",
        self.start, self.total, self.total,
        time.perf_counter() - self.started,
        f"{self.last['train/loss']:.4f}" if "train/loss" in self.last
        else "n/a (nothing left to train)",
        "\n".join(f"  {name}: {path}" for name, path in files.items()))
