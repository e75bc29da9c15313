r"""SEA estimator distillation on a small byte LM, with sparse baselines.

SEA: https://arxiv.org/abs/2310.01777.

  python train/sea_distill.py --workdir=workdir/sea_distill
  python train/sea_distill.py --config.sea.topk=8 --config.distill_steps=400

Phases on one global step counter: (0) a dense causal LM (the teacher) is
trained on Shakespeare bytes; (1) a copy of it gets one SEA estimator per
layer and is distilled with the paper's losses, 0.1 L_LM + 5 mean MSE(h_S,
h_T) + 0.2 KL(logits_T || logits_S) + mean_layers (L_est + L_att + L_ctx),
estimator learning rate x10; (2, 3) sliding-window and linear (ReLU random
feature) attention students at the same per-query budget get the same logit
and hidden distillation. Validation perplexities of all of them, the teacher
attention mass inside SEA's mask vs an oracle top-k and the window, and a
PNG of an estimated vs true attention map go to --workdir (results.json,
attention_map.png). Resumes from the latest checkpoint; SIGTERM saves the
finished step and exits 143.
"""

from __future__ import annotations

import json
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
import jax
import jax.numpy as jnp
import matplotlib
from ml_collections import config_flags
import numpy as np
import optax

from jsparse.methods import base
from jsparse.methods import sea
from jsparse.models import lm
from pallas_kernels import layout as layout_lib
from train.lib import loop as loop_lib
from train.lib import report
from train.lib import text_data
from train.lib import workdir as workdir_lib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs",
                           "sea_distill.py"),
    "Training config (ml_collections); override fields with --config.x=y.",
    lock_config=True, allow_override=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdir", "sea_distill"),
    "Checkpoints, metrics.jsonl, results.json and the map PNG go here.",
    allow_override=True)
flags.adopt_module_key_flags(workdir_lib)  # --allow_config_change

STUDENTS = ("sea", "window", "linear")


def lm_config(config) -> lm.LMConfig:
  m = config.model
  return lm.LMConfig(num_layers=m.num_layers, d_model=m.d_model,
                     num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                     mlp_hidden=m.mlp_hidden, block_size=m.block_size)


def sea_config(config) -> sea.SEAConfig:
  s = config.sea
  return sea.SEAConfig(causal=True, predictor_len=s.predictor_len,
                       topk=s.topk, feature_divisor=s.feature_divisor,
                       max_positions=config.seq_len, output=s.output)


# ------------------------------------------------------ attention cores --


def _repeat_kv(x, num_heads):
  return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def dense_core(q, k, v):
  """Causal softmax attention with its probabilities [B, H, T, T]."""
  h, t = q.shape[2], q.shape[1]
  k, v = _repeat_kv(k, h), _repeat_kv(v, h)
  scores = jnp.einsum("bthd,bshd->bhts", q, k,
                      preferred_element_type=jnp.float32)
  causal = jnp.tril(jnp.ones((1, 1, t, t), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores / math.sqrt(q.shape[-1]),
                                   -jnp.inf), -1)
  out = jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32))
  return out.astype(v.dtype), {"probs": probs}


def window_core(window: int, block: int):
  """Causal sliding window of `window` keys on the block-sparse op."""
  def core(q, k, v):
    t = q.shape[1]
    layout = layout_lib.BlockLayout.local(
        t, window=(window - 1, 0), block_q=min(block, t),
        block_kv=min(block, t))
    return base.SparsePlan(layout=layout).attend(q, k, v), {}
  return core


def linear_core(omega: jax.Array):
  """Causal linear attention with ReLU random features phi = relu(x W^T).

  Args:
    omega: [F, D] fixed random projections (F features per head).
  """
  def core(q, k, v):
    h = q.shape[2]
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    scale = q.shape[-1] ** -0.25
    fq = jax.nn.relu(jnp.einsum("bthd,fd->bthf", q * scale, omega)) + 1e-3
    fk = jax.nn.relu(jnp.einsum("bthd,fd->bthf", k * scale, omega)) + 1e-3
    kv = jnp.cumsum(jnp.einsum("bthf,bthd->bthfd", fk, v), axis=1)
    num = jnp.einsum("bthf,bthfd->bthd", fq, kv)
    den = jnp.einsum("bthf,bthf->bth", fq, jnp.cumsum(fk, axis=1))
    return (num / den[..., None]).astype(v.dtype), {}
  return core


def sea_core(estimators):
  """Per-layer SEA (plan, sparse attention, gated mix) with its aux."""
  def core(layer, q, k, v):
    method = estimators[layer]
    plan = method.plan(q, k, v)
    out = method.mix(plan, plan.attend(q, k, v), v)
    return out, {"logits": plan.aux["logits"], "q": q, "k": k,
                 "selected": plan.aux["selected"]}
  return core


def forward(model: lm.LM, tokens: jax.Array, core):
  """The LM with its attention core replaced by `core`.

  Args:
    model: the LM whose projections, norms, MLPs and embeddings are used.
    tokens: int [B, T].
    core: (q, k, v) -> (out [B, T, H, D], aux), or (layer, q, k, v) -> ...
      when it takes a layer index.

  Returns:
    logits f32 [B, T, V], per-layer hidden states [B, T, F], per-layer aux
    dicts (with "ctx", the merged-head context [B, T, H, D]).
  """
  takes_layer = core.__code__.co_argcount == 4
  x = model.embed(tokens)
  hidden, auxes = [], []
  for i, block in enumerate(model.blocks):
    attn = block.attn
    cfg = attn.config
    b, t, _ = x.shape
    h = block.attn_norm(x)
    q = attn.q_norm(attn.q_proj(h).reshape(b, t, cfg.num_heads,
                                           cfg.head_dim))
    k = attn.k_norm(attn.k_proj(h).reshape(b, t, cfg.num_kv_heads,
                                           cfg.head_dim))
    v = attn.v_proj(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = lm.rope(q, cfg.rope_theta), lm.rope(k, cfg.rope_theta)
    out, aux = core(i, q, k, v) if takes_layer else core(q, k, v)
    x = x + attn.o_proj(out.reshape(b, t, -1))
    x = x + block.mlp(block.mlp_norm(x))
    hidden.append(x)
    auxes.append({**aux, "ctx": out})
  return model.embed.attend(model.norm(x)).astype(jnp.float32), hidden, auxes


# ---------------------------------------------------------------- losses --


def logit_kl(student_logits, teacher_logits):
  """KL(teacher || student) per token, averaged over tokens."""
  log_t = jax.nn.log_softmax(teacher_logits, -1)
  log_s = jax.nn.log_softmax(student_logits, -1)
  return jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1))


def kd_loss(config, logits, hidden, t_logits, t_hidden, targets):
  """0.1 L_LM + 5 mean_layers MSE(h_S, h_T) + 0.2 KL(logits_T || logits_S)."""
  w = config.loss
  ce = lm.cross_entropy(logits, targets)
  mse = sum(jnp.mean((a - b)**2) for a, b in zip(hidden, t_hidden))
  mse = mse / len(hidden)
  kl = logit_kl(logits, t_logits)
  total = w.lm_weight * ce + w.hidden_weight * mse + w.kl_weight * kl
  return total, {"train/ce": ce, "train/hidden_mse": mse, "train/kl": kl}


def sea_layer_loss(aux, t_aux):
  """L_est + L_att + L_ctx of one layer."""
  probs = t_aux["probs"]
  q, k = aux["q"], _repeat_kv(aux["k"], aux["q"].shape[2])
  return (sea.estimator_loss(aux["logits"], probs, True)
          + sea.attention_loss(q, k, probs, True)
          + sea.context_loss(aux["ctx"], t_aux["ctx"]))


# ----------------------------------------------------------------- state --


def schedule(peak, steps, config):
  o = config.optim
  steps = max(steps, 1)
  warmup = int(o.warmup_fraction * steps)
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(steps, warmup + 1), peak * o.end_lr_ratio)


def adamw(peak, steps, config):
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(schedule(peak, steps, config), weight_decay=o.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))


def _labels(params):
  """"estimator" for SEA estimator parameters, "backbone" otherwise."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "estimator" if any(
          getattr(key, "key", None) == "estimators" for key in path)
      else "backbone", params)


class SEAStudent(nnx.Module):
  """An LM (initialised from the teacher) plus one SEA module per layer."""

  def __init__(self, config, rngs: nnx.Rngs):
    model_config = lm_config(config)
    self.lm = lm.LM(model_config, rngs=rngs)
    self.estimators = nnx.List([
        sea.SEAMethod(sea_config(config), model_config.num_heads,
                      model_config.head_dim, rngs=rngs)
        for _ in range(model_config.num_layers)])


class TrainState(nnx.Module):
  """Teacher, the three students and their optimizers."""

  def __init__(self, config):
    o, seed = config.optim, config.seed
    self.teacher = lm.LM(lm_config(config), rngs=nnx.Rngs(seed))
    self.sea = SEAStudent(config, nnx.Rngs(seed + 1))
    self.window = lm.LM(lm_config(config), rngs=nnx.Rngs(seed))
    self.linear = lm.LM(lm_config(config), rngs=nnx.Rngs(seed))
    self.teacher_opt = nnx.Optimizer(
        self.teacher, adamw(o.teacher_lr, config.teacher_steps, config),
        wrt=nnx.Param)
    lr = o.distill_lr
    self.sea_opt = nnx.Optimizer(self.sea, optax.multi_transform({
        "backbone": adamw(lr, config.distill_steps, config),
        "estimator": adamw(lr * o.estimator_lr_multiplier,
                           config.distill_steps, config)}, _labels),
                                 wrt=nnx.Param)
    self.window_opt = nnx.Optimizer(
        self.window, adamw(lr, config.baseline_steps, config), wrt=nnx.Param)
    self.linear_opt = nnx.Optimizer(
        self.linear, adamw(lr, config.baseline_steps, config), wrt=nnx.Param)


def linear_features(config) -> jax.Array:
  """The linear baseline's fixed [F = topk, D] random projections."""
  d = config.model.d_model // config.model.num_heads
  return jax.random.normal(jax.random.key(config.seed + 7),
                           (config.sea.topk, d))


def make_steps(config):
  """The jitted step of each phase (teacher, sea, window, linear)."""
  window = window_core(config.sea.topk, config.model.block_size)
  linear = linear_core(linear_features(config))

  @nnx.jit
  def teacher_step(state, inputs, targets):
    loss, grads = nnx.value_and_grad(lambda m: lm.cross_entropy(
        m(inputs), targets))(state.teacher)
    state.teacher_opt.update(state.teacher, grads)
    return {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)}

  def teacher_targets(state, inputs):
    t_logits, t_hidden, t_aux = forward(state.teacher, inputs, dense_core)
    return jax.lax.stop_gradient((t_logits, t_hidden, t_aux))

  @nnx.jit
  def sea_step(state, inputs, targets):
    t_logits, t_hidden, t_aux = teacher_targets(state, inputs)

    def loss_fn(student):
      logits, hidden, aux = forward(student.lm, inputs,
                                    sea_core(student.estimators))
      kd, parts = kd_loss(config, logits, hidden, t_logits, t_hidden,
                          targets)
      special = sum(sea_layer_loss(a, t) for a, t in zip(aux, t_aux))
      special = special / len(aux)
      return kd + special, {**parts, "train/special": special}

    (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        state.sea)
    state.sea_opt.update(state.sea, grads)
    return {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
            **parts}

  def baseline_step(name, core):
    @nnx.jit
    def step(state, inputs, targets):
      t_logits, t_hidden, _ = teacher_targets(state, inputs)

      def loss_fn(student):
        logits, hidden, _ = forward(student, inputs, core)
        return kd_loss(config, logits, hidden, t_logits, t_hidden, targets)

      model, opt = getattr(state, name), getattr(state, name + "_opt")
      (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      opt.update(model, grads)
      return {"train/loss": loss,
              "train/grad_norm": optax.global_norm(grads), **parts}
    return step

  return (teacher_step, sea_step, baseline_step("window", window),
          baseline_step("linear", linear))


# ------------------------------------------------------------ evaluation --


@nnx.jit(static_argnums=(2,))
def _eval_losses(state, tokens, window: int):
  """Per-model mean NLL and SEA's mask statistics on one batch."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  t_logits, _, t_aux = forward(state.teacher, inputs, dense_core)
  s_logits, _, s_aux = forward(state.sea.lm, inputs,
                               sea_core(state.sea.estimators))
  results = {"dense": lm.cross_entropy(t_logits, targets),
             "sea": lm.cross_entropy(s_logits, targets)}
  block = state.teacher.config.block_size
  for name, model, core in (
      ("window_zero_shot", state.teacher, window_core(window, block)),
      ("window", state.window, window_core(window, block))):
    results[name] = lm.cross_entropy(forward(model, inputs, core)[0],
                                     targets)
  stats = {"kl": [], "sea_mass": [], "oracle_mass": [], "window_mass": [],
           "keys": []}
  t = inputs.shape[1]
  causal = jnp.tril(jnp.ones((1, 1, t, t), bool))
  band = causal & ~jnp.tril(jnp.ones((1, 1, t, t), bool), -window)
  for aux, ta in zip(s_aux, t_aux):
    probs = ta["probs"]
    mask = sea.element_mask(aux["selected"], t, True)
    logp = jax.nn.log_softmax(sea.stretched_logits(aux["logits"], True), -1)
    kl = jnp.sum(jnp.where(probs > 0, probs * (jnp.log(
        jnp.where(probs > 0, probs, 1.0)) - logp), 0.0), -1)
    keys = mask.sum(-1)  # per-row budget of the oracle: SEA's own count
    ranks = jnp.argsort(jnp.argsort(-probs, -1), -1)
    oracle = ranks < keys[..., None]
    stats["kl"].append(kl.mean())
    stats["sea_mass"].append(jnp.sum(probs * mask, -1).mean())
    stats["oracle_mass"].append(jnp.sum(probs * oracle, -1).mean())
    stats["window_mass"].append(jnp.sum(probs * band, -1).mean())
    stats["keys"].append(keys.mean())
  return results, {k: jnp.mean(jnp.stack(v)) for k, v in stats.items()}


def evaluate(state, eval_tokens, config) -> dict:
  """Validation perplexities and SEA's mask statistics."""
  linear = nnx.jit(lambda m, x: lm.cross_entropy(
      forward(m, x[:, :-1], linear_core(linear_features(config)))[0],
      x[:, 1:]))
  sums, n = {}, 0
  for i in range(0, len(eval_tokens), config.batch_size):
    batch = jnp.asarray(eval_tokens[i:i + config.batch_size])
    losses, stats = _eval_losses(state, batch, config.sea.topk)
    losses = {**losses, "linear": linear(state.linear, batch)}
    for key, val in {**losses, **stats}.items():
      sums[key] = sums.get(key, 0.0) + float(val) * len(batch)
    n += len(batch)
  mean = {k: v / n for k, v in sums.items()}
  models = ("dense", "sea", "window", "window_zero_shot", "linear")
  return {
      "perplexity": {m: math.exp(mean[m]) for m in models},
      "kl_teacher_vs_estimate": mean["kl"],
      "teacher_mass_in_mask": {"sea": mean["sea_mass"],
                               "oracle_topk_same_count": mean["oracle_mass"],
                               "window": mean["window_mass"]},
      "sea_keys_per_query": mean["keys"],
      "window_keys_per_query": config.sea.topk,
      "linear_features": config.sea.topk,
      "seq_len": config.seq_len,
  }


def plot_attention(state, tokens, config, path: str) -> None:
  """Teacher map, SEA's estimate stretched to T and its mask (one head)."""
  layer, head = config.plot.layer, config.plot.head
  inputs = jnp.asarray(tokens[:1, :-1])
  _, _, t_aux = nnx.jit(lambda m, x: forward(m, x, dense_core))(
      state.teacher, inputs)
  _, _, s_aux = nnx.jit(lambda s, x: forward(s.lm, x, sea_core(
      s.estimators)))(state.sea, inputs)
  t = inputs.shape[1]
  true = np.asarray(t_aux[layer]["probs"][0, head])
  est = np.asarray(jax.nn.softmax(sea.stretched_logits(
      s_aux[layer]["logits"], True), -1)[0, head])
  mask = np.asarray(sea.element_mask(s_aux[layer]["selected"], t,
                                     True)[0, head])
  fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
  vmax = np.quantile(true[np.tril(np.ones((t, t), bool))], 0.99)
  for ax, img, title in ((axes[0], true, "teacher attention"),
                         (axes[1], est, "SEA estimate (stretched to T)"),
                         (axes[2], mask, "SEA mask")):
    ax.imshow(img, cmap="viridis", vmin=0,
              vmax=1 if img is mask else vmax, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("key")
  axes[0].set_ylabel("query")
  fig.suptitle(f"layer {layer}, head {head}, T={t}, T_M="
               f"{config.sea.predictor_len}, k={config.sea.topk}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------ main --


def train_and_evaluate(config, workdir: str,
                       allow_config_change: bool = False) -> dict:
  """Runs the four phases (resuming from `workdir`) and evaluates.

  Args:
    config: the training config.
    workdir: the run's directory; resumed from if it holds checkpoints.
    allow_config_change: resume even if the workdir's config.json
      differs (the change is recorded).

  Returns:
    The evaluation results.
  """
  loop_lib.check_settings(config, "teacher_steps", "distill_steps",
                          "baseline_steps")
  workdir = workdir_lib.prepare(workdir, config, allow_config_change)

  # ---------------------------------------------------------------- data --
  data_dir = config.data.data_dir or text_data.default_data_dir()
  plays = text_data.load_plays(text_data.fetch(data_dir))
  train_bytes, val_bytes, _ = text_data.split_plays(plays,
                                                    config.data.val_every)
  eval_tokens = text_data.eval_windows(val_bytes, config.data.eval_windows,
                                       config.seq_len + 1)

  # ------------------------------------------------- models + optimizers --
  state = TrainState(config)
  steps = make_steps(config)
  ends = np.cumsum([config.teacher_steps, config.distill_steps,
                    config.baseline_steps, config.baseline_steps])
  total = int(ends[-1])

  # ------------------------------------------ checkpoints, resume, loop --
  loop = loop_lib.Loop(workdir, {"state": state}, total,
                       keep_checkpoints=config.keep_checkpoints,
                       log_every=config.log_every,
                       checkpoint_every=config.checkpoint_every,
                       boundaries=ends)

  def step_fn(step):
    phase = int(np.searchsorted(ends, step, side="right"))
    if step == ends[0]:  # every student starts from the teacher's weights
      params = nnx.state(state.teacher, nnx.Param)
      for model in (state.sea.lm, state.window, state.linear):
        nnx.update(model, params)
    x = text_data.random_windows(train_bytes, step, config.batch_size,
                                 config.seq_len + 1, config.seed)
    metrics = steps[phase](state, jnp.asarray(x[:, :-1]),
                           jnp.asarray(x[:, 1:]))
    return {**metrics, "train/phase": phase}

  step = loop.run(step_fn)

  # ---------------------------------------------------------- evaluate --
  results = evaluate(state, eval_tokens, config)
  loop.writer.write(step, {f"eval/perplexity_{k}": v
                           for k, v in results["perplexity"].items()})
  plot_attention(state, eval_tokens, config,
                 os.path.join(workdir, "attention_map.png"))
  loop.summary(results=report.write_results(workdir, results),
               attention_map=os.path.join(workdir, "attention_map.png"))
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
