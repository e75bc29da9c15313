"""HiP: hierarchically pruned attention (training-free, causal LMs).

Paper: "A Training-Free Sub-quadratic Cost Transformer Model Serving
Framework with Hierarchically Pruned Attention", https://arxiv.org/abs/
2406.09827 (ICLR 2025; code: DeepAuto-AI/hip-attention).

For each block of `block_q` queries a tree search estimates the top
K = budget / block_k key blocks of the search range [sink, P - window), P
the block's last position + 1: K near-equal nodes cover the range; each
round splits every node in two, scores each half by the max dot product of
the block's strided queries with the `block_k` keys of one representative
block inside it, and keeps the K best halves, until every node is a single
key block (about log2(n / K) rounds). Each query row t then attends exactly,
in one softmax, to the union of the sink [0, sink), the selected blocks
(keys <= t) and the window (t - window, t]; every key counts once.

Two execution paths, both one op call:
  * block-aligned (`block_k` = the layout's kv block, a multiple of 16): a
    BlockLayout lists the selected and sink blocks as full and the window
    blocks as partial under the window band; the picks are whole tiles.
  * gather (any `block_k`, e.g. the paper's 2): a RowLayout with one key
    list per (query head, query block), group_size = block_q, listing the
    sink, the selected tokens and the window span, with row ranges for the
    exact per-row visibility (causal, window). Tiny key blocks fit no kernel tile; a
    BlockLayout of block_k-wide blocks would gather the same rows, while
    the list shares each gathered key among the block_q rows that searched
    together and carries the exact union in its row ranges. Its length is
    constant in T (Kmax = sink + budget + window + block_q - 1): memory and
    work are O(T * Kmax).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import top_n
from jsparse.methods import base
from pallas_kernels import RowLayout
from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class HiPConfig:
  """HiP hyperparameters (defaults: v1.1 `HiPAttentionArgs`, b_q = 32).

  Attributes:
    budget: k, selected key tokens per query block (K = budget / block_k).
    block_q: b_q, queries sharing one search (also the layout's q block).
    query_stride: s_q, query subsampling when scoring.
    block_k: b_k, tokens per key block.
    sink: S, leading tokens every query sees.
    window: W, sliding window (t - W, t] every query sees.
    representative: "center" (v1.1) or "first" (v1.0) block of a node.
    path: "auto" (block-aligned when block_k is a multiple of 16 and the
      sink a multiple of block_k, else gather), "block" or "gather".
    dense_layers: the first layers attend densely.
    refresh_every: r, decode steps between searches (needs r <= W).
  """

  budget: int = 512
  block_q: int = 32
  query_stride: int = 2
  block_k: int = 2
  sink: int = 16
  window: int = 256
  representative: str = "center"
  path: str = "auto"
  dense_layers: int = 0
  refresh_every: int = 8

  @property
  def num_blocks(self) -> int:
    """K, the selected key blocks per query block."""
    return max(self.budget // self.block_k, 1)

  def use_block_path(self) -> bool:
    if self.path != "auto":
      return self.path == "block"
    return self.block_k % 16 == 0 and self.sink % self.block_k == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HiPMask:
  """The search result, reusable across decode steps.

  Attributes:
    block_ids: int32 [B, Hq, Qb, K] selected key block ids m (tokens
      [sink + m * block_k, sink + (m + 1) * block_k)), ascending among
      valid entries.
    valid: bool [B, Hq, Qb, K]; fewer than K are valid near the start.
  """

  block_ids: jax.Array
  valid: jax.Array


def _num_rounds(max_blocks: int, k: int) -> int:
  """Rounds until every node has one block: node sizes halve (ceil)."""
  size = -(-max_blocks // k)
  return max(math.ceil(math.log2(size)), 0) if size > 1 else 0


# Gathered representative keys per search chunk (f32 elements): chunks of
# this size stay in cache, which on CPU is most of the search's cost.
_CHUNK_ELEMENTS = 1 << 20


def _searchable_blocks(config: HiPConfig, q_len: int, q_offset):
  """[Qb] key blocks n in each query block's range [sink, P - window).

  NumPy when q_offset is a Python int (prefill), else traced (decode).
  """
  xp = np if isinstance(q_offset, int) else jnp
  bq, bk = config.block_q, config.block_k
  last = q_offset + xp.minimum((xp.arange(layout_lib.cdiv(q_len, bq)) + 1)
                               * bq, q_len)
  n = xp.maximum(last - config.window - config.sink, 0)
  return (n + bk - 1) // bk


def _runs(n, max_blocks: int, k: int) -> list[tuple[int, int, int]]:
  """(first, end, rounds) runs of query blocks needing the same rounds.

  A node of size 1 splits into itself and an empty child, so the rounds a
  block does not need change nothing; with static n (prefill, n grows with
  the block) each run does only its own. Traced n: one run, all rounds.
  """
  if not isinstance(n, np.ndarray):
    return [(0, n.shape[0], _num_rounds(max_blocks, k))]
  rounds = [_num_rounds(int(x), k) for x in n]
  cuts = [0] + [i for i in range(1, len(n)) if rounds[i] != rounds[i - 1]]
  return [(lo, hi, rounds[lo]) for lo, hi in zip(cuts, cuts[1:] + [len(n)])]


def _key_blocks(k: jax.Array, config: HiPConfig) -> jax.Array:
  """[B * Hkv * N, block_k * D]: the searchable key blocks, contiguous.

  Block m holds tokens sink + m * block_k + (0..block_k-1), clamped to the
  last key.
  """
  b, s, hkv, d = k.shape
  bk = config.block_k
  num = layout_lib.cdiv(max(s - config.sink, 1), bk)
  tok = np.minimum(config.sink + np.arange(num * bk), s - 1)
  blocks = k[:, tok].reshape(b, num, bk, hkv, d).transpose(0, 3, 1, 2, 4)
  return blocks.reshape(b * hkv * num, bk * d)


def _search_chunk(qs, n, base, keys, rounds: int, config: HiPConfig):
  """The tree search of C independent (batch, head, query block) problems.

  Each round keeps the K best of the 2K halves, ties to the lower slot, in
  slot order (`top_n.top_n_indices`: on CPU about 0.1x the time of
  `lax.top_k`, which sorts).

  Args:
    qs: f32 [C, I, D] strided queries.
    n: int32 [C] searchable key blocks.
    base: int32 [C] row of the problem's first key block in `keys`.
    keys: f32 [B * Hkv * N, block_k * D] from `_key_blocks`.
    rounds: static number of rounds.
    config: the HiP config.

  Returns:
    (start, size) int32 [C, K]: the final nodes; size 0 marks an empty one.
  """
  nk, bk = config.num_blocks, config.block_k
  c, _, d = qs.shape
  num = keys.shape[0]
  bounds = jnp.arange(nk + 1)[None, :] * n[:, None] // nk  # [C, K + 1]
  start, size = bounds[:, :-1], bounds[:, 1:] - bounds[:, :-1]
  for _ in range(rounds):
    half = size // 2
    c_start = jnp.concatenate([start, start + half], -1)  # [C, 2K]
    c_size = jnp.concatenate([half, size - half], -1)
    rep = c_start + (c_size // 2 if config.representative == "center" else 0)
    rows = jnp.minimum(base[:, None] + rep, num - 1)
    rep_keys = jnp.take(keys, rows.reshape(-1), axis=0).reshape(
        c, 2 * nk * bk, d)
    dots = jnp.einsum("cid,cjd->cji", qs, rep_keys)
    score = dots.max(-1).reshape(c, 2 * nk, bk).max(-1)
    score = jnp.where(c_size > 0, score, -jnp.inf)
    pick = top_n.top_n_indices(score, nk)  # ties: the lower child slot
    start = jnp.take_along_axis(c_start, pick, -1)
    size = jnp.take_along_axis(c_size, pick, -1)
  return start, size


def _search_run(qs, n, base, keys, rounds: int, config: HiPConfig):
  """`_search_chunk` over [B, Hq, L] problems in cache-sized chunks.

  Args:
    qs: f32 [B, Hq, L, I, D]; n: int [L]; base: int32 [B, Hq].

  Returns:
    (start, size) int32 [B, Hq, L, K].
  """
  b, h, length, _, d = qs.shape
  p = b * h * length
  per = max(1, min(p, _CHUNK_ELEMENTS // (2 * config.num_blocks
                                          * config.block_k * d)))
  chunks = layout_lib.cdiv(p, per)
  pad = chunks * per - p  # padded problems have n = 0: every node empty
  flat = lambda x: jnp.pad(x.reshape(p, *x.shape[3:]),
                           [(0, pad)] + [(0, 0)] * (x.ndim - 3)).reshape(
                               chunks, per, *x.shape[3:])
  n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (b, h, length))
  base = jnp.broadcast_to(base[:, :, None], (b, h, length))
  start, size = jax.lax.map(
      lambda x: _search_chunk(*x, keys, rounds, config),
      (flat(qs), flat(n), flat(base)))
  unflat = lambda x: x.reshape(chunks * per, -1)[:p].reshape(b, h, length,
                                                             -1)
  return unflat(start), unflat(size)


def search(q: jax.Array, k: jax.Array, config: HiPConfig, *,
           q_offset: jax.Array | int = 0) -> HiPMask:
  """Hierarchical top-K key-block search (no gradient).

  Per query block and round it scores 2K representative blocks, so time
  is O(T / block_q * K * block_k * (block_q / query_stride) * D * rounds)
  with rounds = ceil(log2(n / K)): O(T log T) for a fixed budget. Problems
  run in chunks whose gathered keys stay in cache; memory is O(T * D).

  Args:
    q: [B, T, Hq, D] post-RoPE queries at positions q_offset + arange(T).
    k: [B, S, Hkv, D] post-RoPE keys at positions arange(S).
    config: the HiP config.
    q_offset: position of q[:, 0]; a Python int (prefill) lets query
      blocks skip the rounds they do not need; may be traced (decode).

  Returns:
    The HiPMask of each (batch, query head, query block).
  """
  q, k = jax.lax.stop_gradient((q, k))
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  b, t, hq, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, nk = config.block_q, config.num_blocks
  qb = layout_lib.cdiv(t, bq)
  n = _searchable_blocks(config, t, q_offset)
  rows = np.minimum(np.arange(qb)[:, None] * bq
                    + np.arange(0, bq, config.query_stride)[None, :], t - 1)
  qs = jnp.moveaxis(q[:, rows], 3, 1)  # [B, Hq, Qb, I, D]
  keys = _key_blocks(k, config)
  num = keys.shape[0] // (b * hkv)
  base = ((jnp.arange(b)[:, None] * hkv + jnp.arange(hq)[None, :]
           // (hq // hkv)) * num).astype(jnp.int32)
  max_blocks = max(s - config.sink, 0) // config.block_k + 1
  parts = [_search_run(qs[:, :, lo:hi], n[lo:hi], base, keys, rounds,
                       config)
           for lo, hi, rounds in _runs(n, max_blocks, nk)]
  start, size = (jnp.concatenate(x, axis=2) for x in zip(*parts))
  valid = size > 0
  ids = jnp.sort(jnp.where(valid, start, jnp.iinfo(jnp.int32).max), -1)
  valid = jnp.sort(~valid, -1) == 0  # valid entries first after the sort
  return HiPMask(jnp.where(valid, ids, 0).astype(jnp.int32), valid)


def block_layout(mask: HiPMask, q_len: int, kv_len: int,
                 config: HiPConfig) -> layout_lib.BlockLayout:
  """Block-aligned path: layout over the original keys, block = block_k.

  Selected blocks and causally safe sink blocks are full; window blocks
  (and sink blocks reaching past the block's first query) are partial
  under the band -window < kv - q <= 0, with q right-aligned to the keys.
  Requires window >= block_q + block_k, so selected blocks precede every
  row of their query block and unsafe sink keys lie inside the window.
  """
  bq, bk = config.block_q, config.block_k
  qb, kb = layout_lib.cdiv(q_len, bq), layout_lib.cdiv(kv_len, bk)
  offset = kv_len - q_len
  first = offset + np.arange(qb) * bq  # first query position of each block
  last = offset + np.minimum(np.arange(qb) * bq + bq, q_len) - 1
  col = np.arange(kb)
  sink_blocks = (col < config.sink // bk)[None, :]
  col = col[None, :]
  sink_full = sink_blocks & ((col + 1) * bk - 1 <= first[:, None])
  window = ((col + 1) * bk - 1 > first[:, None] - config.window) & (
      col * bk <= last[:, None])
  partial = window | (sink_blocks & ~sink_full)
  b, h = mask.block_ids.shape[:2]
  selected = jnp.zeros((b, h, qb, kb + 1), bool)
  cols = jnp.where(mask.valid, config.sink // bk + mask.block_ids, kb)
  selected = jnp.put_along_axis(selected, cols, True, axis=-1,
                                inplace=False)[..., :kb]
  full = selected | jnp.asarray(sink_full)[None, None]
  kind = jnp.where(full, layout_lib.FULL,
                   jnp.where(jnp.asarray(partial)[None, None],
                             layout_lib.PARTIAL,
                             layout_lib.EMPTY)).astype(jnp.int8)
  kmax = (config.num_blocks + config.sink // bk
          + layout_lib.cdiv(config.window + bq, bk) + 1)
  return layout_lib.BlockLayout.from_kind_map(
      kind, bq, bk, max_kv_blocks=min(kmax, kb),
      band=(offset - config.window + 1, offset))


def row_layout(mask: HiPMask, q_len: int, kv_len: int, config: HiPConfig,
               q_offset=None) -> RowLayout:
  """Token path: one key list per (query head, query block), exact per row.

  The list of query block a is the sink [0, sink), the selected tokens and
  the window span (first - W, last] of the block, Kmax = sink + K * block_k
  + W + block_q - 1 (constant in T). Row t sees a sink or selected key iff
  it is <= t, and a window-span key iff it lies in (t - W, t]. Window-span
  keys below the sink or also selected are not listed, so each key is
  listed once and a selected key stays visible wherever the row's own
  window does not reach it.

  Args:
    mask: the search result.
    q_len: T.
    kv_len: S.
    config: the HiP config.
    q_offset: position of the first query (may be traced); default S - T.

  Returns:
    A RowLayout [B, Hq, Qb, Kmax] with group_size = block_q and row ranges.
  """
  bq, bk, w = config.block_q, config.block_k, config.window
  b, h, qb, nk = mask.block_ids.shape
  q_offset = kv_len - q_len if q_offset is None else q_offset
  first = q_offset + jnp.arange(qb) * bq  # [Qb]
  shape = (b, h, qb)
  sink = jnp.broadcast_to(jnp.arange(config.sink), (*shape, config.sink))
  sel = (config.sink + mask.block_ids[..., None] * bk
         + jnp.arange(bk).reshape(1, 1, 1, 1, bk)).reshape(*shape, nk * bk)
  sel_ok = jnp.repeat(mask.valid, bk, axis=-1)
  span = w + bq - 1
  win = jnp.broadcast_to(first[:, None] - w + 1 + jnp.arange(span)[None, :],
                         (*shape, span))
  # Selected tokens inside the window span, as offsets into it (negative
  # ones would wrap around, so they go out of range too).
  offset = sel - win[..., :1]
  offset = jnp.where(sel_ok & (offset >= 0), offset, span)
  in_span = jnp.zeros((*shape, span), bool).at[
      jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
      jnp.arange(qb)[None, None, :, None], offset].set(True, mode="drop")
  win_ok = (win >= config.sink) & ~in_span
  tok = jnp.concatenate([sink, sel, win], -1)
  ok = jnp.concatenate([jnp.ones_like(sink, bool), sel_ok, win_ok], -1)
  ok &= (tok >= 0) & (tok < kv_len)
  kind = np.concatenate([np.zeros(config.sink + nk * bk, bool),
                         np.ones(span, bool)])  # window-span slots
  # Row first + r sees token j when j <= first + r (causal) and, for the
  # window-span slots, first + r < j + w.
  local = tok - first[None, None, :, None]
  row_start = jnp.clip(local, 0, bq)
  row_end = jnp.clip(jnp.where(jnp.asarray(kind), local + w, bq), 0, bq)
  return RowLayout.from_indices(
      jnp.where(ok, tok, kv_len), num_keys=kv_len, group_size=bq,
      row_start=row_start, row_end=row_end)


class HiPMethod(base.SparseMethod):
  """Hierarchical pruning of key blocks; causal; no parameters."""

  def __init__(self, config: HiPConfig = HiPConfig()):
    if config.representative not in ("center", "first"):
      raise ValueError(
          f"representative must be 'center' or 'first', got "
          f"{config.representative!r}")
    if config.path not in ("auto", "block", "gather"):
      raise ValueError(f"unknown path {config.path!r}")
    if config.use_block_path() and (
        config.sink % config.block_k
        or config.window < config.block_q + config.block_k):
      raise ValueError(
          "the block path needs sink % block_k == 0 and window >= block_q "
          "+ block_k")
    if config.refresh_every > config.window:
      raise ValueError("mask reuse needs refresh_every <= window")
    self.config = config

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
           layer: int | None = None, **kwargs) -> base.SparsePlan:
    """Searches and builds the plan (causal, queries right-aligned to keys).

    Args:
      q: [B, T, Hq, D] post-RoPE queries at positions S - T + arange(T).
      k, v: [B, S, Hkv, D] post-RoPE keys; S a multiple of block_k on the
        block path.
      layer: transformer layer index (static) for the dense first layers.
      **kwargs: unused.

    Returns:
      A SparsePlan with aux {"mask": HiPMask}.
    """
    del v, kwargs
    cfg = self.config
    t, s = q.shape[1], k.shape[1]
    if layer is not None and layer < cfg.dense_layers:
      return base.SparsePlan(layout=layout_lib.BlockLayout.from_band(
          t, s, min(cfg.block_q, t), min(128, s), (None, s - t)))
    mask = search(q, k, cfg, q_offset=s - t)
    layout = (block_layout(mask, t, s, cfg) if cfg.use_block_path()
              else row_layout(mask, t, s, cfg))
    return base.SparsePlan(layout=layout, aux={"mask": mask})

  def decode_plan(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
                  index: jax.Array, mask: HiPMask | None = None
                  ) -> base.SparsePlan:
    """One decode step (gather path); reuses `mask` unless it is due.

    Args:
      q: [B, 1, Hq, D] the query at position `index` (may be traced).
      k, v: [B, S_max, Hkv, D] the cache; entries past `index` are unset.
      index: int32 scalar position.
      mask: the HiPMask of the last refresh, or None to search now. The
        search reruns when index % refresh_every == 0.

    Returns:
      A SparsePlan with aux {"mask"} to pass to the next step.
    """
    del v
    cfg = dataclasses.replace(self.config, block_q=1, query_stride=1)
    fresh = lambda: search(q, k, cfg, q_offset=index)
    if mask is None:
      mask = fresh()
    else:
      mask = jax.lax.cond(index % cfg.refresh_every == 0, fresh,
                          lambda: mask)
    layout = row_layout(mask, 1, k.shape[1], cfg, q_offset=index)
    return base.SparsePlan(layout=layout, aux={"mask": mask})
