"""BlockLayout: the one block-sparse format of jsparse.

A padded-CSR ("ELL") list of the kv blocks each query block attends to,
compatible with FlexAttention's BlockMask. It is a registered pytree, so the
same type carries a static layout built once on the host (NumPy leaves) and a
dynamic layout built on device under `jit` (traced leaves).

Element-level visibility inside a *partial* block comes from, in order of
preference: a positional band predicate (causal, sliding window), segment ids
passed to the op, and a pool of boolean tiles for masks with no formula. A
*full* block is visible everywhere and costs no mask work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common

EMPTY = 0
PARTIAL = 1
FULL = 2

Band = tuple[int | None, int | None]
"""(min_delta, max_delta) on delta = kv_position - q_position; None: open."""


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def intersect_bands(a: Band | None, b: Band | None) -> Band | None:
  """The band allowing exactly what both `a` and `b` allow."""
  if a is None:
    return b
  if b is None:
    return a
  lo = [x for x in (a[0], b[0]) if x is not None]
  hi = [x for x in (a[1], b[1]) if x is not None]
  return (max(lo) if lo else None, min(hi) if hi else None)


def band_mask(q_pos, kv_pos, band: Band | None):
  """Element predicate of `band` on broadcastable position arrays."""
  if band is None:
    return None
  delta = kv_pos - q_pos
  lo, hi = band
  mask = None
  if lo is not None:
    mask = delta >= lo
  if hi is not None:
    upper = delta <= hi
    mask = upper if mask is None else mask & upper
  return mask


def _is_host(*arrays) -> bool:
  return all(isinstance(a, (np.ndarray, np.generic)) for a in arrays)


@_common.numpy_broadcasting
def _compact(kind_map, max_blocks: int, tile_map=None):
  """Turns a dense kind map [..., R, C] into padded sorted lists.

  Works on NumPy (host) and jax (traceable) arrays alike.

  Args:
    kind_map: int8 [..., R, C] with EMPTY/PARTIAL/FULL entries.
    max_blocks: static list capacity; rows with more blocks keep the
      `max_blocks` lowest ids.
    tile_map: optional int32 [..., R, C] tile pool ids (-1: no tile).

  Returns:
    idx int32 [..., R, max_blocks] (padding repeats the last valid id),
    cnt int32 [..., R], kind int8 [..., R, max_blocks] (0 past the count),
    tile int32 [..., R, max_blocks] or None.
  """
  xp = np if _is_host(kind_map) else jnp
  kind_map = xp.asarray(kind_map)
  present = kind_map != EMPTY
  order = xp.argsort(~present, axis=-1, stable=True)[..., :max_blocks]
  cnt = xp.minimum(present.sum(-1), max_blocks).astype(np.int32)
  slot = xp.arange(max_blocks, dtype=np.int32)
  last = xp.maximum(cnt - 1, 0)[..., None]
  order = xp.take_along_axis(order, xp.minimum(slot, last), axis=-1)
  valid = slot < cnt[..., None]
  idx = order.astype(np.int32)
  kind = xp.where(
      valid, xp.take_along_axis(kind_map, order, axis=-1), EMPTY
  ).astype(np.int8)
  tile = None
  if tile_map is not None:
    tile = xp.where(
        valid & (kind == PARTIAL),
        xp.take_along_axis(xp.asarray(tile_map), order, axis=-1),
        -1,
    ).astype(np.int32)
  return idx, cnt, kind, tile


@_common.numpy_broadcasting
def _scatter_rows(idx, cnt, values, num_cols: int, fill):
  """Inverse of `_compact`: scatters list entries into a dense [..., C] map."""
  host = _is_host(idx, cnt, values)
  xp = np if host else jnp
  lead, width = idx.shape[:-1], idx.shape[-1]
  rows = int(np.prod(lead))
  valid = xp.arange(width) < cnt[..., None]
  # Entries past the count go to an extra column that is dropped afterwards.
  cols = xp.where(valid, idx, num_cols).reshape(rows, width)
  values = xp.broadcast_to(values, idx.shape).reshape(rows, width)
  dense = xp.full((rows, num_cols + 1), fill, values.dtype)
  row_ids = xp.arange(rows)[:, None]
  if host:
    dense[row_ids, cols] = values
  else:
    dense = dense.at[row_ids, cols].set(values)
  return dense[:, :num_cols].reshape(*lead, num_cols)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Which kv blocks each query block attends to.

  Attributes:
    kv_idx: int32 [Bl, Hl, Qb, Kmax] kv block ids per query block, strictly
      ascending within the row's count; padding repeats the last valid id.
      Bl is 1 (shared) or B; Hl is 1, the number of kv heads or of q heads.
    kv_cnt: int32 [Bl, Hl, Qb] valid entries per row; 0 is allowed (the row's
      output is 0 and its log-sum-exp -inf).
    kv_kind: int8 [Bl, Hl, Qb, Kmax] PARTIAL (1: element predicates apply) or
      FULL (2: every element visible); EMPTY (0) past the count.
    tile_idx: optional int32 [Bl, Hl, Qb, Kmax] index into `tiles` for
      partial blocks with no formula, -1 where no tile applies.
    tiles: optional bool [P, block_q, block_kv] pool of element masks.
    block_q: query block size (static).
    block_kv: kv block size (static).
    num_kv_blocks: Kb, the number of kv blocks of the kv axis (static).
    band: optional static (min_delta, max_delta) predicate on
      delta = kv_pos - q_pos applied inside partial blocks (causal: (None, 0)).
    kv_major: optional precomputed `transpose()` (see `with_kv_major`); the
      op attaches it to host layouts so the dK/dV pass gets exact lists.
  """

  kv_idx: Any
  kv_cnt: Any
  kv_kind: Any
  tile_idx: Any = None
  tiles: Any = None
  block_q: int = 128
  block_kv: int = 128
  num_kv_blocks: int = 0
  band: Band | None = None
  kv_major: KvMajorLayout | None = None

  # -- pytree ---------------------------------------------------------------

  def tree_flatten(self):
    children = (self.kv_idx, self.kv_cnt, self.kv_kind, self.tile_idx,
                self.tiles, self.kv_major)
    aux = (self.block_q, self.block_kv, self.num_kv_blocks, self.band)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    *lists, kv_major = children
    return cls(*lists, *aux, kv_major=kv_major)

  # -- shape helpers --------------------------------------------------------

  @property
  def batch_size(self) -> int:
    return self.kv_idx.shape[0]

  @property
  def num_heads(self) -> int:
    return self.kv_idx.shape[1]

  @property
  def num_q_blocks(self) -> int:
    return self.kv_idx.shape[2]

  @property
  def max_kv_blocks(self) -> int:
    return self.kv_idx.shape[3]

  @property
  def is_host(self) -> bool:
    """True when every leaf is a NumPy array (a static, host-built layout)."""
    leaves = jax.tree_util.tree_leaves(self)
    return _is_host(*leaves)

  def density(self):
    """Fraction of (query block, kv block) pairs present."""
    xp = np if self.is_host else jnp
    return xp.sum(self.kv_cnt) / (self.kv_cnt.size * self.num_kv_blocks)

  # -- constructors ---------------------------------------------------------

  @classmethod
  def from_kind_map(cls, kind_map, block_q: int, block_kv: int, *,
                    max_kv_blocks: int | None = None, tile_map=None,
                    tiles=None, band: Band | None = None) -> BlockLayout:
    """From a dense int8 map [Bl, Hl, Qb, Kb] of EMPTY/PARTIAL/FULL.

    Args:
      kind_map: int [Bl, Hl, Qb, Kb], NumPy (host) or jax (may be traced).
      block_q: query block size.
      block_kv: kv block size.
      max_kv_blocks: static list capacity Kmax. Default: the largest row count
        for host maps, Kb for jax maps (no row can be truncated).
      tile_map: optional int32 [Bl, Hl, Qb, Kb] ids into `tiles`, -1 for none.
      tiles: optional bool [P, block_q, block_kv] tile pool.
      band: optional positional predicate for partial blocks.
    """
    if kind_map.ndim != 4:
      raise ValueError(
          "kind_map must be [Bl, Hl, Qb, Kb], got shape "
          f"{tuple(kind_map.shape)}")
    num_kv_blocks = kind_map.shape[-1]
    if max_kv_blocks is None:
      if _is_host(kind_map):
        max_kv_blocks = max(int((np.asarray(kind_map) != 0).sum(-1).max()), 1)
      else:
        max_kv_blocks = num_kv_blocks
    idx, cnt, kind, tile = _compact(kind_map, max_kv_blocks, tile_map)
    return cls(idx, cnt, kind, tile, tiles, block_q, block_kv, num_kv_blocks,
               band)

  @classmethod
  def from_block_mask(cls, block_mask, block_q: int, block_kv: int, *,
                      full_block_mask=None, max_kv_blocks: int | None = None,
                      band: Band | None = None) -> BlockLayout:
    """From a boolean block mask [Bl, Hl, Qb, Kb] (NumPy or traced).

    Blocks in `block_mask` are partial (element predicates apply) unless also
    set in `full_block_mask`, which marks blocks needing no mask work.
    """
    xp = np if _is_host(block_mask) else jnp
    block_mask = xp.asarray(block_mask)
    if block_mask.dtype != bool:
      raise ValueError(
          f"block_mask must be boolean, got dtype {block_mask.dtype}")
    kind = xp.where(block_mask, PARTIAL, EMPTY)
    if full_block_mask is not None:
      kind = xp.where(block_mask & full_block_mask, FULL, kind)
    return cls.from_kind_map(kind.astype(np.int8), block_q, block_kv,
                             max_kv_blocks=max_kv_blocks, band=band)

  @classmethod
  @_common.numpy_broadcasting
  def from_element_mask(cls, mask, block_q: int, block_kv: int, *,
                        max_kv_blocks: int | None = None) -> BlockLayout:
    """From a dense boolean element mask [Bl, Hl, T, S].

    Blocks with every element visible become full, blocks with some visible
    become partial with a tile in the pool. On the host, identical tiles are
    stored once; under jit every partial entry gets its own tile.
    """
    host = _is_host(mask)
    xp = np if host else jnp
    mask = xp.asarray(mask)
    if mask.ndim != 4 or mask.dtype != bool:
      raise ValueError(
          "mask must be a boolean [Bl, Hl, T, S] array, got "
          f"{mask.dtype} {tuple(mask.shape)}")
    bl, hl, t, s = mask.shape
    qb, kb = cdiv(t, block_q), cdiv(s, block_kv)
    padded = xp.zeros((bl, hl, qb * block_q, kb * block_kv), bool)
    if host:
      padded[..., :t, :s] = mask
    else:
      padded = padded.at[..., :t, :s].set(mask)
    blocks = padded.reshape(bl, hl, qb, block_q, kb, block_kv)
    blocks = blocks.transpose(0, 1, 2, 4, 3, 5)  # [Bl,Hl,Qb,Kb,bq,bkv]
    any_ = blocks.any((-1, -2))
    # "Full" only needs the valid (unpadded) part visible: padding is masked
    # by the op itself.
    valid = np.zeros((qb * block_q, kb * block_kv), bool)
    valid[:t, :s] = True
    valid = valid.reshape(qb, block_q, kb, block_kv).transpose(0, 2, 1, 3)
    all_ = (blocks | ~valid).all((-1, -2))
    kind = xp.where(all_ & any_, FULL, xp.where(any_, PARTIAL, EMPTY))
    kind = kind.astype(np.int8)
    if host:
      partial = kind == PARTIAL
      flat = blocks[partial]
      tiles, inverse = np.unique(flat.reshape(len(flat), -1), axis=0,
                                 return_inverse=True)
      tiles = tiles.reshape(-1, block_q, block_kv)
      tile_map = np.full(kind.shape, -1, np.int32)
      tile_map[partial] = inverse.reshape(-1)
      if not len(tiles):
        tiles = np.zeros((1, block_q, block_kv), bool)
    else:
      tiles = blocks.reshape(-1, block_q, block_kv)
      tile_map = jnp.arange(tiles.shape[0], dtype=jnp.int32).reshape(
          kind.shape)
      tile_map = jnp.where(kind == PARTIAL, tile_map, -1)
    return cls.from_kind_map(kind, block_q, block_kv,
                             max_kv_blocks=max_kv_blocks, tile_map=tile_map,
                             tiles=tiles)

  @classmethod
  def from_band(cls, q_len: int, kv_len: int, block_q: int, block_kv: int,
                band: Band) -> BlockLayout:
    """Host layout of a positional band, shared by all batches and heads.

    Element (i, j) is visible when band[0] <= j - i <= band[1]. Blocks fully
    inside the band are full; blocks crossing an edge are partial and carry
    the band as their predicate.
    """
    lo, hi = band
    qb, kb = cdiv(q_len, block_q), cdiv(kv_len, block_kv)
    q_first = np.arange(qb) * block_q
    q_last = np.minimum(q_first + block_q, q_len) - 1
    k_first = np.arange(kb) * block_kv
    k_last = np.minimum(k_first + block_kv, kv_len) - 1
    d_min = k_first[None, :] - q_last[:, None]
    d_max = k_last[None, :] - q_first[:, None]
    lo_ = -np.inf if lo is None else lo
    hi_ = np.inf if hi is None else hi
    any_ = (d_max >= lo_) & (d_min <= hi_)
    all_ = (d_min >= lo_) & (d_max <= hi_)
    kind = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
    return cls.from_kind_map(kind[None, None].astype(np.int8), block_q,
                             block_kv, band=band)

  @classmethod
  def causal(cls, q_len: int, kv_len: int | None = None, *,
             block_q: int = 128, block_kv: int = 128,
             offset: int = 0) -> BlockLayout:
    """Causal layout: query i sees keys j <= i + offset."""
    kv_len = q_len if kv_len is None else kv_len
    return cls.from_band(q_len, kv_len, block_q, block_kv, (None, offset))

  @classmethod
  def local(cls, q_len: int, kv_len: int | None = None, *,
            window: tuple[int | None, int | None], block_q: int = 128,
            block_kv: int = 128, offset: int = 0) -> BlockLayout:
    """Sliding window: query i sees i + offset - left <= j <= i + offset + right.

    `window=(left, right)`; `(w, 0)` is a causal window of w past keys plus
    the key at the query's own position. None leaves that side open.
    """
    kv_len = q_len if kv_len is None else kv_len
    left, right = window
    band = (None if left is None else offset - left,
            None if right is None else offset + right)
    return cls.from_band(q_len, kv_len, block_q, block_kv, band)

  @classmethod
  def dense(cls, q_len: int, kv_len: int, *, block_q: int = 128,
            block_kv: int = 128) -> BlockLayout:
    """Every block full: plain dense attention through the sparse op."""
    qb, kb = cdiv(q_len, block_q), cdiv(kv_len, block_kv)
    kind = np.full((1, 1, qb, kb), FULL, np.int8)
    return cls.from_kind_map(kind, block_q, block_kv)

  # -- FlexAttention BlockMask interchange -----------------------------------

  @classmethod
  def from_flex(cls, kv_num_blocks, kv_indices, full_kv_num_blocks,
                full_kv_indices, block_q: int, block_kv: int, *,
                num_kv_blocks: int, max_kv_blocks: int | None = None,
                band: Band | None = None) -> BlockLayout:
    """From FlexAttention's (num, idx, full_num, full_idx) BlockMask lists.

    `kv_*` lists the partial blocks, `full_kv_*` the full ones; each index
    array is [Bl, Hl, Qb, W] with entries past the row's count ignored.
    `full_kv_num_blocks`/`full_kv_indices` may be None (no full blocks).
    """
    kind = _scatter_rows(kv_indices, kv_num_blocks,
                         _full_like(kv_indices, PARTIAL), num_kv_blocks, EMPTY)
    if full_kv_num_blocks is not None:
      full = _scatter_rows(full_kv_indices, full_kv_num_blocks,
                           _full_like(full_kv_indices, FULL), num_kv_blocks,
                           EMPTY)
      xp = np if _is_host(kind, full) else jnp
      kind = xp.maximum(kind, full)
    return cls.from_kind_map(kind.astype(np.int8), block_q, block_kv,
                             max_kv_blocks=max_kv_blocks, band=band)

  def to_flex(self):
    """The FlexAttention form (num, idx, full_num, full_idx).

    Each index array is [Bl, Hl, Qb, Kmax], ascending, padded by repeating the
    last valid id. Lossless: `from_flex(*layout.to_flex(), ...)` gives back
    this layout.
    """
    kind_map = self.to_block_mask()
    xp = np if self.is_host else jnp
    partial = xp.where(kind_map == PARTIAL, PARTIAL, EMPTY).astype(np.int8)
    full = xp.where(kind_map == FULL, FULL, EMPTY).astype(np.int8)
    p_idx, p_cnt, _, _ = _compact(partial, self.max_kv_blocks)
    f_idx, f_cnt, _, _ = _compact(full, self.max_kv_blocks)
    return p_cnt, p_idx, f_cnt, f_idx

  # -- views ------------------------------------------------------------------

  def to_block_mask(self):
    """Dense int8 kind map [Bl, Hl, Qb, Kb] (0 empty, 1 partial, 2 full)."""
    return _scatter_rows(self.kv_idx, self.kv_cnt, self.kv_kind,
                         self.num_kv_blocks, EMPTY).astype(np.int8)

  def tile_map(self):
    """Dense int32 tile-id map [Bl, Hl, Qb, Kb], -1 where no tile applies."""
    if self.tile_idx is None:
      raise ValueError("this layout has no tile pool")
    return _scatter_rows(self.kv_idx, self.kv_cnt, self.tile_idx,
                         self.num_kv_blocks, -1).astype(np.int32)

  @_common.numpy_broadcasting
  def element_masks(self, q_len: int, kv_len: int):
    """Dense element view: (full, partial) bool maps [Bl, Hl, T, S].

    `full` marks elements of full blocks; `partial` marks elements of partial
    blocks that the layout's own band and tiles allow. Predicates that live
    outside the layout (op-level causal, segment ids) are not applied.
    """
    kind = jnp.asarray(self.to_block_mask())
    rep = lambda x: jnp.repeat(jnp.repeat(x, self.block_q, axis=-2),
                               self.block_kv, axis=-1)[..., :q_len, :kv_len]
    full = rep(kind == FULL)
    partial = rep(kind == PARTIAL)
    band = band_mask(jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :],
                     self.band)
    if band is not None:
      partial &= band
    if self.tiles is not None:
      tile_ids = jnp.asarray(self.tile_map())
      tiles = jnp.asarray(self.tiles)
      per_block = jnp.where(tile_ids[..., None, None] >= 0,
                            tiles[jnp.maximum(tile_ids, 0)], True)
      bl, hl, qb, kb = tile_ids.shape
      dense = per_block.transpose(0, 1, 2, 4, 3, 5).reshape(
          bl, hl, qb * self.block_q, kb * self.block_kv)
      partial &= dense[..., :q_len, :kv_len]
    return full, partial

  def to_dense_mask(self, q_len: int, kv_len: int):
    """bool [Bl, Hl, T, S]: which elements this layout lets attend."""
    full, partial = self.element_masks(q_len, kv_len)
    return full | partial

  def transpose(self, max_q_blocks: int | None = None) -> KvMajorLayout:
    """The kv-major view used by the dK/dV pass; runs under jit.

    Args:
      max_q_blocks: static capacity Qmax of each kv block's list. Default:
        the exact maximum for host layouts, Qb for traced ones.
    """
    kind_map = self.to_block_mask()
    xp = np if self.is_host else jnp
    kind_t = xp.swapaxes(kind_map, -1, -2)
    tile_t = None
    if self.tile_idx is not None:
      tile_t = xp.swapaxes(self.tile_map(), -1, -2)
    if max_q_blocks is None:
      if self.is_host:
        max_q_blocks = max(int((kind_t != EMPTY).sum(-1).max()), 1)
      else:
        max_q_blocks = self.num_q_blocks
    idx, cnt, kind, tile = _compact(kind_t, max_q_blocks, tile_t)
    return KvMajorLayout(idx, cnt, kind, tile)

  def with_kv_major(self, max_q_blocks: int | None = None) -> BlockLayout:
    """This layout with its kv-major view attached (see `transpose`)."""
    return dataclasses.replace(self, kv_major=self.transpose(max_q_blocks))

  def kv_major_view(self) -> KvMajorLayout:
    """The attached kv-major view, or `transpose()` computed now."""
    return self.kv_major if self.kv_major is not None else self.transpose()

  # -- validation -------------------------------------------------------------

  def validate(self) -> None:
    """Host-side checks with clear errors; a no-op for traced layouts.

    Raises:
      ValueError: on inconsistent shapes, counts out of [0, Kmax], indices
        out of [0, Kb), unsorted or repeated indices, bad kinds or tiles.
    """
    check_shapes(self)
    if not self.is_host:
      return
    idx = np.asarray(self.kv_idx)
    cnt = np.asarray(self.kv_cnt)
    kind = np.asarray(self.kv_kind)
    kmax = idx.shape[-1]
    if cnt.min(initial=0) < 0 or cnt.max(initial=0) > kmax:
      raise ValueError(
          f"kv_cnt must lie in [0, Kmax={kmax}], got range "
          f"[{cnt.min()}, {cnt.max()}]")
    valid = np.arange(kmax) < cnt[..., None]
    if np.any(valid & ((idx < 0) | (idx >= self.num_kv_blocks))):
      bad = idx[valid & ((idx < 0) | (idx >= self.num_kv_blocks))]
      raise ValueError(
          f"kv_idx entries must lie in [0, num_kv_blocks="
          f"{self.num_kv_blocks}), found {bad[:4].tolist()}")
    ascending = np.diff(idx, axis=-1) > 0
    if np.any(valid[..., 1:] & ~ascending):
      where = np.argwhere(valid[..., 1:] & ~ascending)[0]
      raise ValueError(
          "kv_idx must be strictly ascending within each row's count; row "
          f"(b, h, q_block)={tuple(where[:3].tolist())} is not")
    if np.any(valid & (kind != PARTIAL) & (kind != FULL)):
      raise ValueError(
          "kv_kind must be PARTIAL (1) or FULL (2) on valid entries")
    if self.tile_idx is not None:
      tile = np.asarray(self.tile_idx)
      num_tiles = self.tiles.shape[0]
      if np.any(valid & (tile >= num_tiles)):
        raise ValueError(
            f"tile_idx entries must be < the pool size {num_tiles}")


def _full_like(x, value):
  xp = np if _is_host(x) else jnp
  return xp.full(x.shape, value, np.int8)


def check_shapes(layout: BlockLayout) -> None:
  idx_shape = tuple(layout.kv_idx.shape)
  if len(idx_shape) != 4:
    raise ValueError(
        f"layout.kv_idx must be [Bl, Hl, Qb, Kmax], got shape {idx_shape}")
  if tuple(layout.kv_cnt.shape) != idx_shape[:3]:
    raise ValueError(
        f"layout.kv_cnt must be [Bl, Hl, Qb]={idx_shape[:3]}, got "
        f"{tuple(layout.kv_cnt.shape)}")
  if tuple(layout.kv_kind.shape) != idx_shape:
    raise ValueError(
        f"layout.kv_kind must be {idx_shape}, got "
        f"{tuple(layout.kv_kind.shape)}")
  if (layout.tile_idx is None) != (layout.tiles is None):
    raise ValueError("layout.tile_idx and layout.tiles come together")
  if layout.tile_idx is not None:
    if tuple(layout.tile_idx.shape) != idx_shape:
      raise ValueError(
          f"layout.tile_idx must be {idx_shape}, got "
          f"{tuple(layout.tile_idx.shape)}")
    want = (layout.block_q, layout.block_kv)
    if layout.tiles.ndim != 3 or tuple(layout.tiles.shape[1:]) != want:
      raise ValueError(
          f"layout.tiles must be [P, block_q, block_kv]=[P, {want[0]}, "
          f"{want[1]}], got {tuple(layout.tiles.shape)}")
  if layout.num_kv_blocks < 1:
    raise ValueError(
        f"layout.num_kv_blocks must be >= 1, got {layout.num_kv_blocks}")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class KvMajorLayout:
  """Transposed lists: which query blocks each kv block is seen by.

  Attributes:
    q_idx: int32 [Bl, Hl, Kb, Qmax] ascending query block ids.
    q_cnt: int32 [Bl, Hl, Kb].
    q_kind: int8 [Bl, Hl, Kb, Qmax].
    tile_idx: optional int32 [Bl, Hl, Kb, Qmax] ids into the forward layout's
      tile pool (tiles stay in q-major orientation).
  """

  q_idx: Any
  q_cnt: Any
  q_kind: Any
  tile_idx: Any = None

  def tree_flatten(self):
    return (self.q_idx, self.q_cnt, self.q_kind, self.tile_idx), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)
