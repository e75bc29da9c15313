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
  * block-aligned (`block_k` = the layout's kv block): the layout lists the
    selected and sink blocks as full and the window blocks as partial under
    the window band;
  * gather (any `block_k`, e.g. the paper's 2): per (query head, query
    block) the sink, selected and window key rows are gathered into their
    own segment appended to the kv axis, and a tile per segment block
    holds the exact per-row visibility.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import base
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


def search(q: jax.Array, k: jax.Array, config: HiPConfig, *,
           q_offset: jax.Array | int = 0) -> HiPMask:
  """Hierarchical top-K key-block search (no gradient).

  Args:
    q: [B, T, Hq, D] post-RoPE queries at positions q_offset + arange(T).
    k: [B, S, Hkv, D] post-RoPE keys at positions arange(S).
    config: the HiP config.
    q_offset: position of q[:, 0]; may be traced (decode).

  Returns:
    The HiPMask of each (batch, query head, query block).
  """
  q, k = jax.lax.stop_gradient((q, k))
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk, nk = config.block_q, config.block_k, config.num_blocks
  qb = layout_lib.cdiv(t, bq)
  # Visible length of each query block, and its number of searchable blocks.
  last = q_offset + jnp.minimum((jnp.arange(qb) + 1) * bq, t)
  n = jnp.maximum(last - config.window - config.sink, 0)
  n = (n + bk - 1) // bk  # [Qb]
  rounds = _num_rounds(max(s - config.sink, 0) // bk + 1, nk)

  bounds = jnp.arange(nk + 1)[None, :] * n[:, None] // nk  # [Qb, K + 1]
  start = jnp.broadcast_to(bounds[:, :-1], (b, hq, qb, nk))
  size = jnp.broadcast_to(bounds[:, 1:] - bounds[:, :-1], (b, hq, qb, nk))

  rows = jnp.minimum(jnp.arange(qb)[:, None] * bq
                     + jnp.arange(0, bq, config.query_stride)[None, :], t - 1)
  qs = jnp.moveaxis(q[:, rows], 3, 1)  # [B, Hq, Qb, I, D]
  kh = jnp.moveaxis(k, 2, 1)[:, jnp.arange(hq) // (hq // hkv)]  # [B,Hq,S,D]
  for _ in range(rounds):
    half = size // 2
    c_start = jnp.concatenate([start, start + half], -1)  # [.., 2K]
    c_size = jnp.concatenate([half, size - half], -1)
    rep = c_start + (c_size // 2 if config.representative == "center" else 0)
    tok = config.sink + rep[..., None] * bk + jnp.arange(bk)[None, None,
                                                            None, None]
    tok = jnp.minimum(tok, s - 1).reshape(b, hq, qb * 2 * nk * bk)
    keys = jnp.take_along_axis(kh, tok[..., None], axis=2).reshape(
        b, hq, qb, 2 * nk * bk, d)
    dots = jnp.einsum("bhqid,bhqjd->bhqij", qs, keys)
    score = dots.max(-2).reshape(b, hq, qb, 2 * nk, bk).max(-1)
    score = jnp.where(c_size > 0, score, -jnp.inf)
    _, pick = jax.lax.top_k(score, nk)
    start = jnp.take_along_axis(c_start, pick, -1)
    size = jnp.take_along_axis(c_size, pick, -1)
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


def _gather_tokens(mask: HiPMask, q_len: int, kv_len: int, config: HiPConfig,
                   q_offset, block_kv: int):
  """Token ids and per-row visibility of each query block's key segment.

  Returns:
    tok int32 [B, Hq, Qb, L] key positions (clipped into range) and
    visible bool [B, Hq, Qb, block_q, L], L = sink + K * block_k + window +
    block_q - 1 rounded up to block_kv.
  """
  bq, bk, w = config.block_q, config.block_k, config.window
  b, h, qb, nk = mask.block_ids.shape
  first = q_offset + jnp.arange(qb) * bq  # [Qb]
  sink = jnp.broadcast_to(jnp.arange(config.sink), (b, h, qb, config.sink))
  sel = (config.sink + mask.block_ids[..., None] * bk
         + jnp.arange(bk).reshape(1, 1, 1, 1, bk)).reshape(b, h, qb, nk * bk)
  win = jnp.broadcast_to(first[:, None] - w + 1 + jnp.arange(w + bq - 1)[
      None, :], (b, h, qb, w + bq - 1))
  tok = jnp.concatenate([sink, sel, win], -1)
  kind = np.concatenate([np.zeros(config.sink, np.int8),
                         np.ones(nk * bk, np.int8),
                         np.full(w + bq - 1, 2, np.int8)])
  sel_valid = jnp.repeat(mask.valid, bk, axis=-1)
  ok = jnp.concatenate([jnp.ones_like(sink, bool), sel_valid,
                        jnp.ones_like(win, bool)], -1)
  ok &= (tok >= 0) & (tok < kv_len)
  row = first[:, None] + jnp.arange(bq)[None, :]  # [Qb, I] query positions
  row = row[None, None, :, :, None]
  j = tok[:, :, :, None, :]
  causal = j <= row
  # Union semantics: sink keys come from the sink part only, window keys
  # (t - W, t] from the window part only, selected keys elsewhere.
  in_window = j > row - w
  part = jnp.asarray(kind).reshape(1, 1, 1, 1, -1)
  visible = jnp.where(part == 0, causal,
                      jnp.where(part == 1, causal & ~in_window,
                                causal & in_window
                                & (j >= config.sink)))
  visible &= ok[:, :, :, None, :]
  in_range = (jnp.arange(bq)[None, :]
              < q_len - jnp.arange(qb)[:, None] * bq)
  visible &= in_range[None, None, :, :, None]
  width = layout_lib.cdiv(tok.shape[-1], block_kv) * block_kv
  pad = width - tok.shape[-1]
  tok = jnp.pad(jnp.clip(tok, 0, kv_len - 1), [(0, 0)] * 3 + [(0, pad)])
  visible = jnp.pad(visible, [(0, 0)] * 4 + [(0, pad)])
  return tok.astype(jnp.int32), visible


def gather_plan(mask: HiPMask, k: jax.Array, v: jax.Array, q_len: int,
                num_q_heads: int, config: HiPConfig, *, block_kv: int,
                q_offset=None) -> base.SparsePlan:
  """Gather path: one gathered key segment per (query head, query block).

  Args:
    mask: the search result.
    k, v: [B, S, Hkv, D], S a multiple of block_kv.
    q_len: T.
    num_q_heads: Hq.
    config: the HiP config.
    block_kv: the layout's kv block (segments are padded to it).
    q_offset: position of the first query; default S - T.

  Returns:
    A SparsePlan whose extra keys are the gathered rows (differentiable
    w.r.t. k, v) and whose layout lists only them, with per-row tiles.
  """
  b, s, hkv, d = k.shape
  bq = config.block_q
  if s % block_kv:
    raise ValueError(f"the gather path needs S ({s}) to be a multiple of "
                     f"block_kv ({block_kv})")
  q_offset = s - q_len if q_offset is None else q_offset
  tok, visible = _gather_tokens(mask, q_len, s, config, q_offset, block_kv)
  hq, qb, width = num_q_heads, tok.shape[2], tok.shape[3]
  g = hq // hkv
  # Segment of (query head h, block a) at extra rows ((a*g + h%g) * width).
  seg = tok.reshape(b, hkv, g, qb, width).transpose(0, 3, 2, 4, 1)
  seg = seg.reshape(b, qb * g * width, hkv, 1)
  extra_k = jnp.take_along_axis(k, seg, axis=1)
  extra_v = jnp.take_along_axis(v, seg, axis=1)
  per = width // block_kv
  head_slot = (jnp.arange(hq) % g)[:, None]
  first_block = (s // block_kv
                 + (jnp.arange(qb)[None, :] * g + head_slot) * per)
  kv_idx = first_block[..., None] + jnp.arange(per)[None, None, :]
  kv_idx = jnp.broadcast_to(kv_idx, (b, hq, qb, per)).astype(jnp.int32)
  tiles = visible.reshape(b, hq, qb, bq, per, block_kv)
  tiles = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(-1, bq, block_kv)
  layout = layout_lib.BlockLayout(
      kv_idx=kv_idx,
      kv_cnt=jnp.full((b, hq, qb), per, jnp.int32),
      kv_kind=jnp.full(kv_idx.shape, layout_lib.PARTIAL, jnp.int8),
      tile_idx=jnp.arange(tiles.shape[0], dtype=jnp.int32).reshape(
          kv_idx.shape),
      tiles=tiles,
      block_q=bq,
      block_kv=block_kv,
      num_kv_blocks=s // block_kv + qb * g * per)
  return base.SparsePlan(layout=layout, extra_k=extra_k, extra_v=extra_v)


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
      k, v: [B, S, Hkv, D] post-RoPE keys; S a multiple of block_k (block
        path) or of block_q (gather path).
      layer: transformer layer index (static) for the dense first layers.
      **kwargs: unused.

    Returns:
      A SparsePlan with aux {"mask": HiPMask}.
    """
    del kwargs
    cfg = self.config
    t, s = q.shape[1], k.shape[1]
    if layer is not None and layer < cfg.dense_layers:
      return base.SparsePlan(layout=layout_lib.BlockLayout.from_band(
          t, s, min(cfg.block_q, t), min(128, s), (None, s - t)))
    mask = search(q, k, cfg, q_offset=s - t)
    if cfg.use_block_path():
      plan = base.SparsePlan(layout=block_layout(mask, t, s, cfg))
    else:
      plan = gather_plan(mask, k, v, t, q.shape[2], cfg,
                         block_kv=cfg.block_q)
    return plan.replace(aux={"mask": mask})

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
    cfg = dataclasses.replace(self.config, block_q=1, query_stride=1)
    fresh = lambda: search(q, k, cfg, q_offset=index)
    if mask is None:
      mask = fresh()
    else:
      mask = jax.lax.cond(index % cfg.refresh_every == 0, fresh,
                          lambda: mask)
    plan = gather_plan(mask, k, v, 1, q.shape[2], cfg,
                       block_kv=math.gcd(k.shape[1], 64), q_offset=index)
    return plan.replace(aux={"mask": mask})
