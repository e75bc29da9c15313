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
thresholded at 0.02; every non-CLS query then keeps the top k = ceil(rho N)
keys of the approximate map (the CLS key column is a normal candidate) and
the CLS query row stays dense. The selection is detached; exact softmax
attention runs on it. The predictor learns only from `reconstruction_loss`
on the dense path.

Execution format: a per-row `RowLayout` with Kmax = k (every non-CLS row
lists exactly its k keys). The picks are unstructured per row, so a block
layout would be nearly dense and neighbouring rows share few keys. The one
dense CLS row is attended by `__call__` with its own one-row list of all N
keys (O(N D)); in the plan's layout it lists nothing.

Cost: the predictor's map is N x N per head by design, so Sparsifiner is
only cheap at ViT token counts. Its up-projection through n = N / r_n basis
slots costs O(N^2 n) in the phase-1 training form; the selection form
gathers only the coef_topk basis rows a query keeps (O(N^2 coef_topk)) and
takes a top-k over N per row, one chunk of query rows at a time: memory
O(N k) for the lists plus one chunk of the map, never [N, k, N].
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import base
from pallas_kernels import row_layout as row_layout_lib

# Elements of the approximate map built per step of the selection.
_CHUNK_ELEMENTS = 1 << 22


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
    basis: the up-projection basis U of the selection: "abs" (official
      inference, |P_up|^T thresholded at `basis_threshold`) or "signed"
      (P_up^T as phase 1 trains it, no threshold; with coef_topk >= n the
      selection then ranks exactly the map phase 1 fits).
    scale: "num_heads" (official code, H^-1/2) or "head_dim" (D^-1/2) for
      the cheap attention.
    cls_token: the first token is a CLS token whose query row is dense.
    selection: "predictor", or "random" (uniform random scores at the same
      rho; the ablation).
    seed: PRNG seed of the "random" selection.
  """

  num_tokens: int = 197
  token_ratio: int = 6
  channel_ratio: int = 2
  keep_rate: float = 0.25
  coef_topk: int = 8
  basis_threshold: float = 0.02
  basis: str = "abs"
  scale: str = "num_heads"
  cls_token: bool = True
  selection: str = "predictor"
  seed: int = 0

  @property
  def num_slots(self) -> int:
    return max(self.num_tokens // self.token_ratio, 1)

  @property
  def keys_per_row(self) -> int:
    return min(math.ceil(self.keep_rate * self.num_tokens), self.num_tokens)


def _index_mask(idx: jax.Array, size: int) -> jax.Array:
  """bool [..., size]: True at the (distinct) indices idx [..., k]."""
  return jnp.put_along_axis(jnp.zeros(idx.shape[:-1] + (size,), bool), idx,
                            True, axis=-1, inplace=False)


def row_topk_mask(scores: jax.Array, k: int) -> jax.Array:
  """bool mask of exactly the k best entries of each last-axis row.

  Ties are broken by the lower index (lax.top_k), so every row has k. A
  dense view for inspection (scores-sized, no [..., k, S] one-hot).
  """
  return _index_mask(jax.lax.top_k(scores, k)[1], scores.shape[-1])


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
    if config.basis not in ("abs", "signed"):
      raise ValueError(f"basis must be 'abs' or 'signed', got "
                       f"{config.basis!r}")
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

  def _coefficients(self, q: jax.Array, k: jax.Array) -> jax.Array:
    """A_low: f32 [B, H, N', n] (the CLS query row dropped with a CLS token).

    Args:
      q: [B, N, H, D]; k: [B, N, Hkv, D].
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
    return jax.nn.softmax(
        jnp.einsum("bnhc,bhcm->bhnm", qr, basis_k) * scale, -1)

  def _sparse_coefficients(self, q: jax.Array, k: jax.Array):
    """The top-`coef_topk` entries of A_low: (values, slots) [B, H, N', 8]."""
    coef = self._coefficients(q, k)
    return jax.lax.top_k(coef, min(self.config.coef_topk, coef.shape[-1]))

  def _sparse_basis(self) -> jax.Array:
    """The selection's U, f32 [n, N]: |P_up|^T with entries <=
    basis_threshold zeroed ("abs"), or P_up^T ("signed")."""
    if self.config.basis == "signed":
      return self.up[...].T
    up = jnp.abs(self.up[...])
    return jnp.where(up > self.config.basis_threshold, up, 0.0).T

  def approximate(self, q: jax.Array, k: jax.Array, *,
                  sparse: bool) -> jax.Array:
    """The predictor's approximate attention map (N x N per head).

    Args:
      q: [B, N, H, D]; k: [B, N, Hkv, D].
      sparse: the selection form (top-`coef_topk` coefficients, thresholded
        |P_up|) rather than the phase-1 training form (dense coefficients,
        raw signed P_up), as in the official code.

    Returns:
      f32 [B, H, N', N]; N' = N - 1 (CLS query row dropped) with a CLS token.
    """
    if not sparse:
      return jnp.einsum("bhnm,sm->bhns", self._coefficients(q, k),
                        self.up[...])
    values, slots = self._sparse_coefficients(q, k)
    return _up_project(values, slots, self._sparse_basis())

  def select(self, q: jax.Array, k: jax.Array) -> jax.Array:
    """The keys each non-CLS query keeps, best first (detached).

    The approximate map is built one chunk of query rows at a time and
    reduced to its top-k at once, so memory is O(N k) plus one chunk.

    Args:
      q: [B, N, H, D]; k: [B, N, Hkv, D].

    Returns:
      int32 [B, H, N', k], distinct key ids per row, k = keys_per_row.
    """
    cfg = self.config
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    b, n_tok, h, _ = q.shape
    keep = cfg.keys_per_row
    if cfg.selection == "predictor":
      values, slots = self._sparse_coefficients(q, k)
      basis = self._sparse_basis()
      row_keys = lambda xs: jax.lax.top_k(_up_project(*xs, basis), keep)[1]
      rows = (jnp.moveaxis(values, 2, 0), jnp.moveaxis(slots, 2, 0))
      per_row = b * h * n_tok * (1 + values.shape[-1])
    else:
      seed = jax.random.key(cfg.seed)
      row_keys = lambda i: jax.lax.top_k(jax.random.uniform(
          jax.random.fold_in(seed, i), (b, h, n_tok)), keep)[1]
      rows = jnp.arange(n_tok - int(cfg.cls_token))
      per_row = b * h * n_tok
    chunk = max(1, _CHUNK_ELEMENTS // per_row)
    idx = jax.lax.map(row_keys, rows, batch_size=chunk)  # [N', B, H, k]
    return jnp.moveaxis(idx, 0, 2).astype(jnp.int32)

  def mask(self, q: jax.Array, k: jax.Array) -> jax.Array:
    """The detached binary mask bool [B, H, N, N] (k keys per row).

    A dense view for inspection; the plan never builds it.

    Args:
      q: [B, N, H, D]; k: [B, N, Hkv, D].
    """
    keep = _index_mask(self.select(q, k), self.config.num_tokens)
    if self.config.cls_token:
      dense_row = jnp.ones(keep.shape[:2] + (1, keep.shape[-1]), bool)
      keep = jnp.concatenate([dense_row, keep], axis=2)
    return keep

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array,
           **kwargs) -> base.SparsePlan:
    """Predicts each row's keys and lists them.

    Args:
      q: [B, N, H, D]; k, v: [B, N, Hkv, D].
      **kwargs: unused.

    Returns:
      A SparsePlan with a RowLayout [B, H, N, k]. With a CLS token its row 0
      lists no key: `__call__` attends the CLS row densely.
    """
    del v, kwargs
    idx = self.select(q, k)
    b, h, _, keep = idx.shape
    cnt = jnp.full((b, h, idx.shape[2]), keep, jnp.int32)
    if self.config.cls_token:
      idx = jnp.concatenate([jnp.zeros((b, h, 1, keep), jnp.int32), idx], 2)
      cnt = jnp.concatenate([jnp.zeros((b, h, 1), jnp.int32), cnt], 2)
    layout = row_layout_lib.RowLayout.from_indices(
        idx, cnt, num_keys=q.shape[1])
    return base.SparsePlan(layout=layout)

  def __call__(self, q, k, v, *, sm_scale=None, implementation=None,
               interpret=False, **kwargs):
    """plan + attend, the CLS row over all keys: [B, N, H, D]."""
    out = super().__call__(q, k, v, sm_scale=sm_scale,
                           implementation=implementation,
                           interpret=interpret, **kwargs)
    if not self.config.cls_token:
      return out
    every_key = row_layout_lib.RowLayout.from_indices(
        np.arange(k.shape[1], dtype=np.int32)[None, None, None],
        num_keys=k.shape[1])
    cls = base.SparsePlan(layout=every_key).attend(
        q[:, :1], k, v, sm_scale=sm_scale, implementation=implementation,
        interpret=interpret)
    return jnp.concatenate([cls, out[:, 1:]], axis=1)


def _up_project(values: jax.Array, slots: jax.Array, basis: jax.Array
                ) -> jax.Array:
  """Rows of A_low_sparse U from their kept coefficients.

  Args:
    values, slots: [..., m] the kept coefficients and their basis slots.
    basis: U [n, N].

  Returns:
    [..., N]: sum_j values[j] U[slots[j]] (O(m N) per row).
  """
  return jnp.einsum("...j,...jn->...n", values, basis[slots])


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
