"""Dense masked oracle: materialises the layout as a [B, Hq, T, S] mask.

Readable rather than fast; its gradients come from plain autodiff, which makes
it an independent oracle for the custom VJPs of the real backends.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import tile_math


def visible_mask(layout: layout_lib.BlockLayout, spec: tile_math.MaskSpec,
                 num_q_heads: int, q_segment_ids=None, kv_segment_ids=None,
                 causal_offset=None):
  """bool [B|1, Hq, T, S]: which (query, key) pairs attend.

  The layout's own masks (FULL blocks, band and tiles inside PARTIAL blocks)
  decide which elements are listed; the op's predicates (causal, segment
  ids) then apply to every listed element.
  """
  t, s = spec.q_len, spec.kv_len
  listed = layout.to_dense_mask(t, s)
  hl = layout.num_heads
  if hl != 1 and hl != num_q_heads:
    listed = jnp.repeat(listed, num_q_heads // hl, axis=1)
  op = tile_math.op_mask(
      jnp.arange(t)[:, None], jnp.arange(s)[None, :], spec,
      causal_offset=causal_offset,
      q_seg=None if q_segment_ids is None else q_segment_ids[:, None, :, None],
      kv_seg=None if kv_segment_ids is None else kv_segment_ids[:, None, None])
  return listed if op is None else listed & op


@_common.numpy_broadcasting
def attention(q, k, v, layout, spec: tile_math.MaskSpec, *, bias_k=None,
              q_segment_ids=None, kv_segment_ids=None, causal_offset=None):
  """Dense block-sparse attention. Shapes as `block_sparse_attention`.

  Returns:
    out [B, T, Hq, D] in q's dtype and lse f32 [B, Hq, T].
  """
  num_q_heads, num_kv_heads = q.shape[2], k.shape[2]
  group = num_q_heads // num_kv_heads
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  dot = jnp.einsum("bthd,bshd->bhts", q, k,
                   preferred_element_type=jnp.float32)
  bias = None
  if bias_k is not None:
    hb = bias_k.shape[1]
    bias = bias_k if hb in (1, num_q_heads) else jnp.repeat(
        bias_k, group, axis=1)
    bias = bias[:, :, None, :]
  s = tile_math.logits(dot, spec, bias)
  mask = visible_mask(layout, spec, num_q_heads, q_segment_ids,
                      kv_segment_ids, causal_offset)
  s = jnp.where(mask, s, -jnp.inf)
  p, l, lse = tile_math.softmax_stats(s, axes=-1)
  probs = tile_math.normalise(p, l).astype(v.dtype)
  out = jnp.einsum("bhts,bshd->bthd", probs, v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype), lse[..., 0]
