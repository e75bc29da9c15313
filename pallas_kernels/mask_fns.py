"""Mask functions: FlexAttention-style `mask_mod` predicates for BlockLayout.

A mask function maps integer position arrays `(q_idx, kv_idx)` (NumPy or
jnp, broadcastable, e.g. [rows, 1] and [1, cols]) to a boolean array: True
where query q_idx may attend to key kv_idx. `BlockLayout.from_mask_fn` turns
one into a layout block row by block row, never building a T x S array.

The helpers below return `MaskFn`s, which compose with `&` and `|` (also
with plain callables) and carry what makes `from_mask_fn` fast and exact:

- `block_bounds`: per-block (may, must) maps, so blocks that are certainly
  empty or certainly full are classified without evaluating elements;
- `band`: a positional band containing the mask; the layout uses it as the
  partial-block predicate, so blocks the band alone describes get no tile;
- `is_band`: the mask is exactly its band, so the layout is a tile-free
  `BlockLayout.from_band`.

Example, a prefix LM whose other tokens see a causal window of 255 keys:

  mask = mask_fns.prefix_lm(64) | mask_fns.sliding_window(255)
  layout = BlockLayout.from_mask_fn(mask, T, T)
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout as layout_lib

Band = layout_lib.Band
Bounds = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class MaskFn:
  """A vectorised element predicate with optional block-level structure.

  Attributes:
    fn: `fn(q_idx, kv_idx) -> bool array`, NumPy/jnp broadcasting.
    band: optional band that contains the mask (mask = band & mask).
    is_band: True when the mask equals `band` exactly.
    bounds: optional `bounds(q_first, q_last, k_first, k_last) -> (may,
      must)`: on the first/last valid positions of each block ([Qb, 1] and
      [1, Kb] int arrays), bool maps broadcastable to [Bl, Hl, Qb, Kb] of
      blocks with some (may) and with every (must) element visible. They
      must be sound: may covers every visible block, must only full ones.
  """

  fn: Callable[[Any, Any], Any]
  band: Band | None = None
  is_band: bool = False
  bounds: Bounds | None = None

  def __call__(self, q_idx, kv_idx):
    return self.fn(q_idx, kv_idx)

  def block_bounds(self, q_first, q_last, k_first, k_last):
    """(may, must) block maps; (True, False) when nothing is known."""
    if self.bounds is None:
      return np.True_, np.False_
    return self.bounds(q_first, q_last, k_first, k_last)

  def __and__(self, other) -> MaskFn:
    other = as_mask_fn(other)
    band = layout_lib.intersect_bands(self.band, other.band)
    if self.is_band and other.is_band:
      return _band_fn(band)
    return MaskFn(lambda q, kv: self(q, kv) & other(q, kv), band=band,
                  bounds=_merged_bounds(self, other, np.logical_and))

  def __or__(self, other) -> MaskFn:
    other = as_mask_fn(other)
    band, exact = _band_union(self.band, other.band)
    if self.is_band and other.is_band and exact:
      return _band_fn(band)
    return MaskFn(lambda q, kv: self(q, kv) | other(q, kv), band=band,
                  bounds=_merged_bounds(self, other, np.logical_or))

  __rand__ = __and__
  __ror__ = __or__


def as_mask_fn(fn) -> MaskFn:
  """`fn` as a `MaskFn` (plain callables get no structure)."""
  if isinstance(fn, MaskFn):
    return fn
  if not callable(fn):
    raise ValueError(f"a mask function must be callable, got {type(fn)}")
  return MaskFn(fn)


def _merged_bounds(a: MaskFn, b: MaskFn, op) -> Bounds | None:
  if a.bounds is None and b.bounds is None:
    return None

  def bounds(*positions):
    (may_a, must_a), (may_b, must_b) = (a.block_bounds(*positions),
                                        b.block_bounds(*positions))
    return op(may_a, may_b), op(must_a, must_b)

  return bounds


def _band_union(a: Band | None, b: Band | None) -> tuple[Band | None, bool]:
  """The smallest band containing both, and whether it is their union."""
  if a is None or b is None:
    return None, False
  lo = None if a[0] is None or b[0] is None else min(a[0], b[0])
  hi = None if a[1] is None or b[1] is None else max(a[1], b[1])
  inf = float("inf")
  # Two integer intervals make one when neither starts past the other's
  # end + 1.
  gap = max(-inf if a[0] is None else a[0], -inf if b[0] is None else b[0])
  reach = min(inf if a[1] is None else a[1], inf if b[1] is None else b[1])
  return (lo, hi), gap <= reach + 1


def _band_fn(band: Band) -> MaskFn:
  def fn(q_idx, kv_idx):
    mask = layout_lib.band_mask(q_idx, kv_idx, band)
    return (q_idx >= 0) & (kv_idx >= 0) if mask is None else mask

  bounds = lambda *positions: layout_lib.band_bounds(band, *positions)
  return MaskFn(fn, band=band, is_band=True, bounds=bounds)


def band(min_delta: int | None = None, max_delta: int | None = None) -> MaskFn:
  """min_delta <= kv_idx - q_idx <= max_delta (None: that side open).

  `band(None, offset)` is causal with a shifted diagonal, e.g. offset
  S - T for bottom-right aligned decoding.
  """
  for name, value in (("min_delta", min_delta), ("max_delta", max_delta)):
    if value is not None and not layout_lib.is_static_int(value):
      raise ValueError(f"{name} must be an int or None, got {value!r}")
  if min_delta is not None and max_delta is not None and min_delta > max_delta:
    raise ValueError(
        f"band needs min_delta <= max_delta, got ({min_delta}, {max_delta})")
  return _band_fn((min_delta, max_delta))


causal = band(None, 0)
"""kv_idx <= q_idx (top-left aligned, as `jax.nn.dot_product_attention`)."""


def sliding_window(window) -> MaskFn:
  """A sliding window: q_idx - left <= kv_idx <= q_idx + right.

  Args:
    window: an int w >= 0 for a causal window of w past keys plus the
      query's own position (`(w, 0)`), or `(left, right)` with each side an
      int >= 0 or None (open), as `BlockLayout.local`.
  """
  if layout_lib.is_static_int(window):
    window = (window, 0)
  return _band_fn(layout_lib.window_band(window))


def prefix_lm(prefix_len: int) -> MaskFn:
  """kv_idx < prefix_len: every query sees the prefix.

  `prefix_lm(n) | causal` is the prefix LM (bidirectional prefix, causal
  rest); `prefix_lm(n) | sliding_window(w)` keeps a window after it.
  """
  if not layout_lib.is_static_int(prefix_len) or prefix_len < 0:
    raise ValueError(f"prefix_len must be an int >= 0, got {prefix_len!r}")
  fn = lambda q_idx, kv_idx: (kv_idx < prefix_len) & (q_idx >= 0)
  bounds = lambda q_first, q_last, k_first, k_last: (
      k_first < prefix_len, k_last < prefix_len)
  return MaskFn(fn, bounds=bounds)


def chunked(chunk_size: int) -> MaskFn:
  """q_idx // c == kv_idx // c: attention inside chunks of c positions.

  `chunked(c) & causal` is chunked causal attention (Llama 4 style).
  """
  if not layout_lib.is_static_int(chunk_size) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  c = chunk_size

  def bounds(q_first, q_last, k_first, k_last):
    may = (q_first // c <= k_last // c) & (k_first // c <= q_last // c)
    must = ((q_first // c == q_last // c) & (k_first // c == k_last // c)
            & (q_first // c == k_first // c))
    return may, must

  return MaskFn(lambda q_idx, kv_idx: q_idx // c == kv_idx // c,
                bounds=bounds)


def document(q_segment_ids, kv_segment_ids=None) -> MaskFn:
  """Packed sequences: a query sees the keys of its own segment.

  The predicate works on NumPy and traced ids; its block bounds (used by
  `from_mask_fn`) need host ids. Under jit, build the layout with
  `BlockLayout.from_segment_ids` instead.

  Args:
    q_segment_ids: int [T] or [B, T] segment id per query.
    kv_segment_ids: int [S] or [B, S] per key; default `q_segment_ids`.

  Returns:
    A `MaskFn` whose result is [rows, cols] for 1-D ids and [B, 1, rows,
    cols] for per-batch ids.
  """
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  q_seg, kv_seg = (_segment_array(name, ids) for name, ids in (
      ("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)))
  if q_seg.ndim != kv_seg.ndim or q_seg.shape[:-1] != kv_seg.shape[:-1]:
    raise ValueError(
        "q_segment_ids and kv_segment_ids must share their batch dims, got "
        f"{tuple(q_seg.shape)} and {tuple(kv_seg.shape)}")
  # [B, T] ids gain a head dim so results are [B, 1, rows, cols].
  q_seg, kv_seg = (x[:, None] if x.ndim == 2 else x for x in (q_seg, kv_seg))

  def fn(q_idx, kv_idx):
    return q_seg[..., q_idx] == kv_seg[..., kv_idx]

  def bounds(q_first, q_last, k_first, k_last):
    del q_last, k_last
    q_lo, q_hi = _block_range(q_seg, q_first)
    k_lo, k_hi = _block_range(kv_seg, k_first)
    may = (q_lo[..., :, None] <= k_hi[..., None, :]) & (
        k_lo[..., None, :] <= q_hi[..., :, None])
    must = ((q_lo == q_hi)[..., :, None] & (k_lo == k_hi)[..., None, :]
            & (q_lo[..., :, None] == k_lo[..., None, :]))
    return may, must

  return MaskFn(fn, bounds=bounds)


def _segment_array(name: str, ids):
  xp = np if isinstance(ids, (np.ndarray, list, tuple)) else jnp
  ids = xp.asarray(ids)
  if ids.ndim not in (1, 2) or not xp.issubdtype(ids.dtype, xp.integer):
    raise ValueError(
        f"{name} must be an int [T] or [B, T] array, got {ids.dtype} "
        f"{tuple(ids.shape)}")
  return ids


def _block_range(seg, first):
  """Min and max id over each block of `seg` [..., T].

  Blocks start at `first`, a column [N, 1] of ascending positions, and end
  where the next one starts.
  """
  seg = np.asarray(seg)
  starts = np.asarray(first).reshape(-1)
  return (np.minimum.reduceat(seg, starts, axis=-1),
          np.maximum.reduceat(seg, starts, axis=-1))


def segment_ids_from_cu_seqlens(cu_seqlens, seq_len: int):
  """int32 [B, seq_len] segment ids from cumulative sequence lengths.

  Works on the host and under jit (the number of documents per row is the
  static width of `cu_seqlens`; pad a row with fewer documents by repeating
  its last offset). Position p gets the document d with cu[d] <= p <
  cu[d + 1]; positions past cu[-1] form one more (padding) segment.

  Args:
    cu_seqlens: int [N + 1] or [B, N + 1], non-decreasing, cu[0] = 0.
    seq_len: T, the packed length (static).
  """
  xp = np if isinstance(cu_seqlens, (np.ndarray, list, tuple)) else jnp
  cu = xp.asarray(cu_seqlens)
  if cu.ndim == 1:
    cu = cu[None]
  if cu.ndim != 2 or not xp.issubdtype(cu.dtype, xp.integer):
    raise ValueError(
        "cu_seqlens must be an int [N + 1] or [B, N + 1] array, got "
        f"{cu.dtype} {tuple(cu.shape)}")
  if not layout_lib.is_static_int(seq_len) or seq_len < 1:
    raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
  positions = xp.arange(seq_len)
  if xp is np:
    ids = np.stack([np.searchsorted(row, positions, side="right")
                    for row in cu])
  else:
    search = lambda row: jnp.searchsorted(row, positions, side="right")
    ids = jax.vmap(search)(cu)
  return (ids - 1).astype(np.int32)
