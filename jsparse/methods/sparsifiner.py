"""Sparsifiner: learned instance-dependent sparse attention for ViTs.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for
Efficient Vision Transformers", https://arxiv.org/abs/2303.13755 (CVPR 2023;
code: lim142857/Sparsifiner).

A low-rank connectivity predictor approximates each layer's attention map:
channel-reduced queries attend (scale num_heads^-1/2 in the official code) to
n "basis" slots made by a learned token reduction of the channel-reduced keys,
A_low = softmax(q' (k'^T P_down) s) [B, H, N, n]; the approximate map is
A_low U with U = P_up^T [n, N]. For selection (inference and phase-2
fine-tuning) A_low keeps its top-8 entries per row and U is |P_up|^T
thresholded at 0.02; every non-CLS query then keeps the top ceil(rho N) keys
of the approximate map (the CLS key column is a normal candidate) and the CLS
query row stays dense. The binary mask is detached and becomes an element
mask of the block layout (tile pool); exact softmax attention runs on it.
The predictor learns only from `reconstruction_loss` on the dense path.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse.methods import base
from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class SparsifinerConfig:
  """Sparsifiner hyperparameters (defaults: DeiT-S, `sparsifiner_default`).

  Attributes:
    num_tokens: N, tokens including CLS (P_down and P_up are tied to it).
    token_ratio: r_n; the predictor has n = N // r_n basis slots.
    channel_ratio: r_c; queries and keys are reduced to c = D // r_c.
    keep_rate: rho; each non-CLS query keeps k = ceil(rho N) keys.
    coef_topk: entries of A_low kept per row before the up-projection.
    basis_threshold: |P_up| entries at or below it are zeroed.
    scale: "num_heads" (official code, H^-1/2) or "head_dim" (D^-1/2) for
      the cheap attention.
    cls_token: the first token is a CLS token whose query row is dense.
    selection: "predictor", or "random" (uniform random scores at the same
      rho; the ablation).
    block_size: the layout's q and kv block.
    seed: PRNG seed of the "random" selection.
  """

  num_tokens: int = 197
  token_ratio: int = 6
  channel_ratio: int = 2
  keep_rate: float = 0.25
  coef_topk: int = 8
  basis_threshold: float = 0.02
  scale: str = "num_heads"
  cls_token: bool = True
  selection: str = "predictor"
  block_size: int = 64
  seed: int = 0

  @property
  def num_slots(self) -> int:
    return max(self.num_tokens // self.token_ratio, 1)

  @property
  def keys_per_row(self) -> int:
    return min(math.ceil(self.keep_rate * self.num_tokens), self.num_tokens)


def keep_topk(x: jax.Array, k: int) -> jax.Array:
  """x with all but the k largest entries of each last-axis row zeroed."""
  if k >= x.shape[-1]:
    return x
  kth = jax.lax.top_k(x, k)[0][..., -1:]
  return jnp.where(x >= kth, x, 0.0)


def row_topk_mask(scores: jax.Array, k: int) -> jax.Array:
  """bool mask of exactly the k best entries of each last-axis row.

  Ties are broken by the lower index (lax.top_k), so every row has k.
  """
  idx = jax.lax.top_k(scores, k)[1]
  onehot = jax.nn.one_hot(idx, scores.shape[-1], dtype=jnp.int32)
  return onehot.sum(-2) > 0


class SparsifinerMethod(base.SparseMethod):
  """The connectivity predictor, per-row top-k mask and sparse attention."""

  def __init__(self, config: SparsifinerConfig, num_heads: int,
               head_dim: int, *, rngs: nnx.Rngs):
    """Builds the predictor.

    Args:
      config: the Sparsifiner config.
      num_heads: H (query heads).
      head_dim: D.
      rngs: parameter RNGs.
    """
    if config.scale not in ("num_heads", "head_dim"):
      raise ValueError(f"scale must be 'num_heads' or 'head_dim', got "
                       f"{config.scale!r}")
    if config.selection not in ("predictor", "random"):
      raise ValueError(f"selection must be 'predictor' or 'random', got "
                       f"{config.selection!r}")
    self.config = config
    self.num_heads = num_heads
    self.head_dim = head_dim
    c = max(head_dim // config.channel_ratio, 1)
    n, s = config.num_slots, config.num_tokens
    self.q_reduce = nnx.Linear(head_dim, c, rngs=rngs)
    self.k_reduce = nnx.Linear(head_dim, c, rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    self.down = nnx.Param(init(rngs.params(), (s, n)))
    self.up = nnx.Param(init(rngs.params(), (s, n)))

  def approximate(self, q: jax.Array, k: jax.Array, *,
                  sparse: bool) -> jax.Array:
    """The predictor's approximate attention map.

    Args:
      q: [B, N, H, D]; k: [B, N, Hkv, D].
      sparse: the selection form (top-`coef_topk` coefficients, thresholded
        |P_up|) rather than the phase-1 training form (dense coefficients,
        raw signed P_up), as in the official code.

    Returns:
      f32 [B, H, N', N]; N' = N - 1 (CLS query row dropped) with a CLS token.
    """
    cfg = self.config
    b, n_tok, h, _ = q.shape
    if n_tok != cfg.num_tokens:
      raise ValueError(f"predictor built for N={cfg.num_tokens} tokens, got "
                       f"{n_tok}")
    k = jnp.repeat(k, h // k.shape[2], axis=2)
    qr = self.q_reduce(q.astype(jnp.float32))  # [B, N, H, c]
    kr = self.k_reduce(k.astype(jnp.float32))
    basis_k = jnp.einsum("bnhc,nm->bhcm", kr, self.down[...])
    scale = (h if cfg.scale == "num_heads" else self.head_dim) ** -0.5
    if cfg.cls_token:
      qr = qr[:, 1:]
    coef = jax.nn.softmax(jnp.einsum("bnhc,bhcm->bhnm", qr, basis_k) * scale,
                          -1)
    up = self.up[...]
    if sparse:
      coef = keep_topk(coef, cfg.coef_topk)
      up = jnp.where(jnp.abs(up) > cfg.basis_threshold, jnp.abs(up), 0.0)
    return jnp.einsum("bhnm,sm->bhns", coef, up)

  def mask(self, q: jax.Array, k: jax.Array) -> jax.Array:
    """The detached binary mask bool [B, H, N, N] (k keys per row).

    Args:
      q: [B, N, H, D]; k: [B, N, Hkv, D].
    """
    cfg = self.config
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    if cfg.selection == "predictor":
      scores = self.approximate(q, k, sparse=True)
    else:
      rows = cfg.num_tokens - int(cfg.cls_token)
      scores = jax.random.uniform(
          jax.random.key(cfg.seed),
          (q.shape[0], q.shape[2], rows, cfg.num_tokens))
    keep = row_topk_mask(jax.lax.stop_gradient(scores), cfg.keys_per_row)
    if cfg.cls_token:
      dense_row = jnp.ones(keep.shape[:2] + (1, keep.shape[-1]), bool)
      keep = jnp.concatenate([dense_row, keep], axis=2)
    return keep

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array,
           **kwargs) -> base.SparsePlan:
    """Predicts the mask and builds its element-mask layout.

    Args:
      q: [B, N, H, D]; k, v: [B, N, Hkv, D].
      **kwargs: unused.

    Returns:
      A SparsePlan with aux {"mask": bool [B, H, N, N]}.
    """
    del v, kwargs
    keep = self.mask(q, k)
    block = min(self.config.block_size, q.shape[1])
    layout = layout_lib.BlockLayout.from_element_mask(keep, block, block)
    return base.SparsePlan(layout=layout, aux={"mask": keep})


def reconstruction_loss(approx: jax.Array, teacher_probs: jax.Array, *,
                        cls_token: bool = True,
                        weight: float = 0.01) -> jax.Array:
  """Phase-1 loss of one layer: weight * sum (A_hat - A_teacher)^2.

  Args:
    approx: [B, H, N', N] `approximate(..., sparse=False)`.
    teacher_probs: [B, H, N, N] the teacher's softmax attention; rows 1: are
      used with a CLS token.
    cls_token: drop the teacher's CLS query row.
    weight: the official 0.01.

  Returns:
    f32 scalar (MSE with reduction "sum", as in the official code).
  """
  target = teacher_probs[:, :, 1:] if cls_token else teacher_probs
  diff = approx.astype(jnp.float32) - target.astype(jnp.float32)
  return weight * jnp.sum(diff**2)


def logit_distillation_loss(student_logits: jax.Array,
                            teacher_logits: jax.Array) -> jax.Array:
  """KL(teacher || student) of class logits [B, C], batch mean."""
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s)) / student_logits.shape[0]


def token_distillation_loss(student_tokens: jax.Array,
                            teacher_tokens: jax.Array) -> jax.Array:
  """MSE of the final-layer patch tokens [B, N, F] (CLS token excluded)."""
  diff = (student_tokens[:, 1:].astype(jnp.float32)
          - teacher_tokens[:, 1:].astype(jnp.float32))
  return jnp.mean(diff**2)


def attention_flops(config: SparsifinerConfig, num_heads: int,
                    head_dim: int) -> dict[str, float]:
  """Multiply-add FLOPs (x2) per image and layer: dense vs Sparsifiner.

  The attention cost counts QK^T and PV only; the predictor's counts the
  channel reductions, the key token reduction, the cheap attention and the
  sparse up-projection (coef_topk nonzeros per row).

  Returns:
    {"dense", "sparse", "predictor"} FLOPs.
  """
  n, h, d = config.num_tokens, num_heads, head_dim
  c, m = max(d // config.channel_ratio, 1), config.num_slots
  rows = n - int(config.cls_token)
  kept = config.keys_per_row * rows + n * int(config.cls_token)
  predictor = h * 2 * (2 * n * d * c + c * n * m + rows * m * c
                       + rows * min(config.coef_topk, m) * n)
  return {"dense": 4.0 * h * n * n * d, "sparse": 4.0 * h * kept * d,
          "predictor": float(predictor)}
