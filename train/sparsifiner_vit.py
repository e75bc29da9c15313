r"""Sparsifiner on a small ViT: dense teacher, then the paper's two phases.

Sparsifiner: https://arxiv.org/abs/2303.13755.

  python train/sparsifiner_vit.py --workdir=workdir/sparsifiner_vit
  python train/sparsifiner_vit.py --config.attn.keep_rate=0.125

One run has three phases on one global step counter: (0) the dense teacher
is trained with cross-entropy; (1) the student (the teacher's weights plus
connectivity predictors) trains only its predictors to reconstruct the
teacher's attention, with dense attention; (2) the predictors are frozen and
the backbone is fine-tuned under the detached predicted masks with
CE + KL(teacher || student) + final patch-token MSE. The random-mask
ablation, a second student under uniformly random masks of the same
density, is fine-tuned in phase 2 exactly as the Sparsifiner student is
(same start, batches, losses and schedule). Each phase has its own AdamW.
Resumes from the latest checkpoint in --workdir; SIGTERM saves the
finished step and exits 143. Writes results.json (accuracies, mask recall and
density, attention FLOPs) to --workdir.
"""

from __future__ import annotations

import dataclasses
import json
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
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from jsparse.methods import sparsifiner
from jsparse.models import vit
from train.lib import data as data_lib
from train.lib import loop as loop_lib
from train.lib import report
from train.lib import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs",
                           "sparsifiner_vit.py"),
    "Training config (ml_collections); override fields with --config.x=y.",
    lock_config=True, allow_override=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdir", "sparsifiner_vit"),
    "Checkpoints, metrics.jsonl and results.json go here.",
    allow_override=True)
flags.adopt_module_key_flags(workdir_lib)  # --allow_config_change

PREDICTOR = nnx.All(nnx.Param, nnx.PathContains("method"))
BACKBONE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("method")))


def model_configs(config) -> tuple[vit.ViTConfig, vit.ViTConfig,
                                   vit.ViTConfig]:
  """(teacher, student, random student) ViTConfigs: dense, Sparsifiner and
  Sparsifiner with random masks of the same density."""
  m, a = config.model, config.attn
  teacher = vit.ViTConfig(
      image_size=config.data.image_size, patch_size=m.patch_size,
      hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
      mlp_ratio=m.mlp_ratio)
  method_config = sparsifiner.SparsifinerConfig(
      num_tokens=teacher.num_tokens, token_ratio=a.token_ratio,
      channel_ratio=a.channel_ratio, keep_rate=a.keep_rate,
      coef_topk=a.coef_topk, basis_threshold=a.basis_threshold,
      basis=a.basis, scale=a.scale)
  student = dataclasses.replace(
      teacher, attention="sparsifiner", method_config=method_config,
      implementation=a.implementation)
  random_student = dataclasses.replace(
      student, method_config=dataclasses.replace(method_config,
                                                 selection="random"))
  return teacher, student, random_student


def schedule(peak: float, steps: int, config) -> optax.Schedule:
  """Linear warmup then cosine decay to end_lr_ratio * peak."""
  o = config.optim
  steps = max(steps, 1)
  warmup = int(o.warmup_fraction * steps)
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(steps, warmup + 1), peak * o.end_lr_ratio)


def adamw(peak: float, steps: int, config) -> optax.GradientTransformation:
  o = config.optim
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule(peak, steps, config),
                                 weight_decay=o.weight_decay))


class TrainState(nnx.Module):
  """Teacher, students and the phases' optimizers."""

  def __init__(self, config):
    teacher_config, student_config, random_config = model_configs(config)
    o = config.optim
    self.teacher = vit.ViT(teacher_config, rngs=nnx.Rngs(config.seed))
    self.student = vit.ViT(student_config, rngs=nnx.Rngs(config.seed + 1))
    self.random_student = vit.ViT(random_config,
                                  rngs=nnx.Rngs(config.seed + 1))
    self.teacher_opt = nnx.Optimizer(
        self.teacher, adamw(o.teacher_lr, config.teacher_steps, config),
        wrt=nnx.Param)
    self.predictor_opt = nnx.Optimizer(
        self.student, adamw(o.predictor_lr, config.phase1_steps, config),
        wrt=PREDICTOR)
    self.backbone_opt = nnx.Optimizer(
        self.student, adamw(o.backbone_lr, config.phase2_steps, config),
        wrt=BACKBONE)
    self.random_backbone_opt = nnx.Optimizer(
        self.random_student,
        adamw(o.backbone_lr, config.phase2_steps, config), wrt=BACKBONE)


class Digits:
  """sklearn digits at `image_size`, a fixed train/test split."""

  def __init__(self, config):
    digits = data_lib.DigitsDataset(config.data.image_size, channels=1)
    self.images, self.labels = digits.images, digits.labels.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(self.images))
    split = int(len(order) * (1 - config.data.test_fraction))
    self.train, self.test = order[:split], order[split:]

  def batch(self, step: int, batch_size: int, seed: int):
    """The (images, labels) of `step`: a pure function of (seed, step)."""
    ids = self.train[data_lib.global_batch_indices(step, batch_size,
                                                   len(self.train), seed)]
    return jnp.asarray(self.images[ids]), jnp.asarray(self.labels[ids])


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def make_steps(config):
  """The jitted steps of the three phases (each returns scalar metrics)."""
  w = config.loss

  @nnx.jit
  def teacher_step(state: TrainState, images, labels):
    loss, grads = nnx.value_and_grad(
        lambda m: cross_entropy(m(images), labels))(state.teacher)
    state.teacher_opt.update(state.teacher, grads)
    return {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)}

  @nnx.jit
  def phase1_step(state: TrainState, images, labels):
    del labels
    _, teacher = state.teacher(images, dense=True, with_aux=True)
    teacher = jax.lax.stop_gradient(teacher)

    def loss_fn(student):
      losses = [sparsifiner.reconstruction_loss(
          block.attn.method.approximate(q, k, sparse=False), probs,
          weight=w.recon_weight)
                for block, q, k, probs in zip(student.blocks, teacher["q"],
                                              teacher["k"],
                                              teacher["probs"])]
      return sum(losses) / len(losses)

    diff = nnx.DiffState(0, PREDICTOR)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(state.student)
    state.predictor_opt.update(state.student, grads)
    return {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)}

  def finetune(student, optimizer, images, labels, t_logits, t_tokens):
    """One phase-2 update of `student`'s backbone; its loss and parts."""
    def loss_fn(student):
      logits, aux = student(images, with_aux=True)
      ce = cross_entropy(logits, labels)
      kl = sparsifiner.logit_distillation_loss(logits, t_logits)
      tok = sparsifiner.token_distillation_loss(aux["tokens"], t_tokens)
      loss = w.ce_weight * ce + w.kl_weight * kl + w.token_weight * tok
      return loss, {"ce": ce, "kl": kl, "token_mse": tok}

    diff = nnx.DiffState(0, BACKBONE)
    (loss, parts), grads = nnx.value_and_grad(
        loss_fn, argnums=diff, has_aux=True)(student)
    optimizer.update(student, grads)
    return loss, parts, optax.global_norm(grads)

  @nnx.jit
  def phase2_step(state: TrainState, images, labels):
    t_logits, teacher = state.teacher(images, dense=True, with_aux=True)
    targets = jax.lax.stop_gradient((t_logits, teacher["tokens"]))
    loss, parts, grad_norm = finetune(state.student, state.backbone_opt,
                                      images, labels, *targets)
    random_loss, _, _ = finetune(state.random_student,
                                 state.random_backbone_opt, images, labels,
                                 *targets)
    return {"train/loss": loss, "train/grad_norm": grad_norm,
            **{f"train/{k}": v for k, v in parts.items()},
            "train/random_mask_loss": random_loss}

  return teacher_step, phase1_step, phase2_step


@nnx.jit
def _predict(model, images):
  return model(images).argmax(-1)


def accuracy(model: vit.ViT, digits: Digits, chunk: int = 120) -> float:
  """Top-1 accuracy on the test split."""
  hits = 0
  for i in range(0, len(digits.test), chunk):
    ids = digits.test[i:i + chunk]
    hits += int(np.sum(np.asarray(_predict(model, jnp.asarray(
        digits.images[ids]))) == digits.labels[ids]))
  return hits / len(digits.test)


def column_share(mask: jax.Array) -> jax.Array:
  """Mean over (batch, head) of the share of rows that keep the most-kept
  key column of bool mask [B, H, rows, N]: 1 when every row keeps one
  common key, keys_per_row / N for masks spread evenly over the keys."""
  return jnp.mean(jnp.max(jnp.mean(mask, axis=2), axis=-1))


@nnx.jit
def _mask_stats(teacher, students, images):
  """For each of `students`, per layer, on the teacher's q and k (the predictors see those in
  phase 1; phase 2 does not change them): recall of the teacher's per-row
  top-k by the student's masks, their density, the teacher's attention
  mass inside them (per row, averaged; the top-k's mass is the most a mask
  of that size holds), and `column_share` of the student's masks and of
  the teacher's top-k (perfect masks)."""
  _, aux = teacher(images, dense=True, with_aux=True)

  def layer_stats(student):
    stats = {"recall": [], "density": [], "mass": [], "topk_mass": [],
             "column_share": [], "teacher_column_share": []}
    for block, q, k, probs in zip(student.blocks, aux["q"], aux["k"],
                                  aux["probs"]):
      method = block.attn.method
      mask = method.mask(q, k)[:, :, 1:]
      oracle = sparsifiner.row_topk_mask(probs[:, :, 1:],
                                         method.config.keys_per_row)
      stats["recall"].append(jnp.sum(mask & oracle) / jnp.sum(oracle))
      stats["density"].append(mask.mean())
      rows = probs[:, :, 1:]
      stats["mass"].append(
          jnp.mean(jnp.sum(jnp.where(mask, rows, 0.0), -1)))
      stats["topk_mass"].append(
          jnp.mean(jnp.sum(jnp.where(oracle, rows, 0.0), -1)))
      stats["column_share"].append(column_share(mask))
      stats["teacher_column_share"].append(column_share(oracle))
    return {name: jnp.stack(x) for name, x in stats.items()}

  return [layer_stats(student) for student in students]


def with_selection(student: vit.ViT, selection: str,
                   backbone: vit.ViT | None = None) -> vit.ViT:
  """A copy of `student` with another selection rule and/or backbone."""
  cfg = student.config
  method_config = dataclasses.replace(cfg.method_config, selection=selection)
  model = vit.ViT(dataclasses.replace(cfg, method_config=method_config),
                  rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(student))
  if backbone is not None:
    nnx.update(model, nnx.state(backbone, nnx.Param))
  return model


def evaluate(state: TrainState, digits: Digits, config) -> dict:
  """Accuracies, the random-mask ablation, mask recall/density and FLOPs."""
  s = state.student
  method = s.blocks[0].attn.method
  images = jnp.asarray(digits.images[digits.test[:128]])
  stats, random_stats = _mask_stats(state.teacher,
                                    (s, state.random_student), images)
  flops = sparsifiner.attention_flops(method.config, s.config.num_heads,
                                      s.config.head_dim)
  return {
      "teacher_accuracy": accuracy(state.teacher, digits),
      "sparsifiner_accuracy": accuracy(s, digits),
      "sparsifiner_no_finetune_accuracy": accuracy(
          with_selection(s, "predictor", backbone=state.teacher), digits),
      "random_mask_accuracy": accuracy(state.random_student, digits),
      "random_mask_no_finetune_accuracy": accuracy(
          with_selection(s, "random", backbone=state.teacher), digits),
      "topk_recall_per_layer": np.asarray(stats["recall"]).tolist(),
      "random_recall": method.config.keep_rate,
      "mask_density_non_cls_rows": float(np.mean(stats["density"])),
      "teacher_mass_in_mask_per_layer": np.asarray(stats["mass"]).tolist(),
      "teacher_mass_in_topk_per_layer": np.asarray(
          stats["topk_mass"]).tolist(),
      "teacher_mass_in_random_mask": float(np.mean(random_stats["mass"])),
      "column_share_per_layer": np.asarray(stats["column_share"]).tolist(),
      "teacher_column_share_per_layer": np.asarray(
          stats["teacher_column_share"]).tolist(),
      "random_column_share": float(np.mean(random_stats["column_share"])),
      "expected_density": method.config.keys_per_row / s.config.num_tokens,
      "num_tokens": s.config.num_tokens,
      "keys_per_row": method.config.keys_per_row,
      "attention_flops": flops,
      "attention_flop_reduction": 1 - flops["sparse"] / flops["dense"],
      "attention_flop_reduction_with_predictor":
          1 - (flops["sparse"] + flops["predictor"]) / flops["dense"],
  }


def train_and_evaluate(config, workdir: str,
                       allow_config_change: bool = False) -> dict:
  """Runs the three phases (resuming from `workdir`) and evaluates.

  Args:
    config: the training config.
    workdir: the run's directory; resumed from if it holds checkpoints.
    allow_config_change: resume even if the workdir's config.json
      differs (the change is recorded).

  Returns:
    The evaluation results.
  """
  loop_lib.check_settings(config, "teacher_steps", "phase1_steps",
                          "phase2_steps")
  workdir = workdir_lib.prepare(workdir, config, allow_config_change)

  # ---------------------------------------------------------------- data --
  digits = Digits(config)

  # ------------------------------------------------- models + optimizers --
  state = TrainState(config)
  steps = make_steps(config)
  ends = np.cumsum([config.teacher_steps, config.phase1_steps,
                    config.phase2_steps])
  total = int(ends[-1])

  # ------------------------------------------ checkpoints, resume, loop --
  loop = loop_lib.Loop(workdir, {"state": state}, total,
                       keep_checkpoints=config.keep_checkpoints,
                       log_every=config.log_every,
                       checkpoint_every=config.checkpoint_every,
                       boundaries=ends)

  def step_fn(step):
    phase = int(np.searchsorted(ends, step, side="right"))
    if step == ends[0]:  # the students start from the teacher's weights
      for student in (state.student, state.random_student):
        nnx.update(student, nnx.state(state.teacher, nnx.Param))
    images, labels = digits.batch(step, config.batch_size, config.seed)
    return {**steps[phase](state, images, labels), "train/phase": phase}

  step = loop.run(step_fn)

  # ---------------------------------------------------------- evaluate --
  results = evaluate(state, digits, config)
  loop.writer.write(step, {f"eval/{k}": v for k, v in results.items()
                           if isinstance(v, float)})
  loop.summary(results=report.write_results(workdir, results))
  return results


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(report.quiet_orbax)
  logging.info("jax %s, devices %s", jax.__version__, jax.devices())
  logging.info("config:\n%s", _CONFIG.value)
  results = train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                               workdir_lib.ALLOW_CONFIG_CHANGE.value)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
