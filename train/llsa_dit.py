r"""Trains a pixel-space DiT with LLSA (or any jsparse method): rectified flow.

  python train/llsa_dit.py          # digits 32x32 with LLSA-l1 on a CPU
  python train/llsa_dit.py --config.attn.method=dense   # the dense baseline
  python train/llsa_dit.py --config=train/configs/llsa_dit.py:128 \
      --config.data.image_dir=/data/ffhq --workdir=/ckpt/llsa128

Resumes from the latest checkpoint in --workdir; SIGTERM saves the finished
step before exit. Multi-host: TPU slices (and SLURM / Open MPI jobs) are
detected; elsewhere pass --coordinator_address, --num_processes and
--process_id on every host (all hosts must see the same --workdir).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from flax import nnx
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

from jsparse.models import dit
from train.lib import checkpoint
from train.lib import data
from train.lib import flow
from train.lib import loop as loop_lib
from train.lib import parallel
from train.lib import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs",
                           "llsa_dit.py"),
    "Training config (ml_collections); override fields with --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdir", "llsa_dit"),
    "Checkpoints, metrics.jsonl and sample grids go here.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for jax.distributed (multi-host CPU/GPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id in a multi-host run.")


class TrainState(nnx.Module):
  """The model, its EMA copy and the optimizer (what a checkpoint holds)."""

  def __init__(self, model_config: dit.DiTConfig,
               tx: optax.GradientTransformation, seed: int):
    self.model = dit.DiT(model_config, rngs=nnx.Rngs(seed))
    self.ema = dit.DiT(model_config, rngs=nnx.Rngs(seed))
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)


def model_config(config) -> dit.DiTConfig:
  """The DiTConfig of a training config."""
  attn = config.attn
  return dit.DiTConfig(
      image_size=config.data.image_size,
      in_channels=config.model.in_channels,
      hidden_size=config.model.hidden_size,
      depth=config.model.depth,
      num_heads=config.model.num_heads,
      mlp_ratio=config.model.mlp_ratio,
      token_permutation=config.model.token_permutation,
      attention=attn.method,
      method_config=dit.make_method_config(attn.method,
                                           attn.options.to_dict()),
      implementation=attn.implementation,
      dtype=jnp.bfloat16 if config.model.bf16 else jnp.float32)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a constant learning rate."""
  opt = config.optim
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(opt.learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay))


def create_train_state(config, mesh) -> TrainState:
  """Initialises the state directly in its (replicated / FSDP) shardings."""
  def create():
    return TrainState(model_config(config), make_optimizer(config),
                      config.seed)

  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  shardings = parallel.state_shardings(abstract, mesh)
  state = jax.jit(lambda: nnx.split(create())[1],
                  out_shardings=shardings)()
  return nnx.merge(graphdef, state)


CHECKPOINT_ITEMS = ("model", "ema", "optimizer")


def restore_checkpoint(manager: ocp.CheckpointManager, step: int,
                       state: TrainState,
                       names=CHECKPOINT_ITEMS) -> None:
  """Restores items `names` of checkpoint `step` into `state` in place."""
  checkpoint.restore(manager, step,
                     {name: getattr(state, name) for name in names})


def make_train_step(config):
  """The jitted update: flow loss, AdamW, EMA; returns scalar metrics."""
  noise_scale = config.flow.noise_scale
  max_decay, power = config.ema.max_decay, config.ema.power
  seed = config.seed

  @nnx.jit
  def train_step(state: TrainState, images: jax.Array, step: jax.Array):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    loss, grads = nnx.value_and_grad(
        lambda model: flow.loss_fn(model, images, key, noise_scale))(
            state.model)
    state.optimizer.update(state.model, grads)
    decay = jnp.minimum(max_decay,
                        1.0 - (1.0 + step.astype(jnp.float32))**-power)
    params = nnx.state(state.model, nnx.Param)
    ema = nnx.state(state.ema, nnx.Param)
    nnx.update(state.ema, jax.tree.map(
        lambda e, p: e + (1.0 - decay) * (p - e), ema, params))
    return {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)}

  return train_step


def sample_images(model: dit.DiT, config, num_images: int) -> np.ndarray:
  """EMA samples [num_images, R, R, C] in [0, 1], gathered to every host."""
  shape = (num_images, config.data.image_size, config.data.image_size,
           config.model.in_channels)
  sampler = nnx.jit(lambda m: flow.sample(
      m, jax.random.PRNGKey(config.sample.seed), shape, config.sample.steps,
      config.flow.noise_scale))
  images = sampler(model)
  return np.asarray(multihost_utils.process_allgather(images, tiled=True))


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains (resuming from `workdir`), then samples a grid of EMA images.

  Returns:
    The last logged metrics.
  """
  workdir = report.prepare_workdir(workdir, config)

  # ---------------------------------------------------------------- mesh --
  mesh = parallel.make_mesh(config.mesh.fsdp)
  if config.batch_size % jax.device_count():
    raise ValueError(
        f"batch_size {config.batch_size} must be divisible by the "
        f"{jax.device_count()} devices")
  logging.info("mesh %s over %d processes", dict(mesh.shape),
               jax.process_count())

  # ---------------------------------------------------------------- data --
  dataset = data.make_dataset(config)
  logging.info("dataset: %d images of %dx%d", len(dataset),
               config.data.image_size, config.data.image_size)

  # ------------------------------------------------- model + optimizer --
  state = create_train_state(config, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(
      nnx.state(state.model, nnx.Param)))
  logging.info("DiT: %.2fM params, attention %s", num_params / 1e6,
               config.attn.method)
  train_step = make_train_step(config)

  # ------------------------------------------ checkpoints, resume, loop --
  loop = loop_lib.Loop(
      workdir, {name: getattr(state, name) for name in CHECKPOINT_ITEMS},
      config.num_steps, keep_checkpoints=config.keep_checkpoints,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      extra_metrics=lambda step: {"train/lr": config.optim.learning_rate})
  if not loop.resumed and config.init_from:
    source = ocp.CheckpointManager(os.path.dirname(config.init_from))
    restore_checkpoint(source, int(os.path.basename(config.init_from)),
                       state, names=("model", "ema"))
    logging.info("initialised weights from %s", config.init_from)

  batches = data.prefetch(dataset, loop.start, config.batch_size, config.seed)

  def step_fn(step):
    _, local = next(batches)
    return train_step(state, parallel.global_batch(local, mesh),
                      np.int32(step))

  step = loop.run(step_fn)
  if step < config.num_steps:
    return loop.last

  # ---------------------------------------------------------- evaluate --
  t0 = time.perf_counter()
  images = sample_images(state.ema, config, config.sample.num_images)
  if jax.process_index() == 0:
    path = os.path.join(workdir, f"samples_step{step}.png")
    report.save_image_grid(images, path, columns=8,
                           upscale=max(1, 128 // config.data.image_size))
    logging.info("wrote %s (%d EMA samples, %.1f s)", path, len(images),
                 time.perf_counter() - t0)
  return loop.last


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(report.quiet_orbax)
  parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                      _PROCESS_ID.value)
  logging.info("jax %s, flax %s, optax %s, orbax %s", jax.__version__,
               flax.__version__, optax.__version__, ocp.__version__)
  logging.info("process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  logging.info("config:\n%s", _CONFIG.value)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
