"""Row-sparse attention over a `RowLayout`: a chunked XLA gather.

Each query group gathers the K/V rows of its listed keys and does one softmax
over them. Query groups are processed in chunks (`lax.map` / `lax.scan`) so
the gathered keys and the logits of one chunk stay around `_CHUNK_ELEMENTS`
elements whatever T: memory is O(T * Kmax) for the lists plus one chunk's
work, never a T x S array, and work is O(T * Kmax * D).

The backward pass recomputes the logits of each chunk from the saved
log-sum-exp; dq comes from the gathered keys, dk, dv and d(bias_k) are
scatter-added into f32 accumulators carried through the scan (deterministic
on CPU and TPU). The backward pass is plain jnp, so second-order derivatives
come from differentiating it.

Every backend choice ("xla", "triton", "mosaic_tpu" or None) runs this plain
XLA gather for a `RowLayout`: there is no Pallas kernel for row lists, so on
GPU and TPU it is an XLA gather too. "reference" runs the dense oracle on
`RowLayout.to_dense_mask`.

Shape letters: B batch, L layout heads (kv heads, or q heads for per-q-head
lists), G q heads per layout head, N row chunks, C query groups per chunk, R
rows of a group (group_size), M list slots (Kmax), D head dim, P slabs
((batch, layout head) pairs) per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import row_layout as row_layout_lib
from pallas_kernels.block_sparse_attention import partitioning
from pallas_kernels.block_sparse_attention import reference
from pallas_kernels.block_sparse_attention import tile_math

# Target size of one chunk's q-side work, P * C * R * M * D elements: it
# bounds the gathered keys and the logits one chunk holds, whatever T. Small
# enough to stay in cache: SEA's attention at T=8192 on CPU is fastest at
# 2^18-2^19 and takes 1.4x that time at 2^21.
_CHUNK_ELEMENTS = 1 << 19
# Fewest lists a step gathers (P C): below it, a step's dots are too few to
# share the CPU's cores.
_MIN_STEP_LISTS = 4


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static shapes of one call (hashable: a non-differentiable argument).

  The (batch, layout head) pairs are slabs; a step of the scans does P slabs
  and C query groups of each. When a slab has more groups than one step
  holds, P is the fewest slabs that give a step `_MIN_STEP_LISTS` lists, so
  most steps gather from one head's keys only: that reads them with far
  better locality than a step spread over all heads (at T=8192 on CPU,
  Sparsifiner's attention over 820 scattered keys per row takes about 0.3x
  the time, SEA's about 0.9x).
  """

  batch: int
  num_q_heads: int
  num_kv_heads: int
  layout_heads: int  # L
  group: int  # G
  group_size: int  # R
  num_chunks: int  # N, row chunks of each slab
  chunk: int  # C
  slabs: int  # P, slabs per step (divides B L)
  spec: tile_math.MaskSpec

  @property
  def padded_len(self) -> int:
    return self.num_chunks * self.chunk * self.group_size

  @property
  def num_steps(self) -> int:
    return self.batch * self.layout_heads // self.slabs * self.num_chunks

  def kv_head(self):
    """[L] kv head read by each layout head."""
    per_q_head = self.layout_heads == self.num_q_heads
    return jnp.arange(self.layout_heads) // (
        self.num_q_heads // self.num_kv_heads if per_q_head else 1)


def _largest_divisor(n: int, at_most: int) -> int:
  return max(x for x in range(1, max(1, min(n, at_most)) + 1) if n % x == 0)


def _layout_heads(hq: int, hkv: int, layout) -> int:
  """L: q heads for per-q-head lists (Hl = Hq != Hkv), else kv heads."""
  return hq if layout.num_heads == hq and hq != hkv else hkv


def _geometry(q, k, layout, spec) -> _Geometry:
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  lh = _layout_heads(hq, hkv, layout)
  r, m = layout.group_size, layout.max_keys
  groups = layout.num_groups
  per_chunk = max(1, _CHUNK_ELEMENTS // (r * m * d))  # groups of one slab
  num_chunks = -(-groups // per_chunk)
  chunk = -(-groups // num_chunks)  # balanced: the last chunk pads least
  if num_chunks == 1:
    slabs = _largest_divisor(b * lh, _CHUNK_ELEMENTS // (groups * r * m * d))
  else:
    slabs = _largest_divisor(b * lh, -(-_MIN_STEP_LISTS // chunk))
  return _Geometry(b, hq, hkv, lh, hq // lh, r, num_chunks, chunk, slabs,
                   spec)


# -- layout of rows and chunks ----------------------------------------------
# A step's arrays put its P slabs first and the rows of one gathered list
# (G q heads x R group rows) next to each other: plain batched matmuls.
# Steps walk the row chunks of one step's slabs before the next slabs.


def _to_steps(x, geo: _Geometry):
  """[B, L, N, C, ...] -> [steps, P, C, ...]."""
  p, n = geo.slabs, geo.num_chunks
  x = x.reshape(-1, p, n, *x.shape[3:])
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape(-1, p, *x.shape[3:])


def _from_steps(x, geo: _Geometry):
  """[steps, P, C, ...] -> [B, L, N, C, ...]."""
  p, n = geo.slabs, geo.num_chunks
  x = x.reshape(-1, n, p, *x.shape[2:])
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape(geo.batch, geo.layout_heads, n, *x.shape[3:])


def _chunk_rows(x, geo: _Geometry):
  """[B, Tp, Hq, D] -> [steps, P, C, G, R, D]."""
  b, _, _, d = x.shape
  x = x.reshape(b, geo.num_chunks, geo.chunk, geo.group_size,
                geo.layout_heads, geo.group, d)
  return _to_steps(x.transpose(0, 4, 1, 2, 5, 3, 6), geo)


def _unchunk_rows(x, geo: _Geometry):
  """[steps, P, C, G, R, D] -> [B, Tp, Hq, D]."""
  x = _from_steps(x, geo).transpose(0, 2, 3, 5, 1, 4, 6)
  return x.reshape(geo.batch, geo.padded_len, geo.num_q_heads, x.shape[-1])


def _chunk_stat(x, geo: _Geometry):
  """[B, Hq, Tp] -> [steps, P, C, G, R]."""
  x = x.reshape(geo.batch, geo.layout_heads, geo.group, geo.num_chunks,
                geo.chunk, geo.group_size)
  return _to_steps(x.transpose(0, 1, 3, 4, 2, 5), geo)


def _unchunk_stat(x, geo: _Geometry):
  """[steps, P, C, G, R] -> [B, Hq, Tp]."""
  x = _from_steps(x, geo).transpose(0, 1, 4, 2, 3, 5)
  return x.reshape(geo.batch, geo.num_q_heads, geo.padded_len)


@dataclasses.dataclass(frozen=True)
class _Step:
  """Where one step is: its slabs' batch and layout head, its row chunk."""

  batch: jax.Array  # int32 [P]
  head: jax.Array  # int32 [P], layout head
  chunk: jax.Array  # int32 scalar, row chunk n

  @classmethod
  def of(cls, step, geo: _Geometry) -> "_Step":
    slab = step // geo.num_chunks * geo.slabs + jnp.arange(geo.slabs)
    return cls(slab // geo.layout_heads, slab % geo.layout_heads,
               step % geo.num_chunks)


def _pad_layout(layout, geo: _Geometry):
  """The layout's leaves padded to N C groups: [Bl, Hl, N C, ...].

  Groups added by the padding get count 0 (their rows see nothing). Each
  step slices its chunk out in place (`_layout_chunk`): moving the chunk
  axis first would copy the lists transposed.
  """
  pad = geo.num_chunks * geo.chunk - layout.num_groups
  return jax.tree.map(
      lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, pad)]
                        + [(0, 0)] * (x.ndim - 3)), layout)


def _or_zero(index, size: int):
  """`index` into an axis of `size`, or 0 where the axis broadcasts."""
  return index if size > 1 else jnp.zeros_like(index)


def _layout_chunk(layout, at: _Step, geo: _Geometry):
  """A step's lists of a `_pad_layout` layout: leaves [P, 1, C, ...]."""

  def take(x):
    rows = jax.lax.dynamic_slice_in_dim(x, at.chunk * geo.chunk, geo.chunk,
                                        axis=2)
    return rows[_or_zero(at.batch, x.shape[0]),
                _or_zero(at.head, x.shape[1])][:, None]

  return jax.tree.map(take, layout)


def _head_major(x):
  """[B, S, H, D] <-> [B, H, S, D]."""
  return x.transpose(0, 2, 1, 3)


def _rows_dot_keys(rows, keys, geo: _Geometry):
  """f32 [P, C, G, R, M]: rows [P, C, G, R, D] . keys [P, C, M, D].

  With one query row per list (G R = 1) this is a matvec, and the gathered
  keys go first, as its matrix: XLA:CPU copies a dot's right-hand side
  transposed, and for the keys that copy cost twice the gather (with the
  keys first, SEA's attention at T=8192 takes about 0.65x the forward and
  0.6x the backward time).
  """
  if geo.group * geo.group_size == 1:
    return jnp.moveaxis(jnp.einsum("pcmd,pcgrd->pcmgr", keys, rows,
                                   preferred_element_type=jnp.float32), 2, 4)
  return jnp.einsum("pcgrd,pcmd->pcgrm", rows, keys,
                    preferred_element_type=jnp.float32)


# -- bias -------------------------------------------------------------------


def _arrange_bias(bias_k, geo: _Geometry):
  """bias_k [B|1, Hq|Hkv|1, S] -> [B|1, L|1, G|1, S] in the q-head order."""
  bb, hb, s = bias_k.shape
  if hb == 1:
    return bias_k[:, :, None]
  if hb == geo.num_q_heads:
    return bias_k.reshape(bb, geo.layout_heads, geo.group, s)
  if geo.layout_heads == geo.num_kv_heads:
    return bias_k[:, :, None]
  # Per-q-head lists with a per-kv-head bias.
  rep = geo.num_q_heads // geo.num_kv_heads
  return jnp.repeat(bias_k, rep, axis=1)[:, :, None]


def _bias_index(bias, idx, at: _Step):
  """Index into `bias` [B|1, L|1, G|1, S] of a step's lists idx [P, C, M].

  Indexing with it gives [P, C, G|1, M]; the index arrays are full-size
  (zeros where bias broadcasts), so the backward scatter sums into size-1
  dims.
  """
  bb, lb, gb, _ = bias.shape
  slab = lambda i, size: _or_zero(i, size)[:, None, None, None]
  return (slab(at.batch, bb), slab(at.head, lb),
          jnp.arange(gb)[None, None, :, None], idx[:, :, None])


# -- one chunk ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """What the forward and backward passes of one step share."""

  q: jax.Array  # [P, C, G, R, D]
  k: jax.Array  # [P, C, M, D]
  v: jax.Array  # [P, C, M, D]
  kv_index: tuple  # index of the gathered rows into [B, Hkv, S, D]
  bias_index: tuple | None  # index into the arranged bias
  dot: jax.Array  # f32 [P, C, G, R, M] raw q.k
  s: jax.Array  # f32 [P, C, G, R, M] masked logits
  visible: jax.Array  # bool, broadcastable to s


def _visible(lay, idx, q_seg, kv_seg, causal_offset, at: _Step,
             geo: _Geometry):
  """bool [P, C, 1, R|1, M]: which listed keys each row sees."""
  spec = geo.spec
  visible = lay.listed()[:, 0]  # [P, C, R|1, M]
  c, r = geo.chunk, geo.group_size
  q_pos = ((at.chunk * c + jnp.arange(c))[:, None] * r
           + jnp.arange(r))[..., None]  # [C, R, 1]
  kv_seg_g = None
  if spec.has_segments:
    kv_seg_g = kv_seg[at.batch[:, None, None], idx][:, :, None]  # [P, C, 1, M]
    q_seg = q_seg[..., None]  # [P, C, R, 1]
  extra = tile_math.op_mask(q_pos, idx[:, :, None], spec,
                            causal_offset=causal_offset, q_seg=q_seg,
                            kv_seg=kv_seg_g)
  if extra is not None:
    visible = visible & extra
  return visible[:, :, None]


def _chunk(k, v, bias, kv_seg, causal_offset, layout, xs,
           geo: _Geometry) -> _Chunk:
  """Gathers one step's keys and computes its masked logits.

  `k` and `v` are head-major [B, Hkv, S, D]: each gathered row is contiguous.
  `layout` is the `_pad_layout` of the whole layout.
  """
  qc, q_seg_c, step = xs
  at = _Step.of(step, geo)
  lay = _layout_chunk(layout, at, geo)
  idx = jnp.clip(lay.kv_idx[:, 0], 0, k.shape[2] - 1)  # [P, C, M]
  kv_index = (at.batch[:, None, None], geo.kv_head()[at.head][:, None, None],
              idx)
  kc, vc = k[kv_index], v[kv_index]
  bias_index = bias_c = None
  if bias is not None:
    bias_index = _bias_index(bias, idx, at)
    bias_c = bias[bias_index][..., None, :]  # [P, C, G|1, 1, M]
  visible = _visible(lay, idx, q_seg_c, kv_seg, causal_offset, at, geo)
  dot = _rows_dot_keys(qc, kc, geo)
  s = tile_math.mask_logits(tile_math.logits(dot, geo.spec, bias_c), visible)
  return _Chunk(qc, kc, vc, kv_index, bias_index, dot, s, visible)


def _scan_inputs(q, q_seg, geo: _Geometry):
  """Per-step inputs (leading axis: steps) of the forward and backward scans."""
  q_seg_c = None
  if q_seg is not None:
    q_seg_c = q_seg.reshape(geo.batch, 1, geo.num_chunks, geo.chunk,
                            geo.group_size)
    q_seg_c = _to_steps(jnp.broadcast_to(
        q_seg_c, (geo.batch, geo.layout_heads, *q_seg_c.shape[2:])), geo)
  return _chunk_rows(q, geo), q_seg_c, jnp.arange(geo.num_steps)


# -- forward and backward -----------------------------------------------------


@_common.numpy_broadcasting
def _forward(geo, q, k, v, bias_k, q_seg, kv_seg, causal_offset, layout):
  """out [B, Tp, Hq, D] and lse f32 [B, Hq, Tp] on padded inputs."""
  bias = None if bias_k is None else _arrange_bias(bias_k, geo)
  kt, vt = _head_major(k), _head_major(v)
  layout = _pad_layout(layout, geo)

  def body(xs):
    c = _chunk(kt, vt, bias, kv_seg, causal_offset, layout, xs, geo)
    p, l, lse = tile_math.softmax_stats(c.s, axes=-1)
    probs = tile_math.normalise(p, l).astype(v.dtype)
    out = jnp.einsum("pcgrm,pcmd->pcgrd", probs, c.v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype), lse[..., 0]

  out, lse = jax.lax.map(body, _scan_inputs(q, q_seg, geo))
  return _unchunk_rows(out, geo), _unchunk_stat(lse, geo)


@_common.numpy_broadcasting
def _backward(geo, residuals, cotangents):
  q, k, v, bias_k, q_seg, kv_seg, causal_offset, layout, out, lse = residuals
  dout, dlse = cotangents
  bias = None
  if bias_k is not None:
    bias, bias_vjp = jax.vjp(functools.partial(_arrange_bias, geo=geo),
                             bias_k)
  # d(lse)/d(s) = p, so the lse cotangent enters as delta - dlse.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)
  delta = delta.transpose(0, 2, 1) - dlse.astype(jnp.float32)
  xs = (_scan_inputs(q, q_seg, geo), _chunk_rows(dout, geo),
        _chunk_stat(lse, geo), _chunk_stat(delta, geo))
  kt, vt = _head_major(k), _head_major(v)
  layout = _pad_layout(layout, geo)

  def body(acc, xs):
    chunk_xs, do, lse_c, delta_c = xs
    c = _chunk(kt, vt, bias, kv_seg, causal_offset, layout, chunk_xs, geo)
    p = tile_math.probabilities(c.s, lse_c[..., None])
    dp = _rows_dot_keys(do, c.v, geo)
    ds = tile_math.logits_cotangent(p, dp, delta_c[..., None])
    # Masked slots get no gradient even where dP - delta is not finite.
    ds = jnp.where(c.visible, ds, 0.0)
    ddot = tile_math.dot_cotangent(ds, c.dot, geo.spec).astype(q.dtype)
    dq = jnp.einsum("pcgrm,pcmd->pcgrd", ddot, c.k,
                    preferred_element_type=jnp.float32)
    dk = jnp.einsum("pcgrm,pcgrd->pcmd", ddot, c.q,
                    preferred_element_type=jnp.float32)
    dv = jnp.einsum("pcgrm,pcgrd->pcmd", p.astype(do.dtype), do,
                    preferred_element_type=jnp.float32)
    dk_acc, dv_acc, dbias_acc = acc
    dk_acc = dk_acc.at[c.kv_index].add(dk)
    dv_acc = dv_acc.at[c.kv_index].add(dv)
    if dbias_acc is not None:
      dbias = ds.sum(axis=3)  # [P, C, G, M]
      if dbias_acc.shape[2] == 1:
        dbias = dbias.sum(axis=2, keepdims=True)
      dbias_acc = dbias_acc.at[c.bias_index].add(dbias)
    return (dk_acc, dv_acc, dbias_acc), dq.astype(q.dtype)

  zeros = jnp.zeros(kt.shape, jnp.float32)
  dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  (dk, dv, dbias), dq = jax.lax.scan(body, (zeros, zeros, dbias0), xs)
  if dbias is not None:
    (dbias,) = bias_vjp(dbias.astype(bias.dtype))
  return (_unchunk_rows(dq, geo), _head_major(dk).astype(k.dtype),
          _head_major(dv).astype(v.dtype),
          dbias)


def _localised(geo: _Geometry, q, k, layout) -> _Geometry:
  """`geo` with the batch and head sizes of this device's shard.

  The chunking (N, C) stays the global one, so every shard pads alike; a
  step does as many slabs as divide both the global P and the shard's.
  """
  b, _, hq, _ = q.shape
  hkv = k.shape[2]
  lh = _layout_heads(hq, hkv, layout)
  return dataclasses.replace(geo, batch=b, num_q_heads=hq, num_kv_heads=hkv,
                             layout_heads=lh, group=hq // lh,
                             slabs=math.gcd(geo.slabs, b * lh))


def _local_forward(geo, q, k, v, bias_k, q_seg, kv_seg, causal_offset,
                   layout):
  return _forward(_localised(geo, q, k, layout), q, k, v, bias_k, q_seg,
                  kv_seg, causal_offset, layout)


def _local_backward(geo, q, k, v, bias_k, q_seg, kv_seg, causal_offset,
                    layout, out, lse, dout, dlse):
  residuals = (q, k, v, bias_k, q_seg, kv_seg, causal_offset, layout, out,
               lse)
  return _backward(_localised(geo, q, k, layout), residuals,
                   (dout, dlse))


def _roles(args):
  """Partitioning roles of (q, k, v, bias_k, q_seg, kv_seg, offset, layout,
  [out, lse, dout, dlse])."""
  q, k, v, bias_k, q_seg, kv_seg, offset, layout, *rest = args
  maybe = lambda x, role: None if x is None else role
  return (partitioning.Q, partitioning.KV, partitioning.KV,
          maybe(bias_k, partitioning.LEADING),
          maybe(q_seg, partitioning.Q_SEGMENTS),
          maybe(kv_seg, partitioning.KV_SEGMENTS), partitioning.FREE,
          partitioning.layout_roles(layout),
          *(partitioning.Q, partitioning.LSE) * (len(rest) // 2))


def _mesh_dims(geo: _Geometry) -> partitioning.Dims:
  return partitioning.Dims(geo.batch, geo.num_q_heads, geo.num_kv_heads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(geo, q, k, v, bias_k, q_seg, kv_seg, causal_offset, layout):
  args = (q, k, v, bias_k, q_seg, kv_seg, causal_offset, layout)
  return partitioning.call(functools.partial(_local_forward, geo), args,
                           _roles(args), (partitioning.Q, partitioning.LSE),
                           _mesh_dims(geo))


def _attention_fwd(geo, q, k, v, bias_k, q_seg, kv_seg, causal_offset,
                   layout):
  out, lse = _attention(geo, q, k, v, bias_k, q_seg, kv_seg, causal_offset,
                        layout)
  return (out, lse), (q, k, v, bias_k, q_seg, kv_seg, causal_offset, layout,
                      out, lse)


def _attention_bwd(geo, residuals, cotangents):
  args = (*residuals, *cotangents)
  grads = partitioning.call(
      functools.partial(_local_backward, geo), args, _roles(args),
      (partitioning.Q, partitioning.KV, partitioning.KV,
       None if residuals[3] is None else partitioning.LEADING),
      _mesh_dims(geo))
  return (*grads, None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


# -- entry point --------------------------------------------------------------


def check_layout(layout: row_layout_lib.RowLayout, q, k) -> None:
  """Raises ValueError unless `layout` fits q [B, T, Hq, D], k [B, S, Hkv, D].

  Host layouts are also validated (indices in range and distinct).
  """
  row_layout_lib.check_shapes(layout)
  b, t, hq, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  want_groups = -(-t // layout.group_size)
  if layout.num_groups != want_groups:
    raise ValueError(
        f"layout has Qg={layout.num_groups} query groups but T={t} with "
        f"group_size={layout.group_size} needs ceil(T / group_size)="
        f"{want_groups}")
  if layout.num_keys != s:
    raise ValueError(
        f"layout has num_keys={layout.num_keys} but k has S={s} keys")
  if layout.batch_size not in (1, b):
    raise ValueError(
        f"layout batch dim must be 1 or B={b}, got {layout.batch_size}")
  if layout.num_heads not in (1, hkv, hq):
    raise ValueError(
        f"layout head dim must be 1, Hkv={hkv} or Hq={hq}, got "
        f"{layout.num_heads}")
  if layout.is_host:
    layout.validate()


@_common.numpy_broadcasting
def attention(q, k, v, layout: row_layout_lib.RowLayout, *, bias_k,
              q_segment_ids, kv_segment_ids, causal_offset, sm_scale: float,
              softcap: float | None, dense_reference: bool = False):
  """Row-sparse attention: `block_sparse_attention` with a `RowLayout`.

  Called by `block_sparse_attention` after it has validated and normalised
  the arguments (see there for their meaning). Element (i, j) attends when j
  is listed for i's query group (and the row mask allows it), 0 <= j < S,
  and the op's predicates hold: causal (j <= i + causal_offset) and equal
  segment ids. Logits are `softcap(sm_scale * q.k) + bias_k[j]`.

  Args:
    q: [B, T, Hq, D] queries.
    k: [B, S, Hkv, D] keys.
    v: [B, S, Hkv, D] values.
    layout: a `RowLayout` that passed `check_layout`.
    bias_k: optional [B|1, Hq|Hkv|1, S] per-key logit bias (has a gradient).
    q_segment_ids: optional int32 [B, T], with `kv_segment_ids`.
    kv_segment_ids: optional int32 [B, S].
    causal_offset: int32 scalar shift of the causal diagonal, or None when
      not causal.
    sm_scale: static logit scale.
    softcap: optional static logit soft-cap.
    dense_reference: run the dense oracle (T x S) instead of the gather.

  Returns:
    out [B, T, Hq, D] in q's dtype and lse f32 [B, Hq, T]; rows that see no
    key give out 0 and lse -inf.
  """
  t, s = q.shape[1], k.shape[1]
  spec = tile_math.MaskSpec(
      q_len=t, kv_len=s, kv_len_padded=s, band=None,
      has_segments=q_segment_ids is not None, has_tiles=False,
      sm_scale=sm_scale, softcap=softcap, causal=causal_offset is not None)
  causal_offset = jnp.asarray(0 if causal_offset is None else causal_offset,
                              jnp.int32)
  if dense_reference:
    return reference.attention(q, k, v, layout, spec, bias_k=bias_k,
                               q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids,
                               causal_offset=causal_offset)
  geo = _geometry(q, k, layout, spec)
  pad = geo.padded_len - t
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    if q_segment_ids is not None:
      q_segment_ids = jnp.pad(q_segment_ids, ((0, 0), (0, pad)))
  out, lse = _attention(geo, q, k, v, bias_k, q_segment_ids, kv_segment_ids,
                        causal_offset, layout)
  return out[:, :t], lse[..., :t]
