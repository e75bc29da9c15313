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
axis (`extra_k`) with the bias ln n, so one op call is exact (`plan`); the
two-branch form merged by log-sum-exp (`merge_by_lse`) is the same function
and what calling the method runs by default: its large sparse call has no
bias and no ragged kv block, so it is cheaper on the "xla" backend. Pooling
covers every token, selected blocks included, as in the paper. Tokens should
be in the space-filling-curve order of `jsparse.masks.curves` for video.

`causal=True` is the causal variant for language models (raster order): the
estimate is restricted to the causal past (`causal_scores`, shared with
causal PSA: future blocks score 0, the diagonal block ranks first and is
always kept), the layout's causal band applies inside the diagonal block,
and there is no global branch (pooled keys would mix in future tokens).

Capacity: a row lists at most int(max_fraction * Kb) blocks (Kb with text
blocks, whose rows are dense), plus the ceil(S / n / block_size) pooled
blocks of the global branch; the mass rule never exceeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    merge: how calling the method attends: "lse" (two calls merged by
      log-sum-exp) or "single" (one op call over [K ; K_pooled], `plan`);
      same values and gradients.
    causal: causal self-attention (T = S, raster order); needs
      global_branch=False.
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
  merge: str = "lse"
  causal: bool = False
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


def merge_by_lse(outs: Sequence[jax.Array],
                 lses: Sequence[jax.Array]) -> jax.Array:
  """One softmax over the union of disjointly normalised key sets.

  Args:
    outs: [B, T, H, D] branch outputs.
    lses: f32 [B, H, T] their log-sum-exps (-inf: no key).

  Returns:
    [B, T, H, D] in the first output's dtype; 0 where no branch saw a key.
  """
  lse = jnp.stack(lses)  # [N, B, H, T]
  m = lse.max(0, keepdims=True)
  w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))
  total = w.sum(0, keepdims=True)
  w = jnp.moveaxis(w / jnp.where(total > 0, total, 1.0), 2, 3)[..., None]
  out = sum(w_i * o.astype(jnp.float32) for w_i, o in zip(w, outs))
  return out.astype(outs[0].dtype)


def attend_merged(q: jax.Array, branches, **attend) -> jax.Array:
  """Attends each branch and merges them into one softmax by LSE.

  Args:
    q: [B, T, Hq, D] queries.
    branches: (plan, k, v) triples; each plan attends (q, k, v).
    **attend: keywords of `SparsePlan.attend` (sm_scale, implementation,
      interpret).

  Returns:
    [B, T, Hq, D]: softmax over the union of the branches' key sets.
  """
  outs, lses = zip(*(plan.attend(q, k, v, return_lse=True, **attend)
                     for plan, k, v in branches))
  return merge_by_lse(outs, lses)


def causal_blocks(num_q_blocks: int, num_kv_blocks: int, block_q: int,
                  block_kv: int) -> tuple[np.ndarray, np.ndarray]:
  """Causal self-attention (key j visible to query i iff j <= i) by block.

  Returns:
    (past, crossing), bool [Qb, Kb] NumPy: `past` blocks end at or before
    their query block's first row (every query sees every key), `crossing`
    blocks are partly visible (the causal predicate applies inside); all
    other blocks lie in the future.
  """
  q_first = np.arange(num_q_blocks)[:, None] * block_q
  k_first = np.arange(num_kv_blocks)[None, :] * block_kv
  some, every = layout_lib.band_bounds(
      (None, 0), q_first, q_first + block_q - 1, k_first,
      k_first + block_kv - 1)
  return every, some & ~every


def causal_scores(scores: jax.Array, past: np.ndarray,
                  crossing: np.ndarray) -> jax.Array:
  """Block scores over the causal past: future blocks score 0, crossing
  blocks score the row's max + 1 (so they rank first).

  Args:
    scores: f32 [..., Qb, Kb] block importance.
    past, crossing: bool [Qb, Kb] from `causal_blocks`.
  """
  keep = np.broadcast_to(past | crossing, scores.shape)
  scores = jnp.where(keep, scores, 0.0)
  return jnp.where(np.broadcast_to(crossing, scores.shape),
                   scores.max(-1, keepdims=True) + 1, scores)


def sampled_scores(q: jax.Array, k: jax.Array, block_q: int, block_kv: int,
                   *, q_samples: int, kv_samples: int, causal: bool,
                   key: jax.Array | None, seed: int, method: str):
  """Sampled block importance, over the causal past when `causal`.

  The estimator BLADE and PSA share: `selection.sampled_block_scores`,
  then `causal_scores` for causal self-attention.

  Args:
    q: [B, T, Hq, D]; k: [B, S, Hkv, D].
    block_q, block_kv: block sizes.
    q_samples, kv_samples: sampled rows per block.
    causal: rank over the causal past (needs T == S).
    key: PRNG key of the sampling offsets; None: from `seed`.
    seed: the default key's seed.
    method: the caller's name, for the error.

  Returns:
    (scores f32 [B, Hq, Qb, Kb], (past, crossing) of `causal_blocks` when
    causal, else None).

  Raises:
    ValueError: if causal and T != S.
  """
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(
        f"causal {method} is self-attention: q has {q.shape[1]} tokens, k "
        f"has {k.shape[1]}")
  if key is None:
    key = jax.random.key(seed)
  scores = selection.sampled_block_scores(
      q, k, block_q, block_kv, q_samples=q_samples, kv_samples=kv_samples,
      key=key)
  if not causal:
    return scores, None
  blocks = causal_blocks(*scores.shape[-2:], block_q, block_kv)
  return causal_scores(scores, *blocks), blocks


class BladeMethod(base.SparseMethod):
  """ASA: mass-thresholded block mask plus a pooled global branch."""

  def __init__(self, config: BladeConfig = BladeConfig()):
    if config.merge not in ("single", "lse"):
      raise ValueError(f"merge must be 'single' or 'lse', got "
                       f"{config.merge!r}")
    if not 0 < config.min_fraction <= config.max_fraction <= 1:
      raise ValueError("need 0 < min_fraction <= max_fraction <= 1")
    if config.causal and config.global_branch:
      raise ValueError(
          "causal BLADE has no global branch (its pooled keys mix future "
          "tokens): set global_branch=False")
    self.config = config

  def capacity(self, num_kv_blocks: int) -> int:
    """Static Kmax of the sparse branch for Kb kv blocks (see the module)."""
    if self.config.num_text_blocks:
      return num_kv_blocks
    return self.config.block_budget(num_kv_blocks)[1]

  def _causal_blocks(self, num_q_blocks: int, num_kv_blocks: int):
    b = self.config.block_size
    return causal_blocks(num_q_blocks, num_kv_blocks, b, b)

  def block_mask(self, q: jax.Array, k: jax.Array, *,
                 key: jax.Array | None = None):
    """The sparse branch's block choice (no gradient).

    Args:
      q: [B, T, Hq, D]; k: [B, S, Hkv, D], T and S multiples of block_size.
      key: PRNG key of the sampling offsets; default from `config.seed`.

    Returns:
      (mask bool [B, Hq, Qb, Kb], scores f32 [B, Hq, Qb, Kb]); when causal,
      the scores are `causal_scores` and the mask holds no future block.

    Raises:
      ValueError: if causal and T != S.
    """
    cfg = self.config
    b = cfg.block_size
    samples = min(cfg.samples, b)
    scores, blocks = sampled_scores(
        q, k, b, b, q_samples=samples, kv_samples=samples, causal=cfg.causal,
        key=key, seed=cfg.seed, method="BLADE")
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
    if cfg.causal:
      past, crossing = blocks
      mask &= np.broadcast_to(past | crossing, mask.shape)
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
      return self.sparse_plan(q, k, key=key)
    mask, scores = self.block_mask(q, k, key=key)
    kp, vp = self._pooled(k, v)
    pooled_blocks = layout_lib.cdiv(kp.shape[1], b)
    kmax = self.capacity(mask.shape[-1]) + pooled_blocks
    full = jnp.concatenate(
        [mask, jnp.ones(mask.shape[:-1] + (pooled_blocks,), bool)], -1)
    layout = layout_lib.BlockLayout.from_block_mask(
        full, b, b, full_block_mask=full, max_kv_blocks=kmax)
    sparsity = 1.0 - mask.mean() - 1.0 / cfg.pool_size
    return base.SparsePlan(
        layout=layout, extra_k=kp, extra_v=vp, bias_k=kv_bias(s, cfg.pool_size),
        aux={"block_mask": mask, "scores": scores, "sparsity": sparsity})

  def sparse_plan(self, q: jax.Array, k: jax.Array, *,
                  key: jax.Array | None = None) -> base.SparsePlan:
    """The sparse branch alone: the chosen blocks of k (Kmax `capacity`).

    Args:
      q: [B, T, Hq, D]; k: [B, S, Hkv, D] (S = T when causal).
      key: PRNG key of the sampling offsets; default from `config.seed`.
    """
    b = self.config.block_size
    mask, scores = self.block_mask(q, k, key=key)
    qb, kb = mask.shape[-2:]
    full, band = mask, None
    if self.config.causal:
      past = self._causal_blocks(qb, kb)[0]
      full, band = mask & np.broadcast_to(past, mask.shape), (None, 0)
    return base.SparsePlan(
        layout=layout_lib.BlockLayout.from_block_mask(
            mask, b, b, full_block_mask=full,
            max_kv_blocks=self.capacity(kb), band=band),
        aux={"block_mask": mask, "scores": scores})

  def branch_plans(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
                   key: jax.Array | None = None
                   ) -> tuple[base.SparsePlan, base.SparsePlan]:
    """The two-branch form: (sparse plan over k, global plan over k_pooled).

    Both attend with the original (q, k, v); the global plan lists only the
    pooled keys (appended as extras) and carries their ln n bias.

    Raises:
      ValueError: without a global branch.
    """
    cfg = self.config
    if not cfg.global_branch:
      raise ValueError("branch_plans needs global_branch=True")
    b, s = cfg.block_size, k.shape[1]
    sparse = self.sparse_plan(q, k, key=key)
    kb, qb = sparse.layout.num_kv_blocks, sparse.layout.num_q_blocks
    kp, vp = self._pooled(k, v)
    pooled_blocks = layout_lib.cdiv(kp.shape[1], b)
    only_pooled = np.zeros((1, 1, qb, kb + pooled_blocks), bool)
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
    return attend_merged(q, [(sparse, k, v), (pooled, k, v)],
                         sm_scale=sm_scale, implementation=implementation,
                         interpret=interpret)
