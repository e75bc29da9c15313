r"""Video-BLADE's sparsity-aware step distillation (TDM) on a digits DiT.

Video-BLADE: https://arxiv.org/abs/2508.10774; TDM (Trajectory Distribution
Matching): https://arxiv.org/abs/2503.06674.

  python train/blade_distill.py --workdir=workdir/blade_distill
  python train/blade_distill.py --config.tdm.fake_attention=blade

Phases on one global step counter: (0) a dense pixel-space DiT teacher is
trained with rectified flow on digits; (1) a K-step student with ASA
attention (BLADE's adaptive block-sparse + pooled global branch) and a fake
score model, both initialised from the teacher, are trained data-free with
TDM in the flow parameterisation (x0_hat = x - sigma v): the student's own
eta-stochastic trajectory gives x_u; the generator regresses x0_hat =
G(x_u) onto sg(x0_hat + r - f) with a normalised pseudo-Huber loss, where r
and f are the teacher's and fake score's x0 predictions at a detached x_t
re-noised from x0_hat; the fake score fits the student's samples by flow
matching. Adam beta1 = 0. Then digit-feature Frechet distances (to real
digits) of the many-step dense teacher, the K-step teacher, the K-step
teacher with training-free ASA and the distilled K-step ASA student, and the
CPU sampling speedup, go to results.json; sample grids to samples.png.
"""

from __future__ import annotations

import importlib
import json
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
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from jsparse.methods import blade
from jsparse.models import dit
from train.lib import data as data_lib
from train.lib import flow
from train.lib import loop as loop_lib
from train.lib import report
from train.lib import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs",
                           "blade_distill.py"),
    "Training config (ml_collections); override fields with --config.x=y.",
    lock_config=True, allow_override=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdir", "blade_distill"),
    "Checkpoints, metrics.jsonl, results.json and samples.png go here.",
    allow_override=True)
flags.adopt_module_key_flags(workdir_lib)  # --allow_config_change

_T = flow.NUM_TRAIN_TIMESTEPS


def model_config(config, attention: str) -> dit.DiTConfig:
  """A DiTConfig with dense or ASA ("blade") attention."""
  m, a = config.model, config.asa
  method_config = None
  if attention == "blade":
    method_config = blade.BladeConfig(
        block_size=a.block_size, samples=a.samples, mass=a.mass,
        min_fraction=a.min_fraction, max_fraction=a.max_fraction,
        pool_size=a.pool_size)
  return dit.DiTConfig(
      image_size=config.data.image_size, in_channels=1,
      hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
      mlp_ratio=m.mlp_ratio, attention=attention,
      method_config=method_config, implementation=a.implementation)


class TrainState(nnx.Module):
  """Teacher, ASA student, fake score and their optimizers."""

  def __init__(self, config):
    o = config.optim
    seed = config.seed
    self.teacher = dit.DiT(model_config(config, "dense"),
                           rngs=nnx.Rngs(seed))
    self.student = dit.DiT(model_config(config, "blade"),
                           rngs=nnx.Rngs(seed))
    self.fake = dit.DiT(model_config(config, config.tdm.fake_attention),
                        rngs=nnx.Rngs(seed))

    def adam(lr, b1=o.b1):
      return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                         optax.adamw(lr, b1=b1, b2=o.b2, weight_decay=0.0))

    self.teacher_opt = nnx.Optimizer(self.teacher, adam(o.teacher_lr, 0.9),
                                     wrt=nnx.Param)
    self.student_opt = nnx.Optimizer(self.student, adam(o.student_lr),
                                     wrt=nnx.Param)
    self.fake_opt = nnx.Optimizer(self.fake, adam(o.fake_lr), wrt=nnx.Param)


# ------------------------------------------------------------------ TDM --


def x0_prediction(model, x, sigma):
  """x0_hat = x - sigma v(x, 1000 sigma); sigma [B]."""
  v = model(x, sigma * _T).astype(jnp.float32)
  return x - sigma[:, None, None, None] * v


def student_sigmas(num_steps: int) -> jax.Array:
  """[K + 1] levels: tau_i = 999 - i 1000 / K (as sigma), then 0."""
  tau = (_T - 1) - np.arange(num_steps) * _T / num_steps
  return jnp.asarray(np.append(tau / _T, 0.0), jnp.float32)


def renoise(x0, eps_hat, sigma, eta, key):
  """(1 - s) x0 + s (eta eps_hat + sqrt(1 - eta^2) xi), s [B]."""
  s = sigma[:, None, None, None]
  noise = eta * eps_hat + jnp.sqrt(1 - eta**2) * jax.random.normal(
      key, x0.shape)
  return (1 - s) * x0 + s * noise


def implied_noise(x, x0, sigma):
  s = jnp.maximum(sigma, 1e-4)[:, None, None, None]
  return (x - (1 - s) * x0) / s


def student_trajectory(model, noise, num_steps: int, eta: float, key):
  """The student's K-step eta-stochastic sampler (no gradient).

  Returns:
    (states [K, B, R, R, C] x_{tau_i} fed to the model, final x0 samples).
  """
  sigmas = student_sigmas(num_steps)
  b = noise.shape[0]

  def step(x, inputs):
    sigma, sigma_next, k = inputs
    s = jnp.full((b,), sigma)
    x0 = x0_prediction(model, x, s)
    nxt = renoise(x0, implied_noise(x, x0, s), jnp.full((b,), sigma_next),
                  eta, k)
    return nxt, (x, x0)

  keys = jax.random.split(key, num_steps)
  _, (states, x0s) = jax.lax.scan(step, noise, (sigmas[:-1], sigmas[1:],
                                                 keys))
  return jax.lax.stop_gradient(states), jax.lax.stop_gradient(x0s[-1])


def diffuse(x_mid, sigma_mid, sigma_t, key):
  """Rectified-flow forward transition from sigma_mid to sigma_t >= it."""
  a = ((1 - sigma_t) / (1 - sigma_mid))[:, None, None, None]
  std = jnp.sqrt(jnp.maximum(
      sigma_t**2 - (sigma_mid * (1 - sigma_t) / (1 - sigma_mid))**2, 0.0))
  return a * x_mid + std[:, None, None, None] * jax.random.normal(
      key, x_mid.shape)


def generator_loss(x0, real, fake, *, huber_c: float, weight_clip: float):
  """TDM's normalised pseudo-Huber loss towards sg(x0 + r - f).

  Args:
    x0: [B, ...] the generator's x0 prediction (with gradient).
    real: [B, ...] the teacher's x0 prediction at x_t.
    fake: [B, ...] the fake score's x0 prediction at x_t.
    huber_c: the pseudo-Huber constant c.
    weight_clip: the normaliser w = mean |x0 - r| is clipped at it.

  Returns:
    f32 scalar mean((sqrt((x0 - y)^2 + c^2) - c) / w).
  """
  axes = tuple(range(1, x0.ndim))
  target = jax.lax.stop_gradient(x0 + real - fake)
  w = jax.lax.stop_gradient(jnp.clip(
      jnp.mean(jnp.abs(x0 - real), axes, keepdims=True), 1e-6, weight_clip))
  return jnp.mean((jnp.sqrt((x0 - target)**2 + huber_c**2) - huber_c) / w)


def make_steps(config):
  """The jitted teacher (flow matching) and TDM steps."""
  c = config.tdm
  k_steps = c.student_steps
  sigmas = student_sigmas(k_steps)

  @nnx.jit
  def teacher_step(state, images, step):
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    loss, grads = nnx.value_and_grad(
        lambda m: flow.loss_fn(m, images, key))(state.teacher)
    state.teacher_opt.update(state.teacher, grads)
    return {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)}

  @nnx.jit
  def tdm_step(state, images, step):
    b = images.shape[0]
    shape = images.shape
    keys = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed + 1), step), 8)
    # Student trajectory (no grad) and the training point u.
    states, _ = student_trajectory(state.student, jax.random.normal(
        keys[0], shape), k_steps, c.eta, keys[1])
    u = jax.random.randint(keys[2], (b,), 0, k_steps)
    x_u = states[u, jnp.arange(b)]
    sigma_g, sigma_mid = sigmas[u], sigmas[u + 1]
    sigma_t = sigma_mid + (c.t_max - sigma_mid) * jax.random.uniform(
        keys[3], (b,))

    # Generator step: one x0 forward carries the gradient.
    def gen_loss(student):
      x0 = x0_prediction(student, x_u, sigma_g)
      x0_sg = jax.lax.stop_gradient(x0)
      x_mid = renoise(x0_sg, implied_noise(x_u, x0_sg, sigma_g), sigma_mid,
                      c.eta, keys[4])
      x_t = jax.lax.stop_gradient(diffuse(x_mid, sigma_mid, sigma_t,
                                          keys[5]))
      real = jax.lax.stop_gradient(x0_prediction(state.teacher, x_t,
                                                  sigma_t))
      fake = jax.lax.stop_gradient(x0_prediction(state.fake, x_t, sigma_t))
      loss = generator_loss(x0, real, fake, huber_c=c.huber_c,
                            weight_clip=c.weight_clip)
      return loss, x0_sg

    (g_loss, x0), g_grads = nnx.value_and_grad(gen_loss, has_aux=True)(
        state.student)
    state.student_opt.update(state.student, g_grads)

    # Fake-score step: flow matching on the student's samples.
    def fake_loss(fake):
      noise = jax.random.normal(keys[6], shape)
      s = jax.random.uniform(keys[7], (b,), minval=1e-3, maxval=1.0)
      x_t = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
      v = fake(x_t, s * _T).astype(jnp.float32)
      loss = jnp.mean((v - (noise - x0))**2)
      if c.reg_weight:
        v_t = jax.lax.stop_gradient(state.teacher(x_t, s * _T))
        loss += c.reg_weight * jnp.mean((v - v_t)**2)
      return loss

    f_loss, f_grads = nnx.value_and_grad(fake_loss)(state.fake)
    state.fake_opt.update(state.fake, f_grads)
    return {"train/loss": g_loss, "train/fake_loss": f_loss,
            "train/grad_norm": optax.global_norm(g_grads)}

  return teacher_step, tdm_step


# ------------------------------------------------------------ evaluation --


def sample_student(model, key, shape, num_steps: int, eta: float):
  """K-step student samples in [0, 1]."""
  k0, k1 = jax.random.split(key)
  _, x0 = student_trajectory(model, jax.random.normal(k0, shape), num_steps,
                             eta, k1)
  return jnp.clip(x0 / 2 + 0.5, 0.0, 1.0)


def timed(fn, *args):
  """(result, seconds of the second call): the first call compiles."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def _frechet_module():
  """eval/frechet_digits.py, imported after our flags were read.

  It imports train/llsa_dit.py, whose module-level config flag parses
  sys.argv when defined; it is shown no arguments (ours are not its).
  """
  argv = sys.argv
  sys.argv = argv[:1]
  try:
    return importlib.import_module("eval.frechet_digits")
  finally:
    sys.argv = argv


def evaluate(state, digits, config, workdir: str) -> dict:
  """Frechet distances to real digits, samplers' CPU times, a grid."""
  c, e = config.tdm, config.eval
  shape = (e.num_samples, config.data.image_size, config.data.image_size, 1)
  key = jax.random.key(e.seed)
  asa_teacher = dit.DiT(model_config(config, "blade"), rngs=nnx.Rngs(0))
  nnx.update(asa_teacher, nnx.state(state.teacher))
  euler = lambda steps: nnx.jit(
      lambda m: flow.sample(m, key, shape, steps))
  samplers = {
      f"teacher_dense_{e.teacher_steps}step": (euler(e.teacher_steps),
                                               state.teacher),
      f"teacher_dense_{c.student_steps}step": (euler(c.student_steps),
                                               state.teacher),
      f"teacher_asa_{c.student_steps}step_training_free": (
          euler(c.student_steps), asa_teacher),
      f"student_asa_{c.student_steps}step_tdm": (nnx.jit(
          lambda m: sample_student(m, key, shape, c.student_steps, c.eta)),
                                                 state.student),
  }
  frechet_digits = _frechet_module()
  real = (digits.images + 1.0) / 2.0
  classifier, accuracy = frechet_digits.train_classifier(real, digits.labels)
  features = nnx.jit(lambda m, x: m.features(x))
  real_feats = np.asarray(features(classifier, jnp.asarray(real)))
  results = {"classifier_accuracy": accuracy, "num_samples": e.num_samples,
             "frechet_to_real": {}, "sampling_seconds": {}}
  grids = []
  teacher_feats = None
  for name, (sampler, model) in samplers.items():
    images, seconds = timed(sampler, model)
    feats = np.asarray(features(classifier, images))
    teacher_feats = feats if teacher_feats is None else teacher_feats
    results["frechet_to_real"][name] = frechet_digits.frechet_distance(
        real_feats, feats)
    results["sampling_seconds"][name] = seconds
    if name.startswith("student"):
      results["frechet_student_to_teacher_many_step"] = (
          frechet_digits.frechet_distance(teacher_feats, feats))
    grids.append(np.asarray(images[:16]))
  times = list(results["sampling_seconds"].values())
  results["speedup_student_vs_teacher_many_step_cpu"] = times[0] / times[-1]
  results["speedup_student_vs_teacher_few_step_cpu"] = times[1] / times[-1]
  probe = jnp.asarray(digits.images[:8])
  sparsity = nnx.jit(lambda m, x: _asa_sparsity(m, x))(state.student, probe)
  results["asa_sparsity_first_layer"] = float(sparsity)
  report.save_image_grid(np.concatenate(grids), os.path.join(
      workdir, "samples.png"), columns=16, upscale=4)
  results["sample_rows"] = list(samplers)
  return results


def _asa_sparsity(model, images):
  """The paper's 1 - mean(M) - 1/n of the first block's attention."""
  block = model.blocks[0]
  x = model.proj_in(images.reshape(images.shape[0], -1, 1))
  perm, _, angles = dit.token_tables(model.config.image_size,
                                     model.config.head_dim,
                                     model.config.rope_theta,
                                     model.config.token_permutation)
  x = x[:, perm] if perm is not None else x
  attn = block.attn
  b, n, _ = x.shape
  q, k, v = jnp.split(attn.qkv(x).reshape(b, n, 3 * attn.num_heads,
                                          attn.head_dim), 3, axis=2)
  q = dit.apply_rope(attn.norm_q(q), jnp.asarray(angles))
  k = dit.apply_rope(attn.norm_k(k), jnp.asarray(angles))
  return attn.method.plan(q, k, v).aux["sparsity"]


# ------------------------------------------------------------------ main --


def train_and_evaluate(config, workdir: str,
                       allow_config_change: bool = False) -> dict:
  """Trains the teacher, distils the student (resuming), evaluates.

  Args:
    config: the training config.
    workdir: the run's directory; resumed from if it holds checkpoints.
    allow_config_change: resume even if the workdir's config.json
      differs (the change is recorded).

  Returns:
    The evaluation results.
  """
  loop_lib.check_settings(config, "teacher_steps", "distill_steps")
  workdir = workdir_lib.prepare(workdir, config, allow_config_change)

  # ---------------------------------------------------------------- data --
  digits = data_lib.DigitsDataset(config.data.image_size, channels=1)

  # ------------------------------------------------- models + optimizers --
  state = TrainState(config)
  steps = make_steps(config)
  ends = np.cumsum([config.teacher_steps, config.distill_steps])
  total = int(ends[-1])

  # ------------------------------------------ checkpoints, resume, loop --
  loop = loop_lib.Loop(workdir, {"state": state}, total,
                       keep_checkpoints=config.keep_checkpoints,
                       log_every=config.log_every,
                       checkpoint_every=config.checkpoint_every,
                       boundaries=ends)

  def step_fn(step):
    phase = int(np.searchsorted(ends, step, side="right"))
    if step == ends[0]:  # student and fake score start from the teacher
      params = nnx.state(state.teacher, nnx.Param)
      nnx.update(state.student, params)
      nnx.update(state.fake, params)
    images = jnp.asarray(data_lib.local_batch(digits, step,
                                              config.batch_size,
                                              config.seed))
    metrics = steps[phase](state, images, jnp.int32(step))
    return {**metrics, "train/phase": phase}

  step = loop.run(step_fn)

  # ---------------------------------------------------------- evaluate --
  results = evaluate(state, digits, config, workdir)
  loop.writer.write(step, {f"eval/fd_{k}": v
                           for k, v in results["frechet_to_real"].items()})
  loop.summary(results=report.write_results(workdir, results),
               samples=os.path.join(workdir, "samples.png"))
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
