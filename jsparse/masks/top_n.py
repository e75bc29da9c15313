"""Exact top-n along the last axis without a sort (threshold search).

The n best entries of a row are found by building their threshold bit by
bit from the top of an int32 order key (32 counting passes over the row)
and cutting the ties at the threshold by position. On CPU this costs a
fraction of `jax.lax.top_k`, which sorts: for 4096 rows of 512 scores and
n = 256 the search and the index list take 16 ms against top_k's 141 ms
(2-core AMD EPYC). Ties go to the lower index, as a stable descending sort
orders them. No gradient flows through any choice made here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_KEY = jnp.iinfo(jnp.int32).min
# Elements per step of a chunked search (a cache-sized chunk).
_SEARCH_CHUNK = 1 << 20


def order_keys(scores: jax.Array) -> jax.Array:
  """int32 keys whose signed order is the float order of `scores`.

  -0.0 and 0.0 get the same key; -inf sorts below every finite score.
  """
  x = jax.lax.stop_gradient(scores).astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _count(pred: jax.Array) -> jax.Array:
  """int32 set entries along the last axis of a compare."""
  # XLA:CPU writes each pass's compare out before reducing it. Summed as f32
  # zeros and ones (exact while the row is below 2^24), the 8192 x 1024
  # search takes 0.65x the time of an int32 count on an AVX2 EPYC and the
  # same time on an AVX-512 Xeon. A bf16 count is 8x slower than f32 on the
  # EPYC (no AVX-512 BF16) and 0.6-0.7x on the Xeon; f32 has no slow host.
  if pred.shape[-1] < 1 << 24:
    return jnp.sum(pred.astype(jnp.float32), -1).astype(jnp.int32)
  return jnp.sum(pred, -1, dtype=jnp.int32)


def threshold(key: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Where the n best entries along the last axis of int32 keys end.

  The n best (ties: lower index first) are the entries with key > thr and
  those with key == thr at an index below cut. thr, the largest v with at
  least n keys >= v, is built bit by bit from the top (32 counting passes);
  cut is one past the position of the last tie to keep, read from the
  packed tie bits (`nth_set`: one pass and popcounts, not log2 C passes).

  Args:
    key: int32 [..., C] (`order_keys`).
    n: int32 [...] in [0, C].

  Returns:
    (thr, cut) int32 [...]; `chosen` turns them into the mask.
  """
  need = jnp.maximum(n, 1)

  def value_bit(i, thr):
    cand = thr + jnp.left_shift(jnp.int32(1), 30 - i)
    return jnp.where(_count(key >= cand[..., None]) >= need, cand, thr)

  thr = jnp.where(_count(key >= 0) >= need, 0, MIN_KEY).astype(jnp.int32)
  thr = jax.lax.fori_loop(0, 31, value_bit, thr)
  left = n - _count(key > thr[..., None])  # ties to keep
  last, _ = nth_set(key == thr[..., None], jnp.maximum(left, 1)[..., None] - 1)
  return thr, jnp.where(left > 0, last[..., 0] + 1, 0)


def chosen(key: jax.Array, thr: jax.Array, cut: jax.Array) -> jax.Array:
  """bool [..., C]: the entries `threshold` chose along the last axis."""
  index = jax.lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1)
  return (key > thr[..., None]) | ((key == thr[..., None])
                                   & (index < cut[..., None]))


def nth_set(mask: jax.Array, which: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """Position of the which-th set entry of each last-axis row (from 0).

  The row is packed into 32-bit words; the word comes from the running
  popcounts and the bit from a 5-step popcount bisection. One rank per row
  (M = 1) finds its word in one compare pass over the words; several ranks
  loop over the C / 32 words elementwise on `which`'s shape, so there is no
  scatter, sort or [..., M, C / 32] array.

  Args:
    mask: bool [..., C].
    which: int [..., M] (broadcastable) ranks to look up.

  Returns:
    (pos int32 [..., M], valid only where which < count; count int32
    [...], the set entries per row).
  """
  c = mask.shape[-1]
  words = -(-c // 32)
  bits = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, words * 32 - c)])
  bits = bits.reshape(*mask.shape[:-1], words, 32).astype(jnp.uint32)
  shifts = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, bits.ndim - 1)
  packed = jnp.sum(bits << shifts, -1, dtype=jnp.uint32)  # [..., W]
  ones = jax.lax.population_count(packed).astype(jnp.int32)
  before = jnp.cumsum(ones, -1) - ones  # set entries before each word
  shape = jnp.broadcast_shapes(which.shape, mask.shape[:-1] + (1,))
  # The word of each rank: the last word whose first rank is <= which.
  if shape[-1] == 1:
    which = jnp.broadcast_to(which, shape)
    index = jnp.sum(before <= which, -1, keepdims=True, dtype=jnp.int32) - 1
    rank = which - jnp.take_along_axis(before, index, -1)
    word = jnp.take_along_axis(packed, index, -1)
  else:
    rank = jnp.zeros(shape, jnp.int32)
    word = jnp.zeros(shape, jnp.uint32)
    index = jnp.zeros(shape, jnp.int32)
    for w in range(words):
      here = before[..., w:w + 1] <= which
      index = jnp.where(here, w, index)
      rank = jnp.where(here, which - before[..., w:w + 1], rank)
      word = jnp.where(here, packed[..., w:w + 1], word)
  pos = jnp.zeros_like(rank)
  for width in (16, 8, 4, 2, 1):
    low = jax.lax.population_count(
        word & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
    up = rank >= low
    rank = jnp.where(up, rank - low, rank)
    pos = jnp.where(up, pos + width, pos)
    word = jnp.where(up, word >> width, word)
  return index * 32 + pos, jnp.sum(ones, -1)


def in_chunks(fn, xs, row_size: int):
  """`jax.lax.map` of `fn` over the leading axis in cache-sized chunks.

  Args:
    fn: maps one row's slices of `xs` to its outputs.
    xs: pytree of arrays with a common leading axis R.
    row_size: elements one row's search reads.
  """
  rows = jax.tree.leaves(xs)[0].shape[0]
  chunk = max(1, min(rows, _SEARCH_CHUNK // max(row_size, 1)))
  return jax.lax.map(fn, xs, batch_size=chunk)


def top_n_mask(scores: jax.Array, n) -> jax.Array:
  """The n best entries of each last-axis row, for a per-row n (no sort).

  O(33 size) compares.

  Args:
    scores: [..., C] float scores.
    n: int, broadcastable to scores.shape[:-1]; clipped to [0, C].

  Returns:
    bool [..., C] with min(max(n, 0), C) entries set per row.
  """
  key = order_keys(scores)
  lead, c = key.shape[:-1], key.shape[-1]
  n = jnp.clip(jnp.broadcast_to(jnp.asarray(n, jnp.int32), lead), 0, c)
  thr, cut = in_chunks(lambda x: threshold(*x),
                       (key.reshape(-1, c), n.reshape(-1)), c)
  return chosen(key, thr.reshape(lead), cut.reshape(lead))


def top_n_indices(scores: jax.Array, n: int) -> jax.Array:
  """Indices of the n best entries of each last-axis row, ascending.

  The same set as `jax.lax.top_k(scores, n)[1]` (ties: lower index), listed
  in index order instead of score order.

  Args:
    scores: [..., C] float scores.
    n: static int in [0, C].

  Returns:
    int32 [..., n].
  """
  c = scores.shape[-1]
  if not 0 <= n <= c:
    raise ValueError(f"n must be in [0, {c}] (the last axis of scores), "
                     f"got {n}")
  keep = top_n_mask(scores, n)
  ranks = jnp.arange(n, dtype=jnp.int32).reshape((1,) * (scores.ndim - 1)
                                                 + (n,))
  pos, _ = nth_set(keep, ranks)
  return pos
