"""Orbax checkpoints of named NNX states (model, optimizer, ...).

A checkpoint is an `ocp.args.Composite` of `StandardSave`d `nnx.State`s, one
per name; restoring writes them back into live modules with `nnx.update`, so
shardings and dtypes come from the modules themselves.
"""

from __future__ import annotations

import os

from flax import nnx
import orbax.checkpoint as ocp


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
  """Restores checkpoint `step` into the named modules, in place."""
  restored = manager.restore(step, args=ocp.args.Composite(**{
      name: ocp.args.StandardRestore(nnx.state(module))
      for name, module in modules.items()}))
  for name, module in modules.items():
    nnx.update(module, restored[name])
