r"""Trains a pixel-space DiT with LLSA (or any jsparse method): rectified flow.

  python train/llsa_dit.py          # digits 8x8 with LLSA-l1 on a CPU
  python train/llsa_dit.py --config.attn.method=dense   # the dense baseline
  python train/llsa_dit.py --config=train/configs/llsa_dit.py:128 \
      --config.data.image_dir=/data/ffhq --workdir=/ckpt/llsa128

The digits default is class-conditional: the run ends with one labelled row
of EMA samples per digit (classifier-free guidance) in
samples_step<N>.png, the raw samples in samples_step<N>.npz, and the score
of eval/digit_check.py in the log.

Resumes from the newest checkpoint in --workdir that restores, with the
same config (a different one is refused unless --allow_config_change);
SIGTERM saves the finished step and exits with status 143. Multi-host: TPU
slices (and SLURM / Open MPI jobs) are detected; elsewhere pass
--coordinator_address, --num_processes and --process_id on every host (all
hosts must see the same --workdir).
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

from eval import digit_check
from jsparse.models import dit
from train.lib import checkpoint
from train.lib import conditional
from train.lib import data
from train.lib import flow
from train.lib import loop as loop_lib
from train.lib import parallel
from train.lib import report
from train.lib import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs",
                           "llsa_dit.py"),
    "Training config (ml_collections); override fields with --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdir", "llsa_dit"),
    "Checkpoints, metrics.jsonl and sample grids go here.")
flags.adopt_module_key_flags(workdir_lib)  # --allow_config_change
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for jax.distributed (multi-host CPU/GPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id in a multi-host run.")


class TrainState(nnx.Module):
  """The model, its EMA copy and the optimizer (what a checkpoint holds)."""

  def __init__(self, model_config: dit.DiTConfig, num_classes: int,
               tx: optax.GradientTransformation, seed: int):
    self.model = conditional.ConditionalDiT(model_config, num_classes,
                                            rngs=nnx.Rngs(seed))
    self.ema = conditional.ConditionalDiT(model_config, num_classes,
                                          rngs=nnx.Rngs(seed))
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


def learning_rate(config) -> optax.Schedule:
  """Linear warmup, then constant or cosine decay to 0 at num_steps."""
  opt = config.optim
  warmup = opt.warmup_steps
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(opt.learning_rate,
                                        max(config.num_steps - warmup, 1))
  else:
    after = optax.constant_schedule(opt.learning_rate)
  if not warmup:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(opt.learning_rate / warmup, opt.learning_rate,
                             warmup), after], [warmup])


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and the `learning_rate` schedule."""
  opt = config.optim
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(learning_rate(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay))


def create_train_state(config, mesh) -> TrainState:
  """Initialises the state directly in its (replicated / FSDP) shardings."""
  def create():
    return TrainState(model_config(config), config.model.num_classes,
                      make_optimizer(config), config.seed)

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
  f = config.flow
  max_decay, power = config.ema.max_decay, config.ema.power
  seed = config.seed

  @nnx.jit
  def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                 step: jax.Array):
    key, drop_key = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(seed), step))
    labels = conditional.drop_labels(labels, drop_key, f.label_dropout,
                                     state.model.null_label)

    def loss_fn(model):
      return flow.loss_fn(velocity_fn(model, labels, 1.0, config), images,
                          key, f.noise_scale, f.timestep_sampling)

    loss, grads = nnx.value_and_grad(loss_fn)(state.model)
    state.optimizer.update(state.model, grads)
    decay = jnp.minimum(max_decay,
                        1.0 - (1.0 + step.astype(jnp.float32))**-power)
    params = nnx.state(state.model, nnx.Param)
    ema = nnx.state(state.ema, nnx.Param)
    nnx.update(state.ema, jax.tree.map(
        lambda e, p: e + (1.0 - decay) * (p - e), ema, params))
    return {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)}

  return train_step


def velocity_fn(model: conditional.ConditionalDiT, labels: jax.Array,
                guidance_scale: float, config):
  """(x_t, t) -> the guided velocity for `labels`, from a model that
  predicts config.flow.prediction ("v" or "x0")."""
  guided = conditional.guided(model, labels, guidance_scale)
  if config.flow.prediction == "x0":
    return flow.velocity_from_x0(guided)
  return guided


def sample_labels(config, num_images: int) -> np.ndarray:
  """int [num_images]: every class in turn (the null label if none)."""
  num_classes = config.model.num_classes
  if not num_classes:
    return np.zeros(num_images, np.int32)
  return (np.arange(num_images) % num_classes).astype(np.int32)


def make_sampler(config, num_images: int):
  """A jitted model -> samples [num_images, R, R, C] in [0, 1] of
  `sample_labels`, with classifier-free guidance; gathered to every host.
  Build it once: each call of the result reuses its compilation."""
  shape = (num_images, config.data.image_size, config.data.image_size,
           config.model.in_channels)
  labels = jnp.asarray(sample_labels(config, num_images))
  key = jax.random.PRNGKey(config.sample.seed)
  sampler = nnx.jit(lambda m: flow.sample(
      velocity_fn(m, labels, config.sample.guidance_scale, config), key,
      shape, config.sample.steps, config.flow.noise_scale))

  def sample(model: conditional.ConditionalDiT) -> np.ndarray:
    return np.asarray(
        multihost_utils.process_allgather(sampler(model), tiled=True))

  return sample


def sample_images(model: conditional.ConditionalDiT, config,
                  num_images: int) -> np.ndarray:
  """Samples [num_images, R, R, C] in [0, 1] of `sample_labels`, with
  classifier-free guidance; gathered to every host."""
  return make_sampler(config, num_images)(model)


def check_config(config) -> None:
  """Validates the fields this script adds to the loop's, before any work.

  Raises:
    ValueError: naming the field and what it must be.
  """
  num_classes = config.model.num_classes
  if num_classes not in (0, data.num_classes(config.data.source)):
    raise ValueError(
        f"model.num_classes must be 0 (unconditional) or the "
        f"{data.num_classes(config.data.source)} classes of data.source="
        f"{config.data.source!r}, got {num_classes}")
  if config.flow.timestep_sampling not in flow.TIMESTEP_SAMPLINGS:
    raise ValueError(
        f"flow.timestep_sampling must be one of {flow.TIMESTEP_SAMPLINGS}, "
        f"got {config.flow.timestep_sampling!r}")
  if config.flow.prediction not in flow.PREDICTIONS:
    raise ValueError(
        f"flow.prediction must be one of {flow.PREDICTIONS}, got "
        f"{config.flow.prediction!r}")
  if not 0.0 <= config.flow.label_dropout < 1.0:
    raise ValueError("flow.label_dropout must be in [0, 1), got "
                     f"{config.flow.label_dropout}")
  if num_classes and config.sample.num_images % num_classes:
    raise ValueError(
        f"sample.num_images must be a multiple of model.num_classes "
        f"{num_classes} (one row per class), got {config.sample.num_images}")
  if not num_classes and config.sample.guidance_scale != 1.0:
    raise ValueError("sample.guidance_scale needs labels "
                     "(model.num_classes > 0); use 1.0 without")
  if config.sample.every < 0:
    raise ValueError("sample.every must be >= 0 (0: only at the end), got "
                     f"{config.sample.every}")
  if config.optim.warmup_steps < 0:
    raise ValueError("optim.warmup_steps must be >= 0, got "
                     f"{config.optim.warmup_steps}")
  if config.optim.schedule not in ("constant", "cosine"):
    raise ValueError("optim.schedule must be 'constant' or 'cosine', got "
                     f"{config.optim.schedule!r}")


def write_samples(images: np.ndarray, config, step: int, png: str,
                  npz: str) -> None:
  """Writes a PNG grid (one labelled row per class) and the raw samples.

  Args:
    images: [N, R, R, C] in [0, 1] of `sample_labels(config, N)`.
    config: the training config.
    step: the training step they come from.
    png: the grid's path.
    npz: the raw samples' path: images f32 [N, R, R, C] in [0, 1], labels
      int [N] (-1: unconditional), step.
  """
  num_classes = config.model.num_classes
  labels = sample_labels(config, len(images))
  upscale = max(1, 128 // config.data.image_size)
  if num_classes:
    order = np.argsort(labels, kind="stable")
    report.save_image_grid(images[order], png,
                           columns=len(images) // num_classes,
                           upscale=upscale,
                           row_labels=[str(c) for c in range(num_classes)])
  else:
    labels = np.full(len(images), -1, np.int32)
    report.save_image_grid(images, png, columns=8, upscale=upscale)
  np.savez_compressed(npz, images=images.astype(np.float32), labels=labels,
                      step=step)


def make_evaluation(state: TrainState, config, workdir: str):
  """step -> (png, npz): samples the EMA model, writes `write_samples`'s
  files samples_step<step>.{png,npz} and logs eval/digit_check.py's score
  (digits only)."""
  sample = make_sampler(config, config.sample.num_images)
  recognisers = {}

  def evaluate(step: int) -> tuple[str, str]:
    t0 = time.perf_counter()
    images = sample(state.ema)
    png, npz = (os.path.join(workdir, f"samples_step{step}.{ext}")
                for ext in ("png", "npz"))
    if jax.process_index() == 0:
      write_samples(images, config, step, png, npz)
      report.log("step %d: wrote %s and %s (%d EMA samples, %.1f s)", step,
                 png, npz, len(images), time.perf_counter() - t0)
      if config.data.source == "digits" and config.model.in_channels == 1:
        check = digit_check.check_samples(npz, recognisers)
        report.log("step %d: digit check (eval/digit_check.py): %.0f%% "
                   "recognised as their digit, %d distinct digits", step,
                   100 * check["recognised"], check["distinct_digits"])
    return png, npz

  return evaluate


def train_and_evaluate(config, workdir: str,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains (resuming from `workdir`), then samples a grid of EMA images.

  Args:
    config: the training config.
    workdir: the run's directory; resumed from if it holds checkpoints.
    allow_config_change: resume even if the workdir's config.json
      differs (the change is recorded).

  Returns:
    The last logged metrics.
  """
  loop_lib.check_settings(config, "num_steps")
  check_config(config)
  workdir = workdir_lib.prepare(workdir, config, allow_config_change)

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
  schedule = learning_rate(config)

  # ------------------------------------------ checkpoints, resume, loop --
  evaluate = make_evaluation(state, config, workdir)

  def periodic_evaluation(step):
    every = config.sample.every
    if every and step % every == 0 and step < config.num_steps:
      evaluate(step)

  loop = loop_lib.Loop(
      workdir, {name: getattr(state, name) for name in CHECKPOINT_ITEMS},
      config.num_steps, keep_checkpoints=config.keep_checkpoints,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      extra_metrics=lambda step: {"train/lr": float(schedule(step - 1))},
      after_step=periodic_evaluation)
  if not loop.resumed and config.init_from:
    source = ocp.CheckpointManager(os.path.dirname(config.init_from))
    restore_checkpoint(source, int(os.path.basename(config.init_from)),
                       state, names=("model", "ema"))
    logging.info("initialised weights from %s", config.init_from)

  batches = data.prefetch(dataset, loop.start, config.batch_size, config.seed)

  def step_fn(step):
    _, images, labels = next(batches)
    if not config.model.num_classes:
      labels = np.zeros(len(images), np.int32)  # the null label
    return train_step(state, parallel.global_batch(images, mesh),
                      parallel.global_batch(labels.astype(np.int32), mesh),
                      np.int32(step))

  step = loop.run(step_fn)

  # ---------------------------------------------------------- evaluate --
  png, npz = evaluate(step)
  loop.summary(samples=png, raw_samples=npz)
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
  train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                     workdir_lib.ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
