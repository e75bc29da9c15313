"""On-device block selection shared by every dynamic method.

All functions are jit-able and gradient-free by construction (scores pass
through `stop_gradient`); they turn q/k into boolean block masks
[B, H, Qb, Kb] that `BlockLayout.from_block_mask` compacts, or into key index
lists for a `RowLayout` (`prefix_topk_rows`, `topk_keys`).
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
  so no sort is needed; memory is O(S**2) per row of `scores`: the dense
  oracle of `prefix_topk_rows`, for small S.

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


def _rankable(scores: jax.Array) -> jax.Array:
  """f32 scores in which top_k's order is that of `>` and `==`.

  -inf is reserved for "no key" (a real -inf becomes the f32 min), and -0.0
  becomes 0.0 (top_k puts it below 0.0 although they compare equal).
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  scores = jnp.where(scores == 0, 0.0, scores)
  return jnp.maximum(scores, jnp.finfo(jnp.float32).min)


def _key_blocks(scores: jax.Array, block: int) -> jax.Array:
  """[..., S] -> [..., ceil(S / block), block], padded with -inf."""
  n = layout_lib.cdiv(scores.shape[-1], block)
  pad = [(0, 0)] * (scores.ndim - 1) + [(0, n * block - scores.shape[-1])]
  padded = jnp.pad(scores, pad, constant_values=-jnp.inf)
  return padded.reshape(*scores.shape[:-1], n, block)


def prefix_topk_states(scores: jax.Array, k: int, block: int
                       ) -> tuple[jax.Array, jax.Array]:
  """Top-k keys of every block-aligned prefix, by a running blockwise merge.

  Key j beats key j' when its score is higher, ties going to the lower
  index. State a + 1 is the top-k of state a and the keys of block a (the
  top-k of a union only needs the top-k of each part), so one scan step
  costs a top_k over k + block entries: O(S / block * (k + block) log k).

  Args:
    scores: [..., S] per-key scores (no gradient flows through the choice).
    k: keys kept per prefix, clamped to S.
    block: prefix stride.

  Returns:
    (values f32 [..., N + 1, k'], idx int32 [..., N + 1, k']) with
    N = ceil(S / block), k' = min(k, S): state a lists the top-k' keys of
    [0, a * block), best first; value -inf marks an empty slot.
  """
  scores = _rankable(scores)
  lead = scores.shape[:-1]
  k = min(k, scores.shape[-1])
  blocks = jnp.moveaxis(_key_blocks(scores, block), -2, 0)  # [N, ..., R]
  ids = jnp.arange(blocks.shape[0] * block, dtype=jnp.int32).reshape(
      blocks.shape[0], *(1,) * len(lead), block)

  def merge(state, block_keys):
    # Candidates are in index order among equal scores (the state holds
    # lower indices, ordered by the same rule), as top_k's ties need.
    values = jnp.concatenate([state[0], block_keys[0]], -1)
    idx = jnp.concatenate([state[1], jnp.broadcast_to(
        block_keys[1], block_keys[0].shape)], -1)
    top, slot = jax.lax.top_k(values, k)
    return (top, jnp.take_along_axis(idx, slot, -1)), state

  empty = (jnp.full((*lead, k), -jnp.inf), jnp.zeros((*lead, k), jnp.int32))
  last, states = jax.lax.scan(merge, empty, (blocks, ids))
  values, idx = (jnp.moveaxis(jnp.concatenate([s, l[None]], 0), 0, -2)
                 for s, l in zip(states, last))
  return values, idx


def _visible_rows(tail_v: jax.Array, tail_ok: jax.Array, new_v: jax.Array,
                  new_ok: jax.Array, prefix: jax.Array, k: int) -> jax.Array:
  """Row r of a group sees a contested key while r < its end (in [0, R]).

  Contested keys are the tail of top(a - 1) (always available) and the R
  new keys (key r' from row r'). Rows are replayed in order: while the
  prefix holds fewer than k keys the new key enters; otherwise it enters
  iff it beats the worst visible key, which then leaves. The worst visible
  key is never one of the k - tail best of top(a - 1), so it is the lowest
  contested value, the last one among equal values (candidates are in
  beat order within the tail and index order among the new keys, the tail
  before them).

  Args:
    tail_v: f32 [P, t] worst entries of top(a - 1), best first.
    tail_ok: bool [P, t] which of them are keys.
    new_v: f32 [P, R] scores of the group's keys.
    new_ok: bool [P, R] which of them are keys (< S).
    prefix: int32 [P] a, keys before the group.
    k: keys kept per row.

  Returns:
    int32 [P, t + R]: the end row of each contested key (tail, then new);
    new key r' is visible on rows [r', end).
  """
  t, group = tail_v.shape[-1], new_v.shape[-1]
  values = jnp.concatenate([tail_v, new_v], -1)
  slots = jnp.arange(t + group)

  def insert(state, r):
    alive, end = state
    x, ok = new_v[:, r], new_ok[:, r]
    full = prefix + r >= k
    worst = t + group - 1 - jnp.argmin(
        jnp.where(alive, values, jnp.inf)[:, ::-1], axis=-1)
    worst_v = jnp.take_along_axis(values, worst[:, None], -1)[:, 0]
    evict = full & ok & (x > worst_v)
    enter = ok & (~full | evict)
    out = (slots[None, :] == worst[:, None]) & evict[:, None]
    slot = (slots == t + r)[None, :]
    alive = (alive & ~out) | (slot & enter[:, None])
    end = jnp.where(out | (slot & ~enter[:, None]), r, end)
    return (alive, end), None

  alive = jnp.concatenate([tail_ok, jnp.zeros_like(new_ok)], -1)
  end = jnp.full(values.shape, group, jnp.int32)
  (_, end), _ = jax.lax.scan(insert, (alive, end), jnp.arange(group))
  return end


def prefix_topk_rows(scores: jax.Array, k: int, group: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-row causal top-k as row-sparse lists, without any S x S array.

  Row i keeps top(i), the k best of keys 0..i (ties: lower index). For the
  group of rows a..a+R-1 (R = group), claim: top(i) is a subset of
  C = top(a - 1) | {a..a+R-1}. Proof: if j < a is in top(i), fewer than k
  keys <= i beat it, so fewer than k keys < a do and j is in top(a - 1).
  So each group lists the R + k keys of C. top(i) is top(i - 1) plus key i
  if that beats the worst of top(i - 1), which then leaves; a key that
  left never returns (its beaters only accumulate), so each key is visible
  on one interval of the group's rows, and only the new keys and the R
  worst of top(a - 1) can leave within the group. Work: O(S / R * (k + R)
  log k) for the prefixes, O(S / R * (k + R)) for the lists and row ranges.

  Args:
    scores: [..., S] per-key scores (no gradient flows through the choice).
    k: keys kept per row, clamped to S.
    group: R, query rows sharing one list (the RowLayout's group_size).

  Returns:
    kv_idx int32 [..., Qg, R + k'] (the R keys of the group, then top(a-1)
    best first; entries >= S are padding), kv_cnt int32 [..., Qg], and
    row_start, row_end int32 [..., Qg, R + k']: the rows [row_start,
    row_end) of a group see the entry (a RowLayout's row ranges);
    Qg = ceil(S / R), k' = min(k, S).
  """
  scores = _rankable(scores)
  lead, s = scores.shape[:-1], scores.shape[-1]
  k = min(k, s)
  old_v, old_i = (x[..., :-1, :] for x in prefix_topk_states(scores, k,
                                                             group))
  new_v = _key_blocks(scores, group)  # [..., Qg, R]
  qg = new_v.shape[-2]
  start = jnp.arange(qg, dtype=jnp.int32)[:, None] * group  # [Qg, 1]
  r = jnp.arange(group, dtype=jnp.int32)
  tail = min(group, k)  # slots of top(a - 1) that R new keys can push out
  flat = lambda x: x.reshape(-1, x.shape[-1])
  tail_v = flat(old_v[..., k - tail:])
  end = _visible_rows(
      tail_v, tail_v > -jnp.inf, flat(new_v),
      flat(jnp.broadcast_to(start + r[None, :] < s, new_v.shape)),
      jnp.broadcast_to(start[:, 0], new_v.shape[:-1]).reshape(-1), k)
  end = end.reshape(*lead, qg, tail + group)
  # Slots in list order: new keys (visible from their own row), then
  # top(a - 1), whose k - tail best are visible on every row.
  first = jnp.concatenate([r, jnp.zeros(k, jnp.int32)])
  last = jnp.concatenate([
      end[..., tail:], jnp.full((*lead, qg, k - tail), group, jnp.int32),
      end[..., :tail]], -1)
  kv_idx = jnp.concatenate([
      jnp.broadcast_to(start + r[None, :], (*lead, qg, group)), old_i], -1)
  kv_cnt = jnp.broadcast_to(group + jnp.minimum(start[:, 0], k),
                            (*lead, qg))
  return (kv_idx, kv_cnt.astype(jnp.int32),
          jnp.broadcast_to(first, last.shape), last)


def topk_keys(scores: jax.Array, k: int, *, valid: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """The k best keys of each row as an index list (ties: lower index).

  Args:
    scores: [..., S] per-key scores (no gradient flows through the choice).
    k: keys kept, clamped to S.
    valid: optional bool [..., S] (broadcastable): only these are keys.

  Returns:
    idx int32 [..., min(k, S)] best first, and cnt int32 [...]: the number
    of leading entries that are keys (fewer than k when few are valid).
  """
  scores = _rankable(scores)
  if valid is not None:
    scores = jnp.where(valid, scores, -jnp.inf)
  values, idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
  return idx, jnp.sum(values > -jnp.inf, -1).astype(jnp.int32)


def block_majority(idx: jax.Array, valid: jax.Array, num_keys: int,
                   block: int) -> jax.Array:
  """Block smoothing of key lists: keep blocks with most of their keys listed.

  A block is kept iff more than half of its keys are listed; a ragged last
  block votes over its valid keys only.

  Args:
    idx: int [..., L] distinct key indices in [0, num_keys).
    valid: bool [..., L] which entries are listed.
    num_keys: S.
    block: block size.

  Returns:
    bool [..., ceil(S / block)].
  """
  n = layout_lib.cdiv(num_keys, block)
  cols = jnp.where(valid, idx // block, n).reshape(-1, idx.shape[-1])
  rows = jnp.arange(cols.shape[0])[:, None]
  count = jnp.zeros((cols.shape[0], n + 1), jnp.int32).at[rows, cols].add(1)
  count = count[:, :n].reshape(*idx.shape[:-1], n)
  size = jnp.minimum(block, num_keys - jnp.arange(n) * block)
  return 2 * count > jnp.broadcast_to(size, count.shape)
