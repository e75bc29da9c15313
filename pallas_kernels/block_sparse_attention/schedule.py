"""Block lists reordered for two kernel loops: masked blocks, then the rest.

FlexAttention-style kernels run one loop over the blocks that need an
element mask and one over the blocks that need none, so neither loop
branches per block. `masked_first` computes, per list row, the order that
puts the listed entries needing a mask first (in list order), the others
next, and the entries past the count or wholly above the causal diagonal
last; and the two counts that bound the loops.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import tile_math


def loops(spec: tile_math.MaskSpec) -> tuple[bool, bool]:
  """(masked, unmasked): whether each loop can have entries for `spec`.

  Kernels trace only the loops that can run.
  """
  masked = (spec.has_op_mask or spec.has_layout_mask or spec.kv_is_ragged)
  return masked, not spec.has_segments


@_common.numpy_broadcasting
def masked_first(idx, cnt, kind, spec: tile_math.MaskSpec, causal_offset, *,
                 rows_are_q: bool, block_q: int, block_kv: int,
                 num_kv_blocks: int):
  """Order and loop bounds of block lists: masked entries first.

  Args:
    idx: int [..., R, W] block lists: kv blocks of query block `row`
      (`rows_are_q`), or query blocks of kv block `row` (transposed lists).
    cnt: int [..., R] listed entries per row (clamped to [0, W] here).
    kind: int [..., R, W] PARTIAL or FULL per entry.
    spec: the static mask description.
    causal_offset: int32 scalar (when spec.causal).
    rows_are_q: orientation of the lists.
    block_q: query block size.
    block_kv: kv block size.
    num_kv_blocks: kv blocks in the padded sequence.

  Returns:
    order: int32 [..., R, W]: list slots in walk order (take_along_axis).
    counts: int32 [..., R, 2]: (masked, total) entries a row walks.
  """
  idx = jnp.asarray(idx, jnp.int32)
  width = idx.shape[-1]
  keep = jnp.arange(width) < jnp.asarray(cnt)[..., None]
  causal_all = None
  if spec.causal:
    visible, causal_all = tile_math.causal_block_test(
        idx, causal_offset, rows_are_q=rows_are_q, block_q=block_q,
        block_kv=block_kv)
    keep &= visible
  row = jnp.arange(idx.shape[-2], dtype=jnp.int32)[:, None]
  kv_block = idx if rows_are_q else row
  masked = keep & tile_math.needs_mask(
      spec, is_partial=jnp.asarray(kind) == layout_lib.PARTIAL,
      is_last_kv_block=kv_block == num_kv_blocks - 1, causal_all=causal_all)
  rank = jnp.where(keep, jnp.where(masked, 0, 1), 2)
  order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.stack([jnp.sum(masked, -1), jnp.sum(keep, -1)], axis=-1)
  return order, counts.astype(jnp.int32)


def reorder(order, *lists):
  """Each [..., R, W] list taken in `order` (None stays None)."""
  return tuple(None if x is None else
               jnp.take_along_axis(jnp.asarray(x), order, axis=-1)
               for x in lists)
