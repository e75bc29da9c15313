"""Host-side builders of static attention patterns.

Pure NumPy, run once per shape. They produce boolean element masks or block
masks and turn them into `BlockLayout`s whose partial blocks are resolved by
a predicate the op evaluates itself (segment ids, causal band) or by the
layout's tile pool. Shared by the static methods (MoA, HMAR, SETRec, SwinBERT,
Radial, PEMF) and by `SparseAttention`'s decode path.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout as layout_lib


def segment_ids(sizes: Sequence[int]) -> np.ndarray:
  """int32 [sum(sizes)]: the index of the segment each position belongs to."""
  return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)


def segment_mask(q_seg: np.ndarray, kv_seg: np.ndarray, *,
                 rule: str = "equal") -> np.ndarray:
  """bool [..., T, S] from segment ids.

  Args:
    q_seg: int [..., T] segment of each query.
    kv_seg: int [..., S] segment of each key.
    rule: "equal" (block-diagonal / packed sequences: seg_k == seg_q) or
      "causal" (block-causal: seg_k <= seg_q).

  Returns:
    The element mask.
  """
  q = np.asarray(q_seg)[..., :, None]
  k = np.asarray(kv_seg)[..., None, :]
  if rule == "equal":
    return q == k
  if rule == "causal":
    return k <= q
  raise ValueError(f"rule must be 'equal' or 'causal', got {rule!r}")


def block_kinds(mask: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
  """int8 [..., Qb, Kb] EMPTY/PARTIAL/FULL kinds of a boolean [..., T, S] mask.

  A block is full when every valid element is visible (padding past T or S
  does not count) and partial when some are.
  """
  mask = np.asarray(mask, bool)
  t, s = mask.shape[-2:]
  qb, kb = layout_lib.cdiv(t, block_q), layout_lib.cdiv(s, block_kv)
  lead = mask.shape[:-2]
  visible = np.zeros(lead + (qb * block_q, kb * block_kv), bool)
  valid = np.zeros((qb * block_q, kb * block_kv), bool)
  visible[..., :t, :s] = mask
  valid[:t, :s] = True
  tiles = visible.reshape(lead + (qb, block_q, kb, block_kv))
  valid = valid.reshape(qb, block_q, kb, block_kv)
  any_ = tiles.any((-3, -1))
  all_ = (tiles | ~valid).all((-3, -1))
  return np.where(all_ & any_, layout_lib.FULL,
                  np.where(any_, layout_lib.PARTIAL,
                           layout_lib.EMPTY)).astype(np.int8)


def predicate_layout(mask: np.ndarray, block_q: int, block_kv: int, *,
                     band: layout_lib.Band | None = None
                     ) -> layout_lib.BlockLayout:
  """Host layout of a [Bl, Hl, T, S] mask the op's predicates reproduce.

  Only block kinds are stored: inside partial blocks the caller must pass
  predicates (segment ids, `causal`, `band`) that equal `mask` there.
  """
  return layout_lib.BlockLayout.from_kind_map(
      block_kinds(mask, block_q, block_kv), block_q, block_kv, band=band)


def demote_full(layout: layout_lib.BlockLayout) -> layout_lib.BlockLayout:
  """The same layout (host or traced) with every full block made partial.

  Op-level predicates (segment ids for key padding or visibility) then apply
  to every listed block. Tiles of existing partial blocks are kept; demoted
  blocks get no tile (-1).
  """
  xp = np if layout.is_host else jnp
  kind = xp.where(layout.kv_kind == layout_lib.FULL, layout_lib.PARTIAL,
                  layout.kv_kind).astype(np.int8)
  return dataclasses.replace(layout, kv_kind=kind)


def partial_dense_layout(q_len: int, kv_len: int, block_q: int,
                         block_kv: int) -> layout_lib.BlockLayout:
  """Every block listed and partial: dense attention under op predicates."""
  return demote_full(layout_lib.BlockLayout.dense(
      q_len, kv_len, block_q=block_q, block_kv=block_kv))


def sink_window_block_mask(num_q_blocks: int, num_kv_blocks: int,
                           sink_blocks: Sequence[int] | np.ndarray,
                           window_blocks: Sequence[int] | np.ndarray, *,
                           q_block_offset: int = 0) -> np.ndarray:
  """bool [H, Qb, Kb]: causal sinks + sliding window per head, in blocks.

  Query block i (global index i + q_block_offset) sees kv blocks j <= i with
  j < sink_blocks[h] or j > i - window_blocks[h] (the diagonal counts as one
  window block): the StreamingLLM pattern at block granularity.
  """
  sink = np.asarray(sink_blocks)[:, None, None]
  window = np.asarray(window_blocks)[:, None, None]
  i = np.arange(num_q_blocks)[None, :, None] + q_block_offset
  j = np.arange(num_kv_blocks)[None, None, :]
  return (j <= i) & ((j < sink) | (j > i - window))
