"""Backward pass of the Triton block-sparse attention: dQ and dK/dV kernels.

No atomics, so the gradients are deterministic:
- the dQ kernel has the forward's grid (query slabs, batch, q heads) and walks
  the forward lists;
- the dK/dV kernel has grid (kv slabs, batch, kv heads), walks the transposed
  lists (`BlockLayout.transpose`) of every q head of its GQA group, sums the
  group inside the kernel and also writes d(bias_k) as column sums of dS.

Logits are recomputed from the saved log-sum-exp. Shape letters as in
`pallas_triton`.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import pallas_triton
from pallas_kernels.block_sparse_attention import tile_math


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

  def step(j, c, dq):
    kv_block = r.kv_idx[j]
    start = pl.multiple_of(kv_block * geo.block_kv + c * chunk, chunk)
    keys = pl.ds(start, chunk)
    k = r.k[keys, :]
    v = r.v[keys, :]
    bias = r.bias[keys][None, :] if geo.bias_heads else None

    def mask_operands():
      kv_seg = r.kv_seg[keys][None, :] if spec.has_segments else None
      tile = None
      if spec.has_tiles:
        tile = pallas_triton.load_tile(r, j, pl.ds(row_off, rows),
                                       pl.ds(c * chunk, chunk))
      return q_seg, kv_seg, tile

    dot_qk = pallas_triton.dot(q, k, trans_b=True)
    s = pallas_triton.tile_logits(
        dot_qk, spec, geo, kind=r.kv_kind[j], kv_block=kv_block, q_pos=q_pos,
        kv_pos=start + jnp.arange(chunk, dtype=jnp.int32)[None, :],
        bias=bias, causal_offset=offset,
        causal_all=pallas_triton.causal_all(
            spec, offset, (i * rows, i * rows + rows - 1),
            (start, start + chunk - 1)),
        mask_operands=mask_operands)
    dp = pallas_triton.dot(do, v, trans_b=True)
    _, _, ddot = tile_math.backward_tile(dot_qk, s, lse, dp, delta, spec)
    return dq + pallas_triton.dot(ddot.astype(k.dtype), k)

  dq = pallas_triton.walk(*pallas_triton.walk_bounds(r, "kv"),
                          geo.block_kv // chunk, step,
                          jnp.zeros((rows, geo.head_dim), jnp.float32))
  r.dq[...] = dq.astype(r.dq.dtype)


def _dkv_kernel(r, *, spec: tile_math.MaskSpec, geo: pallas_triton.Geometry,
                cols: int, chunk: int, lists_per_group: int,
                bias_per_group: int):
  i = pl.program_id(0)
  kv_block = lax.div(i, geo.block_kv // cols)
  col_off = lax.rem(i, geo.block_kv // cols) * cols
  k = r.k[...]
  v = r.v[...]
  kv_pos = i * cols + jnp.arange(cols, dtype=jnp.int32)[None, :]
  kv_seg = r.kv_seg[...][None, :] if spec.has_segments else None
  offset = r.causal_offset[0] if spec.causal else None
  has_bias = bool(geo.bias_heads)

  def head(g, carry):
    gl = g if lists_per_group > 1 else 0
    bias = None
    if has_bias:
      bias = r.bias[g if bias_per_group > 1 else 0, :][None, :]

    def step(j, c, carry):
      dk, dv, db = carry
      q_start = pl.multiple_of(r.q_idx[gl, j] * geo.block_q + c * chunk,
                               chunk)
      queries = pl.ds(q_start, chunk)
      q = r.q[queries, g, :]
      do = r.do[queries, g, :]
      lse = r.lse[g, queries][:, None]
      delta = r.delta[g, queries][:, None]
      q_pos = q_start + jnp.arange(chunk, dtype=jnp.int32)[:, None]

      def mask_operands():
        q_seg = r.q_seg[queries][:, None] if spec.has_segments else None
        tile = None
        if spec.has_tiles:
          tile_id = r.tile_idx[gl, j]
          tile = r.tiles[jnp.maximum(tile_id, 0), pl.ds(c * chunk, chunk),
                         pl.ds(col_off, cols)]
          tile = (tile != 0) | (tile_id < 0)
        return q_seg, kv_seg, tile

      dot_qk = pallas_triton.dot(q, k, trans_b=True)
      s = pallas_triton.tile_logits(
          dot_qk, spec, geo, kind=r.q_kind[gl, j], kv_block=kv_block,
          q_pos=q_pos, kv_pos=kv_pos, bias=bias, causal_offset=offset,
          causal_all=pallas_triton.causal_all(
              spec, offset, (q_start, q_start + chunk - 1),
              (i * cols, i * cols + cols - 1)),
          mask_operands=mask_operands)
      dp = pallas_triton.dot(do, v, trans_b=True)
      p, ds, ddot = tile_math.backward_tile(dot_qk, s, lse, dp, delta, spec)
      dv = dv + pallas_triton.dot(p.astype(do.dtype), do, trans_a=True)
      dk = dk + pallas_triton.dot(ddot.astype(q.dtype), q, trans_a=True)
      if has_bias:
        db = db + jnp.sum(ds, axis=0)
      return dk, dv, db

    dk, dv, db = pallas_triton.walk(*pallas_triton.walk_bounds(r, "q", (gl,)),
                                    geo.block_q // chunk, step, carry)
    if has_bias and bias_per_group > 1:
      r.dbias[g, :] = db
      db = jnp.zeros_like(db)
    return dk, dv, db

  init = (jnp.zeros((cols, geo.head_dim), jnp.float32),
          jnp.zeros((cols, geo.head_dim), jnp.float32),
          jnp.zeros((cols,), jnp.float32) if has_bias else None)
  dk, dv, db = lax.fori_loop(0, geo.group, head, init)
  if has_bias and bias_per_group == 1:
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


def _dkv(q, k, v, bias_k, q_seg, kv_seg, layout, spec, geo, do, lse, delta,
         causal_offset, cfg):
  cols = min(cfg.dkv_block_kv, geo.block_kv)
  chunk = min(cfg.dkv_block_q, geo.block_q)
  sub = geo.block_kv // cols
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = geo.group
  lt = layout.kv_major_view()
  qmax = lt.q_idx.shape[-1]
  lists_per_group = geo.kv_head_block(geo.layout_heads)

  def list_map(i, b, h):
    return (b if geo.layout_batch > 1 else 0,
            0 if geo.layout_heads == 1 else h, lax.div(i, sub), 0)

  list_spec = pl.BlockSpec((None, lists_per_group, None, qmax), list_map)
  bound_spec = pl.BlockSpec((None, lists_per_group, 1),
                            lambda *idx: list_map(*idx)[:3])
  start, end = pallas_triton.list_bounds(
      lt.q_idx, lt.q_cnt, spec, causal_offset, rows_are_q=False,
      block_q=geo.block_q, block_kv=geo.block_kv)
  ops = {
      "q_idx": (lt.q_idx, list_spec),
      "q_end": (end, bound_spec),
      "q_kind": (lt.q_kind, list_spec),
  }
  if start is not None:
    ops["q_start"] = (start, bound_spec)
  if layout.tiles is not None:
    ops["tile_idx"] = (lt.tile_idx, list_spec)
    tiles = jnp.asarray(layout.tiles).astype(jnp.int8)
    ops["tiles"] = (tiles, pl.BlockSpec(tiles.shape, lambda *_: (0, 0, 0)))
  group_spec = pl.BlockSpec((None, t, g, d), lambda i, b, h: (b, 0, h, 0))
  row_spec = pl.BlockSpec((None, g, t), lambda i, b, h: (b, h, 0))
  kv_spec = pl.BlockSpec((None, cols, None, d), lambda i, b, h: (b, i, h, 0))
  ops.update(q=(q, group_spec), do=(do, group_spec), lse=(lse, row_spec),
             delta=(delta, row_spec), k=(k, kv_spec), v=(v, kv_spec))
  bias_per_group = 1
  outputs = {
      "dk": (jax.ShapeDtypeStruct(k.shape, k.dtype), kv_spec),
      "dv": (jax.ShapeDtypeStruct(v.shape, v.dtype), kv_spec),
  }
  if bias_k is not None:
    bias_per_group = geo.kv_head_block(geo.bias_heads)
    ops["bias"] = (bias_k, pl.BlockSpec(
        (None, bias_per_group, cols),
        lambda i, b, h: (b if geo.bias_batch > 1 else 0,
                         0 if geo.bias_heads == 1 else h, i)))
    outputs["dbias"] = (
        jax.ShapeDtypeStruct((b, hkv * bias_per_group, s_len), jnp.float32),
        pl.BlockSpec((None, bias_per_group, cols), lambda i, b, h: (b, h, i)))
  if q_seg is not None:
    ops["q_seg"] = (q_seg, pl.BlockSpec((None, t), lambda i, b, h: (b, 0)))
    ops["kv_seg"] = (kv_seg, pl.BlockSpec((None, cols),
                                          lambda i, b, h: (b, i)))
  if causal_offset is not None:
    ops["causal_offset"] = pallas_triton.causal_offset_operand(causal_offset)
  kernel = functools.partial(_dkv_kernel, spec=spec, geo=geo, cols=cols,
                             chunk=chunk, lists_per_group=lists_per_group,
                             bias_per_group=bias_per_group)
  grads = pallas_triton.call(
      kernel, ops, outputs, grid=(s_len // cols, b, hkv),
      num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages,
      name="block_sparse_attention_dkv")
  return grads if bias_k is not None else (*grads, None)


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
