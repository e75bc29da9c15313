"""Backward pass of the Triton block-sparse attention: dQ and dK/dV kernels.

No atomics, so the gradients are deterministic:
- the dQ kernel has the forward's grid (query slabs, batch, q heads) and walks
  the forward lists;
- the dK/dV kernel has grid (kv slabs, batch, kv heads x splits), walks the
  transposed lists (`BlockLayout.transpose`) of the q heads of its share of
  the GQA group, sums them inside the kernel and also writes d(bias_k) as
  column sums of dS. When the grid would have few programs, the group is
  split across `splits` programs (`dkv_splits`) whose f32 partial sums are
  added afterwards, in a fixed order.

Both walk the `masked_first` lists in two loops, as the forward does.
Logits are recomputed from the saved log-sum-exp. Shape letters as in
`pallas_triton`.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import pallas_triton
from pallas_kernels.block_sparse_attention import tile_math

# The dK/dV grid aims at this many programs (two waves on a 132-SM H100)
# before it splits GQA groups.
_MIN_DKV_PROGRAMS = 264


def dkv_splits(programs: int, group: int) -> int:
  """Programs per GQA group in the dK/dV kernel: a divisor of `group`.

  The smallest divisor that brings `programs` (kv slabs x batch x kv heads)
  up to `_MIN_DKV_PROGRAMS`, else the whole group.
  """
  for splits in range(1, group + 1):
    if group % splits == 0 and programs * splits >= _MIN_DKV_PROGRAMS:
      return splits
  return group


def _dq_kernel(r, *, spec: tile_math.MaskSpec, geo: pallas_triton.Geometry,
               rows: int, chunk: int):
  i = pl.program_id(0)
  row_off = lax.rem(i, geo.block_q // rows) * rows
  q = r.q[...]
  do = r.do[...]
  lse = r.lse[...][:, None]
  delta = r.delta[...][:, None]
  q_pos = i * rows + jnp.arange(rows, dtype=jnp.int32)[:, None]
  q_seg = r.q_seg[...][:, None] if spec.has_segments else None
  offset = r.causal_offset[0] if spec.causal else None

  def step(j, block, c, dq, *, masked):
    start = pl.multiple_of(block * geo.block_kv + c * chunk, chunk)
    keys = pl.ds(start, chunk)
    k = r.k[keys, :]
    v = r.v[keys, :]
    bias = r.bias[keys][None, :] if geo.bias_heads else None
    mask_inputs = None
    if masked:
      mask_inputs = functools.partial(
          pallas_triton.q_major_mask_inputs, r, spec, j, keys, q_pos=q_pos,
          q_seg=q_seg, causal_offset=offset, tile_rows=pl.ds(row_off, rows),
          tile_cols=pl.ds(c * chunk, chunk))
    dot_qk = pallas_triton.dot(q, k, trans_b=True)
    s = pallas_triton.tile_logits(dot_qk, spec, bias, mask_inputs)
    dp = pallas_triton.dot(do, v, trans_b=True)
    _, _, ddot = tile_math.backward_tile(dot_qk, s, lse, dp, delta, spec)
    return dq + pallas_triton.dot(ddot.astype(k.dtype), k)

  dq = pallas_triton.walk(r, "kv", spec, geo.block_kv // chunk, step,
                          jnp.zeros((rows, geo.head_dim), jnp.float32))
  r.dq[...] = dq.astype(r.dq.dtype)


def _dkv_kernel(r, *, spec: tile_math.MaskSpec, geo: pallas_triton.Geometry,
                cols: int, chunk: int, heads: int, per_head_lists: bool,
                per_head_bias: bool):
  i = pl.program_id(0)
  col_off = lax.rem(i, geo.block_kv // cols) * cols
  k = r.k[...]
  v = r.v[...]
  kv_pos = i * cols + jnp.arange(cols, dtype=jnp.int32)[None, :]
  kv_seg = r.kv_seg[...][None, :] if spec.has_segments else None
  offset = r.causal_offset[0] if spec.causal else None
  has_bias = bool(geo.bias_heads)

  def head(g, carry):
    gl = g if per_head_lists else 0
    bias = None
    if has_bias:
      bias = r.bias[g if per_head_bias else 0, :][None, :]

    def step(j, block, c, carry, *, masked):
      dk, dv, db = carry
      q_start = pl.multiple_of(block * geo.block_q + c * chunk, chunk)
      queries = pl.ds(q_start, chunk)
      q = r.q[queries, g, :]
      do = r.do[queries, g, :]
      lse = r.lse[g, queries][:, None]
      delta = r.delta[g, queries][:, None]

      def mask_inputs():
        return dict(
            q_pos=q_start + jnp.arange(chunk, dtype=jnp.int32)[:, None],
            kv_pos=kv_pos, full=r.q_kind[gl, j] == layout_lib.FULL,
            causal_offset=offset,
            q_seg=r.q_seg[queries][:, None] if spec.has_segments else None,
            kv_seg=kv_seg,
            tile=(pallas_triton.load_tile(r, (gl, j), pl.ds(c * chunk, chunk),
                                          pl.ds(col_off, cols))
                  if spec.has_tiles else None))

      dot_qk = pallas_triton.dot(q, k, trans_b=True)
      s = pallas_triton.tile_logits(dot_qk, spec, bias,
                                    mask_inputs if masked else None)
      dp = pallas_triton.dot(do, v, trans_b=True)
      p, ds, ddot = tile_math.backward_tile(dot_qk, s, lse, dp, delta, spec)
      dv = dv + pallas_triton.dot(p.astype(do.dtype), do, trans_a=True)
      dk = dk + pallas_triton.dot(ddot.astype(q.dtype), q, trans_a=True)
      if has_bias:
        db = db + jnp.sum(ds, axis=0)
      return dk, dv, db

    dk, dv, db = pallas_triton.walk(r, "q", spec, geo.block_q // chunk, step,
                                    carry, index=(gl,))
    if has_bias and per_head_bias:
      r.dbias[g, :] = db
      db = jnp.zeros_like(db)
    return dk, dv, db

  init = (jnp.zeros((cols, geo.head_dim), jnp.float32),
          jnp.zeros((cols, geo.head_dim), jnp.float32),
          jnp.zeros((cols,), jnp.float32) if has_bias else None)
  dk, dv, db = lax.fori_loop(0, heads, head, init)
  if has_bias and not per_head_bias:
    r.dbias[0, :] = db
  r.dk[...] = dk.astype(r.dk.dtype)
  r.dv[...] = dv.astype(r.dv.dtype)


def _dq(q, k, v, bias_k, q_seg, kv_seg, layout, spec, geo, do, lse, delta,
        causal_offset, cfg):
  rows = min(cfg.dq_block_q, geo.block_q)
  chunk = min(cfg.dq_block_kv, geo.block_kv)
  b, t, hq, d = q.shape
  ops = pallas_triton.q_major_operands(q, k, v, bias_k, q_seg, kv_seg, layout,
                                       spec, geo, rows, causal_offset)
  ops["do"] = (do, ops["q"][1])
  row_spec = pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i))
  ops["lse"] = (lse, row_spec)
  ops["delta"] = (delta, row_spec)
  outputs = {"dq": (jax.ShapeDtypeStruct(q.shape, q.dtype), ops["q"][1])}
  kernel = functools.partial(_dq_kernel, spec=spec, geo=geo, rows=rows,
                             chunk=chunk)
  (dq,) = pallas_triton.call(
      kernel, ops, outputs, grid=(t // rows, b, hq),
      num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages,
      name="block_sparse_attention_dq")
  return dq


def _sum_splits(x, axis: int):
  """Sums the split axis of partial gradients in a fixed order."""
  parts = [lax.index_in_dim(x, n, axis, keepdims=False)
           for n in range(x.shape[axis])]
  return functools.reduce(lambda a, b: a + b, parts)


def _dkv(q, k, v, bias_k, q_seg, kv_seg, layout, spec, geo, do, lse, delta,
         causal_offset, cfg):
  cols = min(cfg.dkv_block_kv, geo.block_kv)
  chunk = min(cfg.dkv_block_q, geo.block_q)
  sub = geo.block_kv // cols
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  splits = dkv_splits(s_len // cols * b * hkv, geo.group)
  heads = geo.group // splits

  # Program (i, b, hs) serves q heads [hs * heads, (hs + 1) * heads): part
  # hs % splits of the group of kv head hs // splits.
  def head_index(n: int, hs):
    """Block index into a head axis of size n in {1, Hkv, Hq}."""
    if n == hq:
      return hs
    return 0 if n == 1 else lax.div(hs, splits)

  def head_block(n: int) -> int:
    return heads if n == hq else 1

  lt = layout.kv_major_view()
  lists = pallas_triton.scheduled_lists(
      "q", lt.q_idx, lt.q_cnt, lt.q_kind,
      None if layout.tiles is None else lt.tile_idx, spec, causal_offset,
      rows_are_q=False, geo=geo)
  n_lists = head_block(geo.layout_heads)
  ops = {
      name: (x, pl.BlockSpec(
          (None, n_lists, None, x.shape[-1]),
          lambda i, b, hs: (b if geo.layout_batch > 1 else 0,
                            head_index(geo.layout_heads, hs),
                            lax.div(i, sub), 0)))
      for name, x in lists.items()}
  if layout.tiles is not None:
    ops["tiles"] = pallas_triton.tile_pool_operand(layout)
  group_spec = pl.BlockSpec((None, t, heads, d),
                            lambda i, b, hs: (b, 0, hs, 0))
  row_spec = pl.BlockSpec((None, heads, t), lambda i, b, hs: (b, hs, 0))
  kv_spec = pl.BlockSpec((None, cols, None, d),
                         lambda i, b, hs: (b, i, lax.div(hs, splits), 0))
  ops.update(q=(q, group_spec), do=(do, group_spec), lse=(lse, row_spec),
             delta=(delta, row_spec), k=(k, kv_spec), v=(v, kv_spec))
  # With splits, dK/dV come out as f32 partial sums [splits, B, S, K, D].
  grad_dtype = k.dtype if splits == 1 else jnp.float32
  grad_spec = pl.BlockSpec(
      (None, None, cols, None, d),
      lambda i, b, hs: (lax.rem(hs, splits), b, i, lax.div(hs, splits), 0))
  outputs = {
      name: (jax.ShapeDtypeStruct((splits, *k.shape), grad_dtype), grad_spec)
      for name in ("dk", "dv")}
  n_bias = 1
  if bias_k is not None:
    n_bias = head_block(geo.bias_heads)
    ops["bias"] = (bias_k, pl.BlockSpec(
        (None, n_bias, cols),
        lambda i, b, hs: (b if geo.bias_batch > 1 else 0,
                          head_index(geo.bias_heads, hs), i)))
    outputs["dbias"] = (
        jax.ShapeDtypeStruct((b, hkv * splits * n_bias, s_len), jnp.float32),
        pl.BlockSpec((None, n_bias, cols), lambda i, b, hs: (b, hs, i)))
  if q_seg is not None:
    ops["q_seg"] = (q_seg, pl.BlockSpec((None, t), lambda i, b, hs: (b, 0)))
    ops["kv_seg"] = (kv_seg, pl.BlockSpec((None, cols),
                                          lambda i, b, hs: (b, i)))
  if causal_offset is not None:
    ops["causal_offset"] = pallas_triton.causal_offset_operand(causal_offset)
  kernel = functools.partial(_dkv_kernel, spec=spec, geo=geo, cols=cols,
                             chunk=chunk, heads=heads,
                             per_head_lists=n_lists > 1,
                             per_head_bias=n_bias > 1)
  grads = pallas_triton.call(
      kernel, ops, outputs, grid=(s_len // cols, b, hkv * splits),
      num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages,
      name="block_sparse_attention_dkv")
  dk, dv = (_sum_splits(x, 0).astype(k.dtype) for x in grads[:2])
  dbias = None
  if bias_k is not None:
    dbias = grads[2]
    if geo.bias_heads != hq:  # Shared by the group: add the splits' parts.
      dbias = _sum_splits(dbias.reshape(b, hkv, splits, s_len), 2)
  return dk, dv, dbias


def _reduce_dbias(dbias, bias_k):
  """Sums the kernel's [B, K|N, S] d(bias) down to bias_k's broadcast shape."""
  if bias_k.shape[0] == 1 and dbias.shape[0] > 1:
    dbias = jnp.sum(dbias, axis=0, keepdims=True)
  if bias_k.shape[1] == 1 and dbias.shape[1] > 1:
    dbias = jnp.sum(dbias, axis=1, keepdims=True)
  return dbias.astype(bias_k.dtype)


def backward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, out, lse, dout,
             dlse, *, causal_offset=None, config=None):
  """Gradients of `pallas_triton.forward` on block-padded inputs.

  Args:
    q, k, v, bias_k, q_seg, kv_seg, layout, spec: the forward's arguments.
    out: [B, T, N, D] forward output.
    lse: f32 [B, N, T] forward log-sum-exp.
    dout: [B, T, N, D] output cotangent.
    dlse: f32 [B, N, T] log-sum-exp cotangent.
    causal_offset: int32 scalar of the causal predicate (when spec.causal).
    config: optional TritonConfig (default as in `pallas_triton.forward`).

  Returns:
    dq [B, T, N, D], dk and dv [B, S, K, D] in their inputs' dtypes, and
    dbias_k in bias_k's shape and dtype (None without bias_k).
  """
  cfg = config or pallas_triton.kernel_config(q)
  delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32),
                     dout.astype(jnp.float32)) - dlse.astype(jnp.float32)
  q, k, v, d = pallas_triton.prepare(q, k, v, layout)
  do = pallas_triton.pad_head_dim(dout, q.shape[-1])
  geo = pallas_triton.geometry(q, k, layout, bias_k)
  args = (q, k, v, bias_k, q_seg, kv_seg, layout, spec, geo, do, lse, delta,
          causal_offset, cfg)
  dq = _dq(*args)
  dk, dv, dbias = _dkv(*args)
  if dbias is not None:
    dbias = _reduce_dbias(dbias, bias_k)
  return dq[..., :d], dk[..., :d], dv[..., :d], dbias
