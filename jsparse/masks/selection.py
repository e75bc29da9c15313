"""On-device block selection shared by every dynamic method.

All functions are jit-able and gradient-free by construction (scores pass
through `stop_gradient`); they turn q/k into boolean block masks
[B, H, Qb, Kb] that `BlockLayout.from_block_mask` compacts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import layout as layout_lib


def mean_pool(x: jax.Array, block: int, axis: int = 1) -> jax.Array:
  """Mean over consecutive groups of `block` along `axis`.

  A ragged last group is averaged over its valid entries only.

  Args:
    x: e.g. [B, T, H, D].
    block: group size.
    axis: the sequence axis.

  Returns:
    x with `axis` of size ceil(T / block).
  """
  x = jnp.moveaxis(x, axis, 0)
  t = x.shape[0]
  n = layout_lib.cdiv(t, block)
  pad = n * block - t
  summed = jnp.pad(x.astype(jnp.float32), [(0, pad)] + [(0, 0)] *
                   (x.ndim - 1)).reshape(n, block, *x.shape[1:]).sum(1)
  counts = jnp.minimum(block, t - jnp.arange(n) * block).astype(jnp.float32)
  pooled = summed / counts.reshape((n,) + (1,) * (x.ndim - 1))
  return jnp.moveaxis(pooled.astype(x.dtype), 0, axis)


def _per_q_head(k: jax.Array, num_q_heads: int) -> jax.Array:
  """[B, S, Hkv, D] -> [B, S, Hq, D] (GQA view for scoring only)."""
  return jnp.repeat(k, num_q_heads // k.shape[2], axis=2)


def pooled_block_scores(q: jax.Array, k: jax.Array, block_q: int,
                        block_kv: int) -> jax.Array:
  """Scores of mean-pooled query blocks against mean-pooled key blocks.

  Args:
    q: [B, T, Hq, D]; k: [B, S, Hkv, D].

  Returns:
    f32 [B, Hq, Qb, Kb] scaled dot products (no gradient).
  """
  q, k = jax.lax.stop_gradient((q, k))
  qp = mean_pool(q, block_q)
  kp = _per_q_head(mean_pool(k, block_kv), q.shape[2])
  return jnp.einsum("bqhd,bkhd->bhqk", qp, kp,
                    preferred_element_type=jnp.float32) / jnp.sqrt(
                        jnp.float32(q.shape[-1]))


def sampled_block_scores(q: jax.Array, k: jax.Array, block_q: int,
                         block_kv: int, *, q_samples: int, kv_samples: int,
                         key: jax.Array) -> jax.Array:
  """Block importance from sampled tokens (the PSA / BLADE-ASA estimator).

  The same random in-block offsets are used for all blocks. For a sampled
  query i and block j: m_ij = max over sampled keys t of q_i.k_t / sqrt(D),
  s_ij = exp(m_ij - max_j m_ij); the block score is the max of s_ij over the
  sampled queries of the block, then each row is normalised to sum to 1.

  Args:
    q: [B, T, Hq, D] with T a multiple of block_q.
    k: [B, S, Hkv, D] with S a multiple of block_kv.
    q_samples: sampled queries per query block.
    kv_samples: sampled keys per kv block.
    key: PRNG key for the offsets.

  Returns:
    f32 [B, Hq, Qb, Kb], rows summing to 1.
  """
  q, k = jax.lax.stop_gradient((q, k))
  b, t, hq, d = q.shape
  s = k.shape[1]
  if t % block_q or s % block_kv:
    raise ValueError(
        f"sampled_block_scores needs T ({t}) and S ({s}) to be multiples of "
        f"block_q ({block_q}) and block_kv ({block_kv})")
  kq, kk = jax.random.split(key)
  q_off = jax.random.choice(kq, block_q, (q_samples,), replace=False)
  k_off = jax.random.choice(kk, block_kv, (kv_samples,), replace=False)
  qs = q.reshape(b, t // block_q, block_q, hq, d)[:, :, q_off]
  ks = _per_q_head(k, hq).reshape(b, s // block_kv, block_kv, hq, d)[
      :, :, k_off]
  dots = jnp.einsum("bqihd,bkjhd->bhqikj", qs, ks,
                    preferred_element_type=jnp.float32, optimize=True)
  m = dots.max(-1) / jnp.sqrt(jnp.float32(d))  # [B, H, Qb, i, Kb]
  s_hat = jnp.exp(m - m.max(-1, keepdims=True))
  scores = s_hat.max(-2)
  return scores / scores.sum(-1, keepdims=True)


def topk_block_mask(scores: jax.Array, k: int, *,
                    mandatory: jax.Array | None = None,
                    allowed: jax.Array | None = None) -> jax.Array:
  """The `k` best blocks of each row, plus the mandatory ones.

  Args:
    scores: [..., Qb, Kb] block scores.
    k: blocks chosen per row (on top of the mandatory ones).
    mandatory: optional bool [..., Qb, Kb] (broadcastable) always kept
      (diagonal, sinks, window); they do not use up the `k` choices.
    allowed: optional bool mask (e.g. causal): never select elsewhere.

  Returns:
    bool [..., Qb, Kb].
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  excluded = jnp.zeros(scores.shape, bool)
  if mandatory is not None:
    excluded |= mandatory
  if allowed is not None:
    excluded |= ~allowed
  k = min(k, scores.shape[-1])
  masked = jnp.where(excluded, -jnp.inf, scores)
  values, idx = jax.lax.top_k(masked, k)
  chosen = jnp.zeros(scores.shape, bool)
  chosen = jnp.put_along_axis(chosen, idx, values > -jnp.inf, axis=-1,
                              inplace=False)
  if mandatory is not None:
    chosen |= mandatory if allowed is None else mandatory & allowed
  return chosen


def cumulative_mass_mask(scores: jax.Array, mass: float, *,
                         min_blocks: int = 1, max_blocks: int | None = None,
                         include_crossing: bool = True,
                         mandatory: jax.Array | None = None) -> jax.Array:
  """Smallest set of blocks per row holding `mass` of the row's total.

  Rows are ranked by descending score. With `include_crossing`, the block at
  which the cumulative mass first reaches `mass` is kept (PSA); without it,
  only the blocks before it (BLADE's energy mode). The count is clamped to
  [min_blocks, max_blocks].

  Args:
    scores: non-negative [..., Qb, Kb] block scores.
    mass: target fraction in (0, 1].
    min_blocks, max_blocks: clamps on the kept count per row.
    mandatory: optional bool [..., Qb, Kb] always kept (outside the count).

  Returns:
    bool [..., Qb, Kb].
  """
  if not 0 < mass <= 1:
    raise ValueError(f"mass must lie in (0, 1], got {mass}")
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  kb = scores.shape[-1]
  max_blocks = kb if max_blocks is None else max_blocks
  order = jnp.argsort(-scores, axis=-1, stable=True)
  ranked = jnp.take_along_axis(scores, order, axis=-1)
  cum = jnp.cumsum(ranked, -1) / jnp.maximum(ranked.sum(-1, keepdims=True),
                                             1e-30)
  crossing = jnp.sum(cum < mass, axis=-1)  # rank of the crossing block
  count = crossing + 1 if include_crossing else crossing
  count = jnp.clip(count, min_blocks, max_blocks)
  ranks = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
  keep_ranked = ranks < count[..., None]
  keep = jnp.put_along_axis(jnp.zeros(scores.shape, bool), order,
                            keep_ranked, axis=-1, inplace=False)
  if mandatory is not None:
    keep |= mandatory
  return keep


def band_block_mask(num_q_blocks: int, num_kv_blocks: int, block_q: int,
                    block_kv: int, band: layout_lib.Band) -> jax.Array:
  """bool [Qb, Kb]: blocks touching a positional band (window, diagonal)."""
  lay = layout_lib.BlockLayout.from_band(num_q_blocks * block_q,
                                         num_kv_blocks * block_kv, block_q,
                                         block_kv, band)
  return jnp.asarray(lay.to_block_mask()[0, 0] != layout_lib.EMPTY)


def topk_indices(scores: jax.Array, k: int) -> jax.Array:
  """Indices of the `k` best entries of each row (ties: lowest index first).

  Args:
    scores: [..., C] scores (no gradient flows through the choice).
    k: entries kept per row, clamped to C.

  Returns:
    int32 [..., min(k, C)] column ids in descending score order.
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  _, idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
  return idx.astype(jnp.int32)


def child_topk_indices(q: jax.Array, k: jax.Array, parent_idx: jax.Array,
                       fanout: int, topk: int) -> jax.Array:
  """Top-k keys among the children of each query's parent picks.

  Hierarchical refinement: key j of this level is a child of coarse key
  j // fanout, query m of this level is a child of coarse query m // fanout.
  Query m scores only the `fanout * Kp` children of the Kp coarse keys its
  parent picked (raw dot products), so the cost is linear in the length.

  Args:
    q: [B, M, Hq, D] queries of this level, M = fanout * Mp.
    k: [B, S, Hkv, D] keys of this level, S = fanout * Sp.
    parent_idx: int [B, Hq, Mp, Kp] coarse key ids picked by each coarse
      query (global ids in [0, Sp)).
    fanout: children per coarse token.
    topk: picks per query, clamped to fanout * Kp.

  Returns:
    int32 [B, Hq, M, min(topk, fanout * Kp)] global key ids of this level.
  """
  q, k = jax.lax.stop_gradient((q, k))
  b, m, hq, d = q.shape
  mp, kp = parent_idx.shape[2], parent_idx.shape[3]
  if m != mp * fanout:
    raise ValueError(
        f"q has {m} tokens but parent_idx has {mp} coarse queries of "
        f"fanout {fanout}")
  children = jnp.arange(fanout, dtype=parent_idx.dtype).reshape(
      1, 1, 1, 1, fanout)
  cand = (parent_idx[..., None] * fanout + children).reshape(
      b, hq, mp, kp * fanout)
  kh = jnp.moveaxis(_per_q_head(k, hq), 2, 1)  # [B, Hq, S, D]
  kc = jnp.take_along_axis(kh, cand.reshape(b, hq, mp * kp * fanout, 1),
                           axis=2).reshape(b, hq, mp, kp * fanout, d)
  qg = jnp.moveaxis(q, 2, 1).reshape(b, hq, mp, fanout, d)
  scores = jnp.einsum("bhpid,bhpcd->bhpic", qg, kc,
                      preferred_element_type=jnp.float32)
  slots = topk_indices(scores, topk)  # [B, Hq, Mp, fanout, k]
  cand = jnp.broadcast_to(cand[:, :, :, None, :], scores.shape)
  picked = jnp.take_along_axis(cand, slots, axis=-1)
  return picked.reshape(b, hq, m, slots.shape[-1]).astype(jnp.int32)


def prefix_topk_mask(scores: jax.Array, k: int) -> jax.Array:
  """Per-row causal top-k over keys: row i keeps the k best of keys 0..i.

  Ties go to the lower index (as `jax.lax.top_k`). Key j's rank among the
  keys 0..i is the number of better keys j' <= i, a cumulative sum over j',
  so no sort is needed; memory is O(S**2) per row of `scores`.

  Args:
    scores: [..., S] per-key scores (no gradient flows through the choice).
    k: keys kept per query row.

  Returns:
    bool [..., S, S] (query rows, key columns); row i holds min(i + 1, k)
    keys, all j <= i.
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  lead, s = scores.shape[:-1], scores.shape[-1]
  pos = jnp.arange(s)
  expand = lambda x: jnp.broadcast_to(x, (*lead, s, s))
  row = expand(scores[..., :, None])  # candidate better key j' (rows)
  col = expand(scores[..., None, :])  # key j (columns)
  earlier = expand(pos[:, None] < pos[None, :])
  better = (row > col) | ((row == col) & earlier)
  rank = jnp.cumsum(better.astype(jnp.int32), axis=-2)  # [..., i, j]
  return ~earlier & (rank < k)


def block_majority(mask: jax.Array, block: int) -> jax.Array:
  """Block smoothing: keep a block iff more than half its entries are set.

  A ragged last block votes over its valid entries only.

  Args:
    mask: bool [..., S].
    block: block size.

  Returns:
    bool [..., ceil(S / block)].
  """
  s = mask.shape[-1]
  n = layout_lib.cdiv(s, block)
  padded = jnp.pad(mask.astype(jnp.int32),
                   [(0, 0)] * (mask.ndim - 1) + [(0, n * block - s)])
  count = padded.reshape(*mask.shape[:-1], n, block).sum(-1)
  valid = jnp.minimum(block, s - jnp.arange(n) * block)
  return 2 * count > jnp.broadcast_to(valid, count.shape)
