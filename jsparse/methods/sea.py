"""SEA: sparse linear attention with an estimated attention mask.

Paper: "SEA: Sparse Linear Attention with Estimated Attention Mask",
https://arxiv.org/abs/2310.01777 (ICLR 2024; code: gmlwns2000/sea-attention).

A kernel (Performer) linear attention whose values carry a positional code
feeds a small encoder and a CNN decoder that predict a compressed attention
map of fixed width T_M per query (logits S_hat [B, H, T, T_M]). A top-k over
the compressed cells, with the budget shared across heads, is stretched
back to the key axis (key j of a row with visible length L owns cell
floor((j + 0.5) T_M / L - 1e-4)) and becomes an element mask; exact softmax
attention runs on the kept entries (tile pool of the layout). Two gates
scale the sparse output and mix it with an average of the values. The
compressed map is returned in `plan.aux["estimate"]` for interpretability,
and the distillation losses are functions of it (the training loop lives
elsewhere).
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse.methods import base
from pallas_kernels import layout as layout_lib

_BIG = 1e9


@dataclasses.dataclass(frozen=True)
class SEAConfig:
  """SEA hyperparameters (defaults: the OPT causal setting).

  Attributes:
    causal: OPT-style causal LM (True) or BERT-style encoder (False).
    predictor_len: T_M, the compressed key width.
    topk: k, average kept keys per query per head.
    feature_divisor: nbf; the Performer has floor(D ln D / nbf) features.
    max_positions: rows of the learned positional table (causal).
    width_divisor: d, the CNN works at width T_M / d (4 causal, 2 not).
    channels_per_head: s, CNN channels per head (2 causal, 4 not).
    output: "mix" (gated sparse output mixed with the value average) or
      "sparse" (the plain sparse attention output).
    block_size: the layout's q and kv block.
    max_kv_blocks: optional static cap of kv blocks per query block
      (default: all; rows with more are truncated).
  """

  causal: bool = True
  predictor_len: int = 256
  topk: int = 64
  feature_divisor: int = 8
  max_positions: int = 2048
  width_divisor: int = 4
  channels_per_head: int = 2
  output: str = "mix"
  block_size: int = 64
  max_kv_blocks: int | None = None


def owner_cell(key_pos: jax.Array, visible_len, predictor_len: int
               ) -> jax.Array:
  """Cell of the compressed map owning each key (the stretch rule).

  Args:
    key_pos: int key positions, broadcastable against `visible_len`.
    visible_len: L of each row (causal: query position + 1).
    predictor_len: T_M.

  Returns:
    int32 cell ids floor((j + 0.5) T_M / L - 1e-4), clipped to [0, T_M)
    (meaningful for keys j < L).
  """
  length = jnp.maximum(jnp.asarray(visible_len, jnp.float32), 1.0)
  cell = jnp.floor((key_pos + 0.5) * predictor_len / length - 1e-4)
  return jnp.clip(cell, 0, predictor_len - 1).astype(jnp.int32)


def _row_geometry(q_len: int, kv_len: int, causal: bool, predictor_len: int):
  """(cell [1, 1, T, S], visible [1, 1, T, S]) of the stretch rule."""
  qp = jnp.arange(q_len).reshape(1, 1, q_len, 1)
  kp = jnp.arange(kv_len).reshape(1, 1, 1, kv_len)
  length = qp + 1 if causal else kv_len
  visible = kp < length
  return owner_cell(kp, length, predictor_len), visible


def stretch(cells: jax.Array, kv_len: int, causal: bool) -> jax.Array:
  """Maps per-cell values [B, H, T, T_M] to keys [B, H, T, S] (no fill)."""
  t, tm = cells.shape[-2], cells.shape[-1]
  cell, _ = _row_geometry(t, kv_len, causal, tm)
  return jnp.take_along_axis(cells, jnp.broadcast_to(
      cell, cells.shape[:-1] + (kv_len,)), axis=-1)


def grouped_topk(estimate: jax.Array, topk: int, causal: bool) -> jax.Array:
  """Selected cells with the budget shared across heads (no gradient).

  Causal: per (batch, row) keep the best K_t = clip(round(H k T_M / L_t), 1,
  H T_M) cells of (H, T_M), L_t = t + 1. Non-causal: per sample keep the
  best H k T_M cells of (H, T, T_M).

  Args:
    estimate: [B, H, T, T_M] scores (probabilities or logits).
    topk: k.
    causal: the grouping mode.

  Returns:
    bool [B, H, T, T_M].
  """
  est = jax.lax.stop_gradient(estimate).astype(jnp.float32)
  b, h, t, tm = est.shape
  if causal:
    flat = jnp.moveaxis(est, 1, 2).reshape(b, t, h * tm)
    budget = jnp.round(h * topk * tm / (jnp.arange(t) + 1.0))
    budget = jnp.clip(budget, 1, h * tm)[None, :, None]
  else:
    flat = est.reshape(b, 1, h * t * tm)
    budget = min(h * topk * tm, h * t * tm)
  order = jnp.argsort(-flat, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  keep = ranks < budget
  if causal:
    return jnp.moveaxis(keep.reshape(b, t, h, tm), 2, 1)
  return keep.reshape(b, h, t, tm)


def element_mask(selected: jax.Array, kv_len: int, causal: bool
                 ) -> jax.Array:
  """bool [B, H, T, S]: key j kept iff it is visible and its cell is kept."""
  t, tm = selected.shape[-2:]
  _, visible = _row_geometry(t, kv_len, causal, tm)
  return stretch(selected, kv_len, causal) & visible


def _performer(q, k, v, omega, causal: bool):
  """Linear-attention estimate [B, H, T, E] of softmax(q k^T) v (fp32).

  Causal: ReLU random features with prefix sums; non-causal: FAVOR+
  positive softmax features.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  num_features = omega.shape[0]
  if causal:
    fq = jax.nn.relu(q @ omega.T) + 1e-3
    fk = jax.nn.relu(k @ omega.T) + 1e-3
    kv = jnp.cumsum(fk[..., :, None] * v[..., None, :], axis=-3)
    num = jnp.einsum("bhtf,bhtfe->bhte", fq, kv)
    den = jnp.einsum("bhtf,bhtf->bht", fq, jnp.cumsum(fk, axis=-2))
  else:
    scale = q.shape[-1] ** -0.25

    def features(x):
      x = x * scale
      proj = x @ omega.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)
      return jnp.exp(proj - jax.lax.stop_gradient(
          proj.max(-1, keepdims=True))) / math.sqrt(num_features)

    fq, fk = features(q), features(k)
    num = jnp.einsum("bhtf,bhfe->bhte", fq, jnp.einsum("bhsf,bhse->bhfe",
                                                        fk, v))
    den = jnp.einsum("bhtf,bhf->bht", fq, fk.sum(-2))
  return num / jnp.maximum(den, 1e-6)[..., None]


class _CausalConv(nnx.Module):
  """3x3 conv over (query, cell) whose taps see only current/earlier rows."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), kernel_dilation=(2, 2),
                         padding="VALID", rngs=rngs)

  def __call__(self, x):  # [B, T, W, C]
    x = jnp.pad(x, ((0, 0), (4, 0), (2, 2), (0, 0)))
    return self.conv(x)


class SEAMethod(base.SparseMethod):
  """SEA's estimator (trainable) + grouped top-k mask + sparse attention."""

  def __init__(self, config: SEAConfig, num_heads: int, head_dim: int, *,
               rngs: nnx.Rngs):
    """Builds the estimator.

    Args:
      config: the SEA config.
      num_heads: H (query heads; kv heads are repeated for the estimator).
      head_dim: D.
      rngs: parameter and random-feature RNGs.
    """
    if config.output not in ("mix", "sparse"):
      raise ValueError(f"output must be 'mix' or 'sparse', got "
                       f"{config.output!r}")
    if config.predictor_len % config.width_divisor:
      raise ValueError("predictor_len must be a multiple of width_divisor")
    self.config = config
    self.num_heads = num_heads
    d, h, s = head_dim, num_heads, config.channels_per_head
    features = max(int(d * math.log(d) / config.feature_divisor), 1)
    self.omega = nnx.Variable(jax.random.normal(rngs.params(),
                                                (features, d)))
    if config.causal:
      self.positions = nnx.Param(jax.random.normal(
          rngs.params(), (config.max_positions, d)))
    else:
      self.positions = nnx.data(None)
    self.encoder = nnx.Linear(3 * d, 2 * d, rngs=rngs)
    self.encoder_norm = nnx.LayerNorm(2 * d, rngs=rngs)
    width = config.predictor_len // config.width_divisor
    self.row_decoder = nnx.Linear(2 * d, s * width, rngs=rngs)
    self.gates = nnx.Linear(2 * d, 2, rngs=rngs)
    if config.causal:
      self.width_norm = nnx.LayerNorm(width, rngs=rngs)
      self.convs = nnx.List([_CausalConv(h * s, rngs=rngs),
                             _CausalConv(h * s, rngs=rngs)])
      self.head_mix = nnx.Conv(h * s, h, (1, 1), rngs=rngs)
    else:
      self.convs = nnx.List([
          nnx.Conv(h * s, h * s, (3, 3), strides=(2, 1), rngs=rngs),
          nnx.Conv(h * s, h * s, (3, 3), rngs=rngs)])
      self.head_mix = nnx.Conv(h * s, h, (3, 3), rngs=rngs)
    self.out_norm = nnx.LayerNorm(config.predictor_len, use_bias=False,
                                  rngs=rngs)

  def redraw(self, rngs: nnx.Rngs) -> None:
    """Redraws the Performer's random projection (every 1000 steps)."""
    self.omega.value = jax.random.normal(rngs.params(),
                                         self.omega.value.shape)

  def _positional_code(self, t: int, d: int) -> jax.Array:
    if self.config.causal:
      return self.positions[...][:t]
    # Bilinear sample of the identity rows at u = i / (T - 1).
    u = jnp.arange(t) / max(t - 1, 1) * (d - 1)
    lo = jnp.floor(u).astype(jnp.int32)
    frac = (u - lo)[:, None]
    eye = jnp.eye(d)
    return (1 - frac) * eye[lo] + frac * eye[jnp.minimum(lo + 1, d - 1)]

  def estimate(self, q: jax.Array, k: jax.Array, v: jax.Array):
    """The compressed attention logits and the gate logits.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] (self-attention: S = T).

    Returns:
      (logits f32 [B, H, T, T_M], gates f32 [B, H, T, 2]).
    """
    cfg = self.config
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    q, k, v = (jnp.moveaxis(x, 2, 1) for x in (q, k, v))
    k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
    code = jnp.broadcast_to(self._positional_code(k.shape[2], d),
                            v.shape).astype(jnp.float32)
    value = jnp.concatenate([code, v.astype(jnp.float32)], -1)
    ctx = _performer(q, k, value, self.omega[...], cfg.causal)
    z = self.encoder(jnp.concatenate([ctx, v.astype(jnp.float32)], -1))
    z = jax.nn.gelu(self.encoder_norm(z))  # [B, H, T, 2D]
    width = cfg.predictor_len // cfg.width_divisor
    s = cfg.channels_per_head
    rows = self.row_decoder(z).reshape(b, h, t, s, width)
    x = rows.transpose(0, 2, 4, 1, 3).reshape(b, t, width, h * s)
    if cfg.causal:
      x = jnp.moveaxis(self.width_norm(jnp.moveaxis(x, 2, 3)), 3, 2)
      for conv in self.convs:
        x = jax.nn.relu(conv(x))
      x = jnp.repeat(x, cfg.width_divisor, axis=2)
      x = self.head_mix(x)
    else:
      for conv in self.convs:
        x = jax.nn.relu(conv(x))
      x = jnp.repeat(x, 2, axis=1)[:, :t]
      x = self.head_mix(x)
    if x.shape[2] != cfg.predictor_len:
      x = jax.image.resize(x, (b, t, cfg.predictor_len, h), "bilinear")
    logits = self.out_norm(jnp.moveaxis(x, 3, 1))
    return logits, self.gates(z)

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array,
           **kwargs) -> base.SparsePlan:
    """Estimates the map, selects cells, builds the element-mask layout.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] with S = T.
      **kwargs: unused.

    Returns:
      A SparsePlan with aux {"estimate": softmax of the logits over T_M
      [B, H, T, T_M], "logits", "gates" [B, H, T, 2], "selected" bool
      [B, H, T, T_M]}.
    """
    del kwargs
    cfg = self.config
    t, s = q.shape[1], k.shape[1]
    if s != t:
      raise ValueError(f"SEA is self-attention: T={t} but S={s}")
    logits, gates = self.estimate(q, k, v)
    estimate = jax.nn.softmax(logits, -1)
    selected = grouped_topk(estimate, cfg.topk, cfg.causal)
    mask = element_mask(selected, s, cfg.causal)
    block = min(cfg.block_size, t)
    layout = layout_lib.BlockLayout.from_element_mask(
        mask, block, block, max_kv_blocks=cfg.max_kv_blocks)
    return base.SparsePlan(layout=layout, aux={
        "estimate": estimate, "logits": logits, "gates": gates,
        "selected": selected})

  def mix(self, plan: base.SparsePlan, out: jax.Array,
          v: jax.Array) -> jax.Array:
    """The gated output O = s(g1) s(g0) O_sp + (1 - s(g1)) O_avg.

    O_avg is the causal running mean of v, or (non-causal) the values
    averaged with the column mean of the estimated map stretched to keys.

    Args:
      plan: this method's plan (gates and estimate in aux).
      out: [B, T, H, D] sparse attention output.
      v: [B, S, Hkv, D].
    """
    if self.config.output == "sparse":
      return out
    b, t, h, _ = out.shape
    gates = jax.nn.sigmoid(jnp.moveaxis(plan.aux["gates"], 1, 2))
    vh = jnp.repeat(v, h // v.shape[2], axis=2).astype(jnp.float32)
    if self.config.causal:
      avg = jnp.cumsum(vh, 1) / jnp.arange(1, t + 1)[None, :, None, None]
    else:
      col = plan.aux["estimate"].mean(2, keepdims=True)  # [B, H, 1, T_M]
      weights = stretch(col, vh.shape[1], False)[:, :, 0]  # [B, H, S]
      weights = weights / weights.sum(-1, keepdims=True)
      avg = jnp.einsum("bhs,bshd->bhd", weights, vh)[:, None]
    mixed = (gates[..., 1:] * gates[..., :1] * out.astype(jnp.float32)
             + (1 - gates[..., 1:]) * avg)
    return mixed.astype(out.dtype)

  def __call__(self, q, k, v, *, sm_scale=None, implementation=None,
               interpret=False, **kwargs):
    """plan + attend + the gated output mix: [B, T, H, D]."""
    plan = self.plan(q, k, v, **kwargs)
    out = plan.attend(q, k, v, sm_scale=sm_scale,
                      implementation=implementation, interpret=interpret)
    return self.mix(plan, out, v)


def stretched_logits(logits: jax.Array, causal: bool) -> jax.Array:
  """Compressed logits [B, H, T, T_M] -> [B, H, T, T], -big where hidden."""
  t, tm = logits.shape[-2:]
  _, visible = _row_geometry(t, t, causal, tm)
  return jnp.where(visible, stretch(logits, t, causal), -_BIG)


def kl_mse(student_logits: jax.Array, teacher_probs: jax.Array,
           causal: bool, *, kl_weight: float = 0.1) -> jax.Array:
  """kl_weight * KL(teacher || softmax(student)) + MSE, over rows [.., T, T].

  KL is summed over keys and averaged over rows; MSE is averaged over the
  visible entries.
  """
  t = student_logits.shape[-1]
  _, visible = _row_geometry(t, t, causal, 1)
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
  teacher = teacher_probs.astype(jnp.float32)
  kl = jnp.sum(jnp.where(visible & (teacher > 0), teacher * (
      jnp.log(jnp.where(teacher > 0, teacher, 1.0)) - log_p), 0.0), -1)
  err = jnp.where(visible, jnp.exp(log_p) - teacher, 0.0)
  mse = jnp.sum(err**2) / (jnp.sum(visible) * err.size / visible.size)
  return kl_weight * kl.mean() + mse


def estimator_loss(logits: jax.Array, teacher_probs: jax.Array,
                   causal: bool) -> jax.Array:
  """L_est: the compressed logits stretched to T vs the teacher map.

  Args:
    logits: [B, H, T, T_M] (aux["logits"]).
    teacher_probs: [B, H, T, T] teacher attention probabilities.
    causal: the stretch and visibility rule.
  """
  return kl_mse(stretched_logits(logits, causal), teacher_probs, causal)


def attention_loss(q: jax.Array, k: jax.Array, teacher_probs: jax.Array,
                   causal: bool) -> jax.Array:
  """L_att: the student's dense softmax(q k^T / sqrt(D)) vs the teacher.

  Args:
    q, k: [B, T, H, D] student projections.
    teacher_probs: [B, H, T, T].
    causal: mask future keys.
  """
  t, d = q.shape[1], q.shape[-1]
  scores = jnp.einsum("bthd,bshd->bhts", q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  _, visible = _row_geometry(t, t, causal, 1)
  return kl_mse(jnp.where(visible, scores, -_BIG), teacher_probs, causal)


def context_loss(out: jax.Array, teacher_out: jax.Array) -> jax.Array:
  """L_ctx: MSE between merged-head contexts."""
  diff = out.astype(jnp.float32) - teacher_out.astype(jnp.float32)
  return jnp.mean(diff**2)
