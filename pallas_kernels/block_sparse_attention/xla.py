"""Gather-based block-sparse attention in plain jnp; runs on any platform.

Each query block gathers its Kmax listed kv blocks and does one softmax over
them. Query blocks run in chunks (`lax.map` / `lax.scan`) sized so that one
chunk's gathered keys and logits stay around `_CHUNK_ELEMENTS` elements:
memory is O(T * Kmax) for the lists plus one chunk's work, never a T x S
array, whatever T. The backward pass recomputes each chunk's logits from the
saved log-sum-exp and scatter-adds the key-side gradients into f32
accumulators carried through the scan (deterministic on CPU and TPU).

Shape letters: B batch, L layout heads (kv heads, or q heads for per-q-head
layouts), G q heads per layout head, N chunks, Q q blocks (of a chunk), I
rows of a q block, J list slots (Kmax), K keys of a kv block, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import tile_math

NAME = "xla"
# Its backward is plain jnp, so it can be differentiated again.
SECOND_ORDER = True
# Target size of one chunk's work: B * L * Q * max(G * I, 2 * D) * J * K
# elements bounds its logits and its gathered keys and values. At T=8192 on
# a 2-core CPU (AMD EPYC, 512 KiB L2 per core) BLADE's and PSA's attention
# is equally fast from 2^17 to 2^20 and takes 1.15-1.35x that time at 2^22,
# forward and backward.
_CHUNK_ELEMENTS = 1 << 20


def unavailable_reason(platform: str, interpret: bool) -> str | None:
  del platform, interpret
  return None


@dataclasses.dataclass(frozen=True)
class _Geometry:
  batch: int
  num_q_heads: int
  num_kv_heads: int
  layout_heads: int  # L
  group: int  # G
  num_q_blocks: int
  block_q: int
  block_kv: int

  def kv_head(self):
    """[L] kv head read by each layout head."""
    per_q_head = self.layout_heads == self.num_q_heads
    return jnp.arange(self.layout_heads) // (
        self.num_q_heads // self.num_kv_heads if per_q_head else 1)

  def q_head(self):
    """[L, G] q head of each (layout head, group member)."""
    return (jnp.arange(self.layout_heads)[:, None] * self.group
            + jnp.arange(self.group)[None, :])


def _geometry(q, k, layout) -> _Geometry:
  b, t, hq, _ = q.shape
  hkv = k.shape[2]
  per_q_head = layout.num_heads == hq and hq != hkv
  lh = hq if per_q_head else hkv
  return _Geometry(b, hq, hkv, lh, hq // lh, t // layout.block_q,
                   layout.block_q, layout.block_kv)


def _to_blocks(x, geo: _Geometry):
  """[B, T, Hq, D] -> [B, L, G, Q, I, D]."""
  b, _, _, d = x.shape
  x = x.reshape(b, geo.num_q_blocks, geo.block_q, geo.layout_heads,
                geo.group, d)
  return x.transpose(0, 3, 4, 1, 2, 5)


def _from_blocks(x, geo: _Geometry):
  """[B, L, G, Q, I, D] -> [B, T, Hq, D]."""
  b, d = x.shape[0], x.shape[-1]
  x = x.transpose(0, 3, 4, 1, 2, 5)
  return x.reshape(b, geo.num_q_blocks * geo.block_q, geo.num_q_heads, d)


def _row_stat(x, geo: _Geometry):
  """[B, L, G, Q, I, 1, 1] -> [B, Hq, T]."""
  return x.reshape(geo.batch, geo.num_q_heads,
                   geo.num_q_blocks * geo.block_q)


def _row_stat_blocks(x, geo: _Geometry):
  """[B, Hq, T] -> [B, L, G, Q, I, 1, 1]."""
  return x.reshape(geo.batch, geo.layout_heads, geo.group, geo.num_q_blocks,
                   geo.block_q, 1, 1)


@dataclasses.dataclass(frozen=True)
class _Gathered:
  q: object  # [B, L, G, Q, I, D]
  k: object  # [B, L, Q, J, K, D]
  v: object  # [B, L, Q, J, K, D]
  kv_idx: object  # [B, L, Q, J]
  kv_pos: object  # [B, L, Q, J, K]
  bias_index: tuple | None  # (batch, head, position) index arrays
  bias: object | None  # [B, L, G, Q, 1, J, K]
  visible: object  # bool, broadcastable to [B, L, G, Q, I, J, K]


def _element_mask(layout, spec, geo, shape, kv_pos, q_seg, kv_seg,
                  causal_offset, first_q_block):
  """bool [B|1, L|1, 1, Q, I, J, K] element visibility, or None."""
  if not (spec.has_layout_mask or spec.has_op_mask or spec.kv_is_ragged):
    return None
  b = shape[0]
  q_blocks = first_q_block + jnp.arange(geo.num_q_blocks)
  q_pos = (q_blocks[:, None] * geo.block_q
           + jnp.arange(geo.block_q))[:, :, None, None]
  kv_pos = kv_pos[:, :, None, :, None]
  q_seg_e = kv_seg_e = tile = None
  if spec.has_segments:
    q_seg_e = q_seg.reshape(b, 1, 1, geo.num_q_blocks, geo.block_q, 1, 1)
    kv_seg_e = kv_seg[jnp.arange(b)[:, None, None, None, None, None, None],
                      kv_pos]
  if spec.has_tiles:
    tile_idx = jnp.broadcast_to(layout.tile_idx, shape)
    tile = jnp.where(tile_idx[..., None, None] >= 0,
                     jnp.asarray(layout.tiles)[jnp.maximum(tile_idx, 0)], True)
    tile = tile.transpose(0, 1, 2, 4, 3, 5)[:, :, None]  # [B,L,1,Q,I,J,K]
  full = jnp.broadcast_to(layout.kv_kind, shape) == layout_lib.FULL
  return tile_math.element_mask(
      q_pos, kv_pos, spec, full=full[:, :, None, :, None, :, None],
      causal_offset=causal_offset, q_seg=q_seg_e, kv_seg=kv_seg_e, tile=tile)


def _gather(q, k, v, bias_k, q_seg, kv_seg, layout, spec, geo,
            causal_offset, first_q_block):
  b, s, hkv, d = k.shape
  shape = (b, geo.layout_heads, geo.num_q_blocks, layout.max_kv_blocks)
  kv_idx = jnp.broadcast_to(layout.kv_idx, shape)
  kv_cnt = jnp.broadcast_to(layout.kv_cnt, shape[:3])
  kv_pos = kv_idx[..., None] * geo.block_kv + jnp.arange(geo.block_kv)
  batch_ix = jnp.arange(b)[:, None, None, None]
  head_ix = geo.kv_head()[None, :, None, None]

  def gather_kv(x):
    x = x.reshape(b, s // geo.block_kv, geo.block_kv, hkv, d)
    return x.transpose(0, 3, 1, 2, 4)[batch_ix, head_ix, kv_idx]

  slot = jnp.arange(layout.max_kv_blocks)
  visible = (slot < kv_cnt[..., None])[:, :, None, :, None, :, None]
  mask = _element_mask(layout, spec, geo, shape, kv_pos, q_seg, kv_seg,
                       causal_offset, first_q_block)
  if mask is not None:
    visible = visible & mask

  bias_index = bias = None
  if bias_k is not None:
    bb, hb, _ = bias_k.shape
    q_head = geo.q_head()
    if hb == 1:
      bias_head = jnp.zeros_like(q_head)
    elif hb == geo.num_q_heads:
      bias_head = q_head
    else:
      bias_head = q_head // (geo.num_q_heads // geo.num_kv_heads)
    bias_index = (
        (jnp.arange(b) if bb == b else jnp.zeros(b, jnp.int32))[
            :, None, None, None, None, None],
        bias_head[None, :, :, None, None, None],
        kv_pos[:, :, None],
    )
    bias = bias_k[bias_index][:, :, :, :, None]
  return _Gathered(_to_blocks(q, geo), gather_kv(k), gather_kv(v), kv_idx,
                   kv_pos, bias_index, bias, visible)


def _logits(g: _Gathered, spec):
  dot = jnp.einsum("blgqid,blqjkd->blgqijk", g.q, g.k,
                   preferred_element_type=jnp.float32)
  s = tile_math.logits(dot, spec, g.bias)
  return dot, jnp.where(g.visible, s, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _Chunking:
  """N chunks of Q query blocks each; the last chunk may be padded."""
  num_chunks: int  # N
  chunk: int  # Q

  @classmethod
  def of(cls, geo: _Geometry, layout, head_dim: int) -> _Chunking:
    per_block = (geo.batch * geo.layout_heads * layout.max_kv_blocks
                 * geo.block_kv * max(geo.group * geo.block_q, 2 * head_dim))
    chunk = max(1, min(geo.num_q_blocks, _CHUNK_ELEMENTS // per_block))
    num_chunks = -(-geo.num_q_blocks // chunk)
    # Balanced: the last chunk pads least.
    return cls(num_chunks, -(-geo.num_q_blocks // num_chunks))

  def split_rows(self, x, geo: _Geometry, axis: int):
    """x with T = Qb * I on `axis` -> [N, ...] with Q * I there."""
    pad = self.num_chunks * self.chunk * geo.block_q - x.shape[axis]
    x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    x = x.reshape(*x.shape[:axis], self.num_chunks, self.chunk * geo.block_q,
                  *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  def merge_rows(self, x, geo: _Geometry, axis: int):
    """Inverse of `split_rows` (padding dropped)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, geo.num_q_blocks * geo.block_q,
                                axis=axis)

  def split_layout(self, layout):
    """The lists [Bl, Hl, Qb, ...] -> [N, Bl, Hl, Q, ...]; padded query
    blocks list nothing. The tile pool is shared by every chunk."""
    pad = self.num_chunks * self.chunk - layout.num_q_blocks

    def split(x, fill=0):
      if x is None:
        return None
      x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3),
                  constant_values=fill)
      x = x.reshape(*x.shape[:2], self.num_chunks, self.chunk, *x.shape[3:])
      return jnp.moveaxis(x, 2, 0)

    return (split(layout.kv_idx), split(layout.kv_cnt),
            split(layout.kv_kind), split(layout.tile_idx, -1))

  def chunk_geometry(self, geo: _Geometry) -> _Geometry:
    return dataclasses.replace(geo, num_q_blocks=self.chunk)

  def inputs(self, q, q_seg, layout, geo: _Geometry):
    """Per-chunk (q, q_seg, lists, chunk number), leading axis N."""
    q_seg = None if q_seg is None else self.split_rows(q_seg, geo, 1)
    return (self.split_rows(q, geo, 1), q_seg, self.split_layout(layout),
            jnp.arange(self.num_chunks))


def _chunks(q, k, layout):
  """(geometry, chunking, geometry of one chunk) of q [B, T, Hq, D]."""
  geo = _geometry(q, k, layout)
  chunking = _Chunking.of(geo, layout, q.shape[-1])
  return geo, chunking, chunking.chunk_geometry(geo)


def _chunk_layout(layout, lists):
  kv_idx, kv_cnt, kv_kind, tile_idx = lists
  return dataclasses.replace(layout, kv_idx=kv_idx, kv_cnt=kv_cnt,
                             kv_kind=kv_kind, tile_idx=tile_idx)


# Host layouts are cut into at most this many row ranges of their own Kmax.
_MAX_ROW_SPLITS = 4


def host_layout_options(layout, num_q_heads: int = 0, num_kv_heads: int = 0
                        ) -> tuple[tuple[str, object], ...]:
  """Static options of a host layout: its row splits, when they pay.

  The head counts are unused (they matter to mosaic_tpu's options).

  The gather pays Kmax slots on every query block, so a layout whose rows
  differ in length (causal-like masks, MoA's head spans) wastes the gap. A
  host layout is cut into up to `_MAX_ROW_SPLITS` equal ranges of query
  blocks, each gathered with its own longest row, when that saves at least
  a fifth of the slots (a causal layout: 37%).

  Returns:
    (("row_splits", ((first, stop, kmax), ...)),) or ().
  """
  del num_q_heads, num_kv_heads
  counts = np.asarray(layout.kv_cnt).reshape(-1, layout.num_q_blocks)
  counts = counts.max(0)
  bounds = np.linspace(0, layout.num_q_blocks,
                       min(_MAX_ROW_SPLITS, layout.num_q_blocks) + 1)
  bounds = np.unique(bounds.astype(int))
  splits = tuple((int(a), int(b), max(int(counts[a:b].max()), 1))
                 for a, b in zip(bounds[:-1], bounds[1:]))
  slots = sum((b - a) * kmax for a, b, kmax in splits)
  if slots > 0.8 * layout.num_q_blocks * layout.max_kv_blocks:
    return ()
  return (("row_splits", splits),)


def _row_ranges(layout, row_splits):
  """(first, stop, sub-layout) per split; one range without splits."""
  if row_splits is None:
    return [(0, layout.num_q_blocks, layout)]

  def cut(x, a, b, kmax):
    return None if x is None else x[:, :, a:b, :kmax]

  return [(a, b, dataclasses.replace(
      layout, kv_idx=cut(layout.kv_idx, a, b, kmax),
      kv_cnt=layout.kv_cnt[:, :, a:b],
      kv_kind=cut(layout.kv_kind, a, b, kmax),
      tile_idx=cut(layout.tile_idx, a, b, kmax)))
          for a, b, kmax in row_splits]


def _rows(x, layout, a, b, axis):
  """Rows of query blocks [a, b) of x (T on `axis`), or None."""
  if x is None:
    return None
  return jax.lax.slice_in_dim(x, a * layout.block_q, b * layout.block_q,
                              axis=axis)


@_common.numpy_broadcasting
def forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, *,
            causal_offset=None, row_splits=None):
  """Returns out [B, T, Hq, D] and lse f32 [B, Hq, T] on padded inputs.

  `causal_offset` is the int32 scalar of the op's causal predicate (used
  when spec.causal); `row_splits` the static ranges of
  `host_layout_options`.
  """
  outs, lses = [], []
  for a, b, part in _row_ranges(layout, row_splits):
    out, lse = _forward_rows(_rows(q, layout, a, b, 1), k, v, bias_k,
                             _rows(q_seg, layout, a, b, 1), kv_seg, part,
                             spec, causal_offset, a)
    outs.append(out)
    lses.append(lse)
  return jnp.concatenate(outs, 1), jnp.concatenate(lses, 2)


def _forward_rows(q, k, v, bias_k, q_seg, kv_seg, layout, spec,
                  causal_offset, first_q_block: int):
  """`forward` of the query blocks from `first_q_block` on (q, layout)."""
  geo, chunking, cgeo = _chunks(q, k, layout)

  def chunk(xs):
    qc, q_seg_c, lists, n = xs
    g = _gather(qc, k, v, bias_k, q_seg_c, kv_seg,
                _chunk_layout(layout, lists), spec, cgeo, causal_offset,
                first_q_block + n * chunking.chunk)
    _, s = _logits(g, spec)
    p, l, lse = tile_math.softmax_stats(s, axes=(-2, -1))
    probs = tile_math.normalise(p, l).astype(v.dtype)
    out = jnp.einsum("blgqijk,blqjkd->blgqid", probs, g.v,
                     preferred_element_type=jnp.float32)
    return _from_blocks(out, cgeo).astype(q.dtype), _row_stat(lse, cgeo)

  out, lse = jax.lax.map(chunk, chunking.inputs(q, q_seg, layout, geo))
  return chunking.merge_rows(out, geo, 1), chunking.merge_rows(lse, geo, 2)


@_common.numpy_broadcasting
def backward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, out, lse, dout,
             dlse, *, causal_offset=None, row_splits=None):
  """Gradients (dq, dk, dv, dbias_k) of the forward pass.

  `dlse` f32 [B, Hq, T] is the cotangent of the returned log-sum-exp.
  """
  b, s_len, hkv, d = k.shape
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)
  delta = delta.transpose(0, 2, 1) - dlse.astype(jnp.float32)
  zeros = jnp.zeros((b, hkv, s_len // layout.block_kv, layout.block_kv, d),
                    jnp.float32)
  acc = (zeros, zeros,
         None if bias_k is None else jnp.zeros(bias_k.shape, jnp.float32))
  dqs = []
  for a, stop, part in _row_ranges(layout, row_splits):
    rows = lambda x, axis: _rows(x, layout, a, stop, axis)
    acc, dq = _backward_rows(
        rows(q, 1), k, v, bias_k, rows(q_seg, 1), kv_seg, part, spec,
        rows(dout, 1), rows(lse, 2), rows(delta, 2), causal_offset, a, acc)
    dqs.append(dq)
  dk, dv, dbias = acc

  def unblock(acc, like):
    return acc.transpose(0, 2, 3, 1, 4).reshape(like.shape).astype(like.dtype)

  if dbias is not None:
    dbias = dbias.astype(bias_k.dtype)
  return (jnp.concatenate(dqs, 1), unblock(dk, k), unblock(dv, v), dbias)


def _backward_rows(q, k, v, bias_k, q_seg, kv_seg, layout, spec, dout, lse,
                   delta, causal_offset, first_q_block: int, acc):
  """`backward` of the query blocks from `first_q_block` on: (acc, dq).

  `acc` holds the f32 dk, dv [B, Hkv, Kb, K, D] and d(bias_k) sums.
  """
  geo, chunking, cgeo = _chunks(q, k, layout)
  b = k.shape[0]

  def chunk(acc, xs):
    (qc, q_seg_c, lists, n), do, lse_c, delta_c = xs
    g = _gather(qc, k, v, bias_k, q_seg_c, kv_seg,
                _chunk_layout(layout, lists), spec, cgeo, causal_offset,
                first_q_block + n * chunking.chunk)
    dot, s = _logits(g, spec)
    probs = tile_math.probabilities(s, _row_stat_blocks(lse_c, cgeo))
    do = _to_blocks(do, cgeo)
    delta_c = _row_stat_blocks(delta_c, cgeo)
    dv_blocks = jnp.einsum("blgqijk,blgqid->blqjkd", probs.astype(do.dtype),
                           do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("blgqid,blqjkd->blgqijk", do, g.v,
                    preferred_element_type=jnp.float32)
    ds = tile_math.logits_cotangent(probs, dp, delta_c)
    ddot = tile_math.dot_cotangent(ds, dot, spec).astype(q.dtype)
    dq = jnp.einsum("blgqijk,blqjkd->blgqid", ddot, g.k,
                    preferred_element_type=jnp.float32)
    dk_blocks = jnp.einsum("blgqijk,blgqid->blqjkd", ddot, g.q,
                           preferred_element_type=jnp.float32)
    index = (jnp.arange(b)[:, None, None, None],
             geo.kv_head()[None, :, None, None], g.kv_idx)
    dk_acc, dv_acc, dbias_acc = acc
    dk_acc = dk_acc.at[index].add(dk_blocks)
    dv_acc = dv_acc.at[index].add(dv_blocks)
    if dbias_acc is not None:
      dbias_acc = dbias_acc.at[g.bias_index].add(ds.sum(axis=4))
    return (dk_acc, dv_acc, dbias_acc), _from_blocks(dq, cgeo).astype(q.dtype)

  acc, dq = jax.lax.scan(chunk, acc, (
      chunking.inputs(q, q_seg, layout, geo), chunking.split_rows(dout, geo, 1),
      chunking.split_rows(lse, geo, 2), chunking.split_rows(delta, geo, 2)))
  return acc, chunking.merge_rows(dq, geo, 1)

