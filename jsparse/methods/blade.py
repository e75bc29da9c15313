"""Video-BLADE's Adaptive Block-Sparse Attention (ASA).

Paper: "Video-BLADE: Block-Sparse Attention Meets Step Distillation for
Efficient Video Generation", https://arxiv.org/abs/2508.10774 (code:
Tacossp/VIDEO-BLADE).

Per call (no gradient through the choice): block importance from sampled
tokens (the PSA estimator), then per query block the smallest top-ranked set
of kv blocks holding `mass` of the estimated block mass, the crossing block
excluded, clamped to [min_fraction, max_fraction] of the kv blocks. A global
branch attends to every key mean-pooled by n. Both branches form ONE softmax
over [K masked by M ; K_pooled + ln n]: pooled keys are appended to the kv
axis (`extra_k`) with the bias ln n, so one op call is exact; the two-branch
form merged by log-sum-exp (`merge_by_lse`) is the same function. Pooling
covers every token, selected blocks included, as in the paper. Tokens should
be in the space-filling-curve order of `jsparse.masks.curves` for video.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import selection
from jsparse.methods import base
from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class BladeConfig:
  """ASA hyperparameters (defaults: the paper / "general" scripts).

  Attributes:
    block_size: b, query and kv block of the mask (128 in the paper).
    samples: k_s tokens sampled per query block and per kv block (16 in the
      paper, 32 in the CogVideoX/Wan scripts).
    mass: tau, the cumulative estimated block mass kept per row.
    min_fraction: rho_min, at least int(rho_min * Kb) blocks per row (>= 1).
    max_fraction: rho_max, at most int(rho_max * Kb) blocks per row (0.10
      CogVideoX, 0.17 Wan and general).
    pool_size: n, tokens per pooled global key (15 CogVideoX, 30 Wan).
    num_text_blocks: trailing blocks (text placed last) forced dense as
      kv columns and as query rows (2 for CogVideoX, 0 otherwise).
    global_branch: attend to the pooled keys too (off: the sparse branch
      alone, e.g. to check that 100% density is dense attention).
    merge: "single" (one op call over [K ; K_pooled]) or "lse" (two calls
      merged by log-sum-exp; same values and gradients).
    seed: PRNG seed of the sampling offsets when `plan` gets no key.
  """

  block_size: int = 128
  samples: int = 16
  mass: float = 0.95
  min_fraction: float = 0.05
  max_fraction: float = 0.17
  pool_size: int = 30
  num_text_blocks: int = 0
  global_branch: bool = True
  merge: str = "single"
  seed: int = 0

  def block_budget(self, num_kv_blocks: int) -> tuple[int, int]:
    """(min, max) blocks chosen per row by the mass rule."""
    lo = max(int(self.min_fraction * num_kv_blocks), 1)
    hi = max(int(self.max_fraction * num_kv_blocks), lo)
    return lo, min(hi, num_kv_blocks)


def kv_bias(seq_len: int, pool_size: int) -> jax.Array:
  """f32 [1, 1, S + ceil(S / n)]: 0 on keys, ln(tokens pooled) on pooled.

  A ragged last pooled key stands for fewer than n tokens.
  """
  counts = np.minimum(pool_size,
                      seq_len - np.arange(0, seq_len, pool_size))
  return jnp.asarray(np.concatenate(
      [np.zeros(seq_len, np.float32),
       np.log(counts).astype(np.float32)])[None, None])


def merge_by_lse(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array,
                 lse_b: jax.Array) -> jax.Array:
  """One softmax over the union of two disjointly normalised key sets.

  Args:
    out_a, out_b: [B, T, H, D] branch outputs.
    lse_a, lse_b: f32 [B, H, T] their log-sum-exps (-inf: no key).

  Returns:
    [B, T, H, D] in out_a's dtype; 0 where both branches saw no key.
  """
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w_a = jnp.exp(lse_a - m)
  w_b = jnp.exp(lse_b - m)
  total = w_a + w_b
  total = jnp.where(total > 0, total, 1.0)
  w_a = jnp.moveaxis(w_a / total, 1, 2)[..., None]
  w_b = jnp.moveaxis(w_b / total, 1, 2)[..., None]
  out = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
  return out.astype(out_a.dtype)


class BladeMethod(base.SparseMethod):
  """ASA: mass-thresholded block mask plus a pooled global branch."""

  def __init__(self, config: BladeConfig = BladeConfig()):
    if config.merge not in ("single", "lse"):
      raise ValueError(f"merge must be 'single' or 'lse', got "
                       f"{config.merge!r}")
    if not 0 < config.min_fraction <= config.max_fraction <= 1:
      raise ValueError("need 0 < min_fraction <= max_fraction <= 1")
    self.config = config

  def block_mask(self, q: jax.Array, k: jax.Array, *,
                 key: jax.Array | None = None):
    """The sparse branch's block choice (no gradient).

    Args:
      q: [B, T, Hq, D]; k: [B, S, Hkv, D], T and S multiples of block_size.
      key: PRNG key of the sampling offsets; default from `config.seed`.

    Returns:
      (mask bool [B, Hq, Qb, Kb], scores f32 [B, Hq, Qb, Kb]).
    """
    cfg = self.config
    b = cfg.block_size
    if key is None:
      key = jax.random.key(cfg.seed)
    samples = min(cfg.samples, b)
    scores = selection.sampled_block_scores(q, k, b, b, q_samples=samples,
                                            kv_samples=samples, key=key)
    qb, kb = scores.shape[-2:]
    lo, hi = cfg.block_budget(kb)
    forced = None
    if cfg.num_text_blocks:
      rows = np.arange(qb)[:, None] >= qb - cfg.num_text_blocks
      cols = np.arange(kb)[None, :] >= kb - cfg.num_text_blocks
      forced = jnp.asarray(rows | cols)
    mask = selection.cumulative_mass_mask(
        scores, cfg.mass, min_blocks=lo, max_blocks=hi,
        include_crossing=False, mandatory=forced)
    return mask, scores

  def _pooled(self, k, v):
    n = self.config.pool_size
    return selection.mean_pool(k, n), selection.mean_pool(v, n)

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
           key: jax.Array | None = None, **kwargs) -> base.SparsePlan:
    """One plan over [k ; k_pooled] (the single-call form).

    Args:
      q: [B, T, Hq, D] (curve order for video); T a multiple of block_size.
      k: [B, S, Hkv, D], S a multiple of block_size.
      v: [B, S, Hkv, D].
      key: PRNG key of the sampling offsets; default from `config.seed`.
      **kwargs: unused.

    Returns:
      A SparsePlan with extra_k/extra_v the ceil(S / n) pooled keys, bias_k
      ln(tokens per pooled key) on them, and aux {"block_mask", "scores",
      "sparsity"} (sparsity = 1 - mean(M) - 1/n, the paper's figure).
    """
    del kwargs
    cfg = self.config
    b, s = cfg.block_size, k.shape[1]
    if not cfg.global_branch:
      return self.branch_plans(q, k, v, key=key)[0]
    mask, scores = self.block_mask(q, k, key=key)
    kp, vp = self._pooled(k, v)
    pooled_blocks = layout_lib.cdiv(kp.shape[1], b)
    lo_hi = cfg.block_budget(mask.shape[-1])
    kmax = (mask.shape[-1] if cfg.num_text_blocks
            else lo_hi[1]) + pooled_blocks
    full = jnp.concatenate(
        [mask, jnp.ones(mask.shape[:-1] + (pooled_blocks,), bool)], -1)
    layout = layout_lib.BlockLayout.from_block_mask(
        full, b, b, full_block_mask=full, max_kv_blocks=kmax)
    sparsity = 1.0 - mask.mean() - 1.0 / cfg.pool_size
    return base.SparsePlan(
        layout=layout, extra_k=kp, extra_v=vp, bias_k=kv_bias(s, cfg.pool_size),
        aux={"block_mask": mask, "scores": scores, "sparsity": sparsity})

  def branch_plans(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
                   key: jax.Array | None = None
                   ) -> tuple[base.SparsePlan, base.SparsePlan]:
    """The two-branch form: (sparse plan over k, global plan over k_pooled).

    Both attend with the original (q, k, v); the global plan lists only the
    pooled keys (appended as extras) and carries their ln n bias.
    """
    cfg = self.config
    b, s = cfg.block_size, k.shape[1]
    mask, scores = self.block_mask(q, k, key=key)
    kb = mask.shape[-1]
    kmax = kb if cfg.num_text_blocks else cfg.block_budget(kb)[1]
    sparse = base.SparsePlan(
        layout=layout_lib.BlockLayout.from_block_mask(
            mask, b, b, full_block_mask=mask, max_kv_blocks=kmax),
        aux={"block_mask": mask, "scores": scores})
    kp, vp = self._pooled(k, v)
    pooled_blocks = layout_lib.cdiv(kp.shape[1], b)
    only_pooled = np.zeros((1, 1, mask.shape[-2], kb + pooled_blocks), bool)
    only_pooled[..., kb:] = True
    pooled = base.SparsePlan(
        layout=layout_lib.BlockLayout.from_block_mask(
            only_pooled, b, b, full_block_mask=only_pooled),
        extra_k=kp, extra_v=vp, bias_k=kv_bias(s, cfg.pool_size))
    return sparse, pooled

  def __call__(self, q, k, v, *, sm_scale=None, implementation=None,
               interpret=False, **kwargs):
    """plan + attend; with merge="lse", two calls merged by log-sum-exp."""
    if self.config.merge == "single" or not self.config.global_branch:
      return super().__call__(q, k, v, sm_scale=sm_scale,
                              implementation=implementation,
                              interpret=interpret, **kwargs)
    sparse, pooled = self.branch_plans(q, k, v, key=kwargs.get("key"))
    attend = dict(sm_scale=sm_scale, return_lse=True,
                  implementation=implementation, interpret=interpret)
    out_a, lse_a = sparse.attend(q, k, v, **attend)
    out_b, lse_b = pooled.attend(q, k, v, **attend)
    return merge_by_lse(out_a, lse_a, out_b, lse_b)
