"""Orbax checkpoints of named NNX states (model, optimizer, ...).

A checkpoint is an `ocp.args.Composite` of `StandardSave`d `nnx.State`s, one
per name; restoring writes them back into live modules with `nnx.update`, so
shardings and dtypes come from the modules themselves.

`restore_latest` resumes from the newest checkpoint that restores: newer
ones that fail (truncated data, lost metadata, an empty step directory) are
moved aside, never deleted.
"""

from __future__ import annotations

import os
import sys

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

UNRESTORABLE_DIR = "checkpoints_unrestorable"


def make_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager over `workdir`/checkpoints."""
  return ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True))


def save(manager: ocp.CheckpointManager, step: int,
         modules: dict[str, nnx.Module]) -> None:
  """Saves `nnx.state` of each named module as checkpoint `step` (async)."""
  manager.save(step, args=ocp.args.Composite(**{
      name: ocp.args.StandardSave(nnx.state(module))
      for name, module in modules.items()}))


def restore(manager: ocp.CheckpointManager, step: int,
            modules: dict[str, nnx.Module]) -> None:
  """Restores checkpoint `step` into the named modules, in place.

  The modules change only if every item restored.
  """
  restored = manager.restore(step, args=ocp.args.Composite(**{
      name: ocp.args.StandardRestore(nnx.state(module))
      for name, module in modules.items()}))
  for name, module in modules.items():
    nnx.update(module, restored[name])


def _describe(error: Exception) -> str:
  """The first line of an error, prefixed by its type."""
  lines = str(error).strip().splitlines() or [""]
  return f"{type(error).__name__}: {lines[0][:300]}"


def _ignore_closed_event_loop(hook):
  """An unraisable-exception hook that drops the "Event loop is closed"
  RuntimeErrors of tensorstore reads still in flight when a restore failed,
  and passes everything else to `hook`."""
  def filtered(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      hook(unraisable)
  filtered.ignores_closed_event_loop = True
  return filtered


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint `step` to <workdir>/checkpoints_unrestorable/."""
  source = os.path.join(str(manager.directory), str(step))
  aside = os.path.join(os.path.dirname(str(manager.directory)),
                       UNRESTORABLE_DIR)
  target, copy = os.path.join(aside, str(step)), 0
  while os.path.exists(target):
    copy += 1
    target = os.path.join(aside, f"{step}.{copy}")
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    os.rename(source, target)
  return target


def restore_latest(manager: ocp.CheckpointManager,
                   modules: dict[str, nnx.Module]) -> int | None:
  """Restores the newest checkpoint that restores into `modules`.

  Checkpoints newer than it that fail to restore are logged (step, error)
  and moved to <workdir>/checkpoints_unrestorable/.

  Returns:
    The restored step, or None when there is no checkpoint.

  Raises:
    RuntimeError: checkpoints exist but none restores (nothing is moved).
  """
  if not getattr(sys.unraisablehook, "ignores_closed_event_loop", False):
    sys.unraisablehook = _ignore_closed_event_loop(sys.unraisablehook)
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restore(manager, step, modules)
    except Exception as error:  # pylint: disable=broad-except
      # orbax and tensorstore raise many types (ValueError, KeyError,
      # FileNotFoundError, ...) for damaged or mismatched checkpoints.
      failures.append((step, _describe(error)))
      continue
    for bad, reason in failures:
      target = _move_aside(manager, bad)
      logging.warning("checkpoint %d does not restore (%s); moved it to %s",
                      bad, reason, target)
    if failures:
      multihost_utils.sync_global_devices("checkpoints moved aside")
      manager.reload()
    return step
  if failures:
    listing = "\n".join(f"  step {s}: {reason}" for s, reason in failures)
    raise RuntimeError(
        f"no checkpoint in {manager.directory} restores into this run's "
        f"state (was the model or its code changed?):\n{listing}\n"
        "Nothing was moved or started. Fix the cause, or move the "
        "checkpoints away to start this workdir from scratch.")
  return None
