"""BlockLayout: the one block-sparse format of jsparse.

A padded-CSR ("ELL") list of the kv blocks each query block attends to,
compatible with FlexAttention's BlockMask. It is a registered pytree, so the
same type carries a static layout built once on the host (NumPy leaves) and a
dynamic layout built on device under `jit` (traced leaves).

Element-level visibility inside a *partial* block comes from, in order of
preference: a positional band predicate (causal, sliding window), segment ids
passed to the op, and a pool of boolean tiles for masks with no formula. A
*full* block is visible everywhere and costs no mask work.

Layouts come from dense maps (`from_kind_map`, `from_block_mask`,
`from_element_mask`), from element predicates without a T x S array
(`from_mask_fn` with the helpers of `pallas_kernels.mask_fns`), from bands
(`causal`, `local`), from packed-document segment ids (`from_segment_ids`,
traceable) and from FlexAttention lists (`from_flex`). Layouts built from jax
arrays carry static capacities: Kmax (`max_kv_blocks`, required) and Qmax
(`max_q_blocks`, for the sort-based `transpose`).
"""

from __future__ import annotations

import dataclasses
import functools
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


def band_bounds(band: Band, q_first, q_last, k_first, k_last):
  """(some, every) element of each block lies in `band`.

  Blocks are given by the first and last valid position of their query and
  kv ranges (broadcastable integer arrays, e.g. [Qb, 1] and [1, Kb]).
  """
  lo = -np.inf if band[0] is None else band[0]
  hi = np.inf if band[1] is None else band[1]
  d_min = k_first - q_last
  d_max = k_last - q_first
  return (d_max >= lo) & (d_min <= hi), (d_min >= lo) & (d_max <= hi)


def window_band(window, offset: int = 0) -> Band:
  """The band of a sliding window: i + offset - left <= j <= i + offset + right.

  Args:
    window: (left, right), each an int >= 0 or None (that side open).
    offset: shift of the window's centre.

  Raises:
    ValueError: naming `window` when it is not such a pair.
  """
  ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
      side is None or (is_static_int(side) and side >= 0) for side in window)
  if not ok:
    raise ValueError(
        "window must be (left, right) with each side an int >= 0 or None, "
        f"got {window!r}")
  left, right = window
  return (None if left is None else offset - left,
          None if right is None else offset + right)


def is_static_int(x) -> bool:
  """True for Python and NumPy integers (not bools, not traced values)."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_positive(**values) -> None:
  for name, value in values.items():
    if not is_static_int(value) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_capacity(name: str, value, need: str) -> None:
  """A static capacity: None or an int >= 1 (never a traced value)."""
  if value is not None and (not is_static_int(value) or value < 1):
    raise ValueError(
        f"{name} must be a static int >= 1 (the most {need}), got {value!r}")


def _missing_capacity(num_kv_blocks: int) -> ValueError:
  return ValueError(
      "a BlockLayout built from jax arrays (under jit, or device arrays "
      "outside it) needs a static capacity: pass "
      "max_kv_blocks=<int>, the most kv blocks any query block can list, "
      "derived from your method's budget and the sequence length (without "
      f"it every one of the Kb={num_kv_blocks} kv blocks would become a "
      "slot, and the op would cost dense attention at any density)")


def _block_positions(length: int, block: int):
  """First and last valid position of each block of a `length` axis."""
  first = np.arange(cdiv(length, block)) * block
  return first, np.minimum(first + block, length) - 1


def _is_host(*arrays) -> bool:
  return all(isinstance(a, (np.ndarray, np.generic)) for a in arrays)


def _xp(*arrays):
  return np if _is_host(*arrays) else jnp


@_common.numpy_broadcasting
def _pack(key, sentinel: int, width: int, *values):
  """Sorts entries by `key` along the last axis into padded lists.

  Entries whose key equals `sentinel` are dropped; the others keep the
  `width` smallest keys (stable). Works on NumPy and traced arrays alike.

  Args:
    key: int [..., C] sort keys, `sentinel` for absent entries.
    sentinel: key of absent entries (larger than every present key).
    width: static list capacity.
    *values: arrays broadcastable to key's shape, gathered along.

  Returns:
    cnt int32 [...], valid bool [..., width] and each value gathered to
    [..., width]; slots past the count repeat the last valid entry.
  """
  xp = _xp(key)
  order = xp.argsort(key, axis=-1, stable=True)[..., :width]
  cnt = xp.minimum((key != sentinel).sum(-1), width).astype(np.int32)
  slot = xp.arange(width, dtype=np.int32)
  last = xp.maximum(cnt - 1, 0)[..., None]
  order = xp.take_along_axis(order, xp.minimum(slot, last), axis=-1)
  gathered = [xp.take_along_axis(xp.broadcast_to(v, key.shape), order, -1)
              for v in values]
  return cnt, slot < cnt[..., None], gathered


@_common.numpy_broadcasting
def _finish_lists(cnt, valid, idx, kind, tile=None):
  """Canonical padding of packed lists.

  Ids become 0 on empty rows, kinds EMPTY past the count, and tiles -1
  except on valid partial entries.
  """
  xp = _xp(cnt, valid, idx, kind)
  idx = xp.where(cnt[..., None] > 0, idx, 0).astype(np.int32)
  kind = xp.where(valid, kind, EMPTY).astype(np.int8)
  if tile is not None:
    tile = xp.where(valid & (kind == PARTIAL), tile, -1).astype(np.int32)
  return idx, kind, tile


@_common.numpy_broadcasting
def _compact(kind_map, max_blocks: int, tile_map=None):
  """Turns a dense kind map [..., R, C] into padded sorted lists.

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
  xp = _xp(kind_map)
  kind_map = xp.asarray(kind_map)
  cols = kind_map.shape[-1]
  ids = xp.arange(cols, dtype=np.int32)
  key = xp.where(kind_map != EMPTY, ids, cols)
  extra = () if tile_map is None else (xp.asarray(tile_map),)
  cnt, valid, (idx, kind, *tile) = _pack(key, cols, max_blocks, ids,
                                         kind_map, *extra)
  idx, kind, tile = _finish_lists(cnt, valid, idx, kind,
                                  tile[0] if tile else None)
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


@_common.numpy_broadcasting
def _kv_groups(kv_idx, kv_cnt, num_kv_blocks: int):
  """Flat kv-group id (b * Hl + h) * Kb + kv of every list slot.

  Slots past the (clamped) count get the sentinel Bl * Hl * Kb.
  """
  xp = _xp(kv_idx, kv_cnt)
  bl, hl, _, kmax = kv_idx.shape
  valid = xp.arange(kmax) < xp.clip(kv_cnt, 0, kmax)[..., None]
  head = xp.arange(bl * hl, dtype=np.int32).reshape(bl, hl, 1, 1)
  kv = xp.clip(kv_idx, 0, num_kv_blocks - 1)
  gid = xp.where(valid, head * num_kv_blocks + kv, bl * hl * num_kv_blocks)
  return gid.reshape(-1).astype(np.int32)


def _group_sizes(gid, num_groups: int):
  """int32 [num_groups]: how many slots each group id has."""
  if _is_host(gid):
    counts = np.bincount(gid, minlength=num_groups + 1)
  else:
    counts = jnp.bincount(gid, length=num_groups + 1)
  return counts[:num_groups].astype(np.int32)


def _exact_max_q_blocks(kv_idx, kv_cnt, num_kv_blocks: int) -> int:
  """Host: the most query blocks any kv block is listed by (at least 1)."""
  bl, hl = kv_idx.shape[:2]
  sizes = _group_sizes(_kv_groups(kv_idx, kv_cnt, num_kv_blocks),
                       bl * hl * num_kv_blocks)
  return max(int(sizes.max(initial=0)), 1)


@_common.numpy_broadcasting
def _transpose_lists(kv_idx, kv_cnt, kv_kind, tile_idx, num_kv_blocks: int,
                     max_q_blocks: int):
  """Kv-major lists by a stable sort of the listed (q block, kv block) pairs.

  Slots are enumerated row-major (batch, head, q block, slot), so a stable
  sort by kv group keeps each group's query blocks ascending. Work is
  O(nnz log nnz) on the nnz = Bl * Hl * Qb * Kmax slots; the largest arrays
  are the slots and the [Bl, Hl, Kb, Qmax] result.
  """
  xp = _xp(kv_idx, kv_cnt, kv_kind)
  bl, hl, qb, kmax = kv_idx.shape
  groups = bl * hl * num_kv_blocks
  gid = _kv_groups(kv_idx, kv_cnt, num_kv_blocks)
  rows = xp.broadcast_to(xp.arange(qb, dtype=np.int32)[:, None],
                         kv_idx.shape).reshape(-1)
  order = xp.argsort(gid, stable=True)
  rows, kinds = rows[order], xp.asarray(kv_kind).reshape(-1)[order]
  sizes = _group_sizes(gid, groups)
  starts = xp.cumsum(sizes) - sizes
  cnt = xp.minimum(sizes, max_q_blocks)
  slot = xp.arange(max_q_blocks, dtype=np.int32)
  src = starts[:, None] + xp.minimum(slot, xp.maximum(cnt - 1, 0)[:, None])
  src = xp.minimum(src, gid.shape[0] - 1)
  tile = None
  if tile_idx is not None:
    tile = xp.asarray(tile_idx).reshape(-1)[order][src]
  idx, kind, tile = _finish_lists(cnt, slot < cnt[:, None], rows[src],
                                  kinds[src], tile)
  shape = (bl, hl, num_kv_blocks, max_q_blocks)
  return KvMajorLayout(
      idx.reshape(shape), cnt.reshape(shape[:3]), kind.reshape(shape),
      None if tile is None else tile.reshape(shape))


def _blocks_spanned(positions: int, block: int) -> int:
  """The most blocks a run of `positions` consecutive positions touches."""
  return cdiv(positions - 1, block) + 1


def _searchsorted_rows(sorted_rows, values, side: str):
  """Per-row `searchsorted` of [B, N] values into [B, T] sorted rows."""
  if _is_host(sorted_rows, values):
    return np.stack([np.searchsorted(a, v, side=side)
                     for a, v in zip(sorted_rows, values)]).astype(np.int32)
  search = functools.partial(jnp.searchsorted, side=side)
  return jax.vmap(search)(sorted_rows, values).astype(np.int32)


def _evaluate(mask_fn, q_idx, kv_idx) -> np.ndarray:
  out = np.asarray(mask_fn(q_idx, kv_idx))
  if out.dtype != bool or out.ndim < 2:
    raise ValueError(
        "mask_fn must return a bool array [..., rows, cols], got "
        f"{out.dtype} {out.shape}")
  return out


def _mask_fn_bounds(mask_fn, q_len, kv_len, block_q, block_kv):
  """(may, must) block maps of `mask_fn`, from its bounds when it has any."""
  q_first, q_last = _block_positions(q_len, block_q)
  k_first, k_last = _block_positions(kv_len, block_kv)
  bounds = getattr(mask_fn, "block_bounds", None)
  shape = (len(q_first), len(k_first))
  if bounds is None:
    return np.ones(shape, bool), np.zeros(shape, bool)
  may, must = bounds(q_first[:, None], q_last[:, None], k_first[None, :],
                     k_last[None, :])
  return (np.asarray(may, bool), np.asarray(must, bool))


def _mask_fn_blocks(mask_fn, band, q_len, kv_len, block_q, block_kv):
  """Host kinds [Bl, Hl, Qb, Kb], tile map and deduplicated tile pool.

  Blocks the bounds leave undecided are evaluated one block row at a time;
  a partial block gets a tile unless the layout's `band` already equals the
  mask on it.
  """
  may, must = _mask_fn_bounds(mask_fn, q_len, kv_len, block_q, block_kv)
  probe = _evaluate(mask_fn, np.zeros((1, 1), np.int32),
                    np.zeros((1, 1), np.int32))
  lead = np.broadcast_shapes(probe.shape[:-2], may.shape[:-2],
                             must.shape[:-2])
  if len(lead) > 2:
    raise ValueError(
        "mask_fn must return [rows, cols], [Hl, rows, cols] or "
        f"[Bl, Hl, rows, cols], got leading dims {lead}")
  lead = (1,) * (2 - len(lead)) + lead
  shape = lead + may.shape[-2:]
  must = np.broadcast_to(must, shape)
  unknown = np.broadcast_to(may, shape) & ~must
  kind = np.where(must, FULL, EMPTY).astype(np.int8)
  tile_map = np.full(shape, -1, np.int32)
  packed, where = [], []
  for row in np.flatnonzero(unknown.any((0, 1, 3))):
    cols = np.flatnonzero(unknown[:, :, row].any((0, 1)))
    q_pos = row * block_q + np.arange(block_q)
    kv_pos = (cols[:, None] * block_kv + np.arange(block_kv)).reshape(-1)
    valid = (q_pos < q_len)[:, None] & (kv_pos < kv_len)[None, :]
    # Padding positions are clamped for the call and masked out after it.
    vals = _evaluate(mask_fn, np.minimum(q_pos, q_len - 1)[:, None],
                     np.minimum(kv_pos, kv_len - 1)[None, :])
    blocks = lambda x: np.ascontiguousarray(np.moveaxis(
        x.reshape(x.shape[:-1] + (len(cols), block_kv)), -2, -3))
    vals = blocks(np.broadcast_to(vals, lead + valid.shape) & valid)
    seen = np.count_nonzero(vals.reshape(vals.shape[:-2] + (-1,)), axis=-1)
    size = np.count_nonzero(blocks(valid).reshape(len(cols), -1), axis=-1)
    row_kind = np.where(seen == size, FULL,
                        np.where(seen > 0, PARTIAL, EMPTY))  # [..., n]
    todo = unknown[:, :, row][..., cols]
    kind[:, :, row, cols] = np.where(todo, row_kind, kind[:, :, row, cols])
    b, h, c = np.nonzero(todo & (row_kind == PARTIAL))
    partial = vals[b, h, c].reshape(len(b), block_q * block_kv)
    if band is not None:  # keep only tiles the band alone does not give
      base = blocks(valid & band_mask(q_pos[:, None], kv_pos[None, :], band))
      keep = (partial != base[c].reshape(partial.shape)).any(-1)
      b, h, c, partial = b[keep], h[keep], c[keep], partial[keep]
    packed.append(np.packbits(partial, axis=-1))
    where.append((b, h, np.full_like(b, row), cols[c]))
  packed = np.concatenate(packed) if packed else ()
  if not len(packed):
    return kind, None, None
  # Deduplicate by the packed bytes, numbering tiles in order of appearance.
  pool = {}
  inverse = [pool.setdefault(tile.tobytes(), len(pool)) for tile in packed]
  tile_map[tuple(np.concatenate(w) for w in zip(*where))] = inverse
  tiles = np.frombuffer(b"".join(pool), np.uint8).reshape(len(pool), -1)
  tiles = np.unpackbits(tiles, axis=-1, count=block_q * block_kv)
  return kind, tile_map, tiles.reshape(-1, block_q, block_kv).astype(bool)


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
    max_q_blocks: optional static capacity Qmax of the kv-major lists: the
      most query blocks any kv block is listed by. Host constructors set it
      exactly; traced ones take it from their `max_q_blocks` argument.
      `transpose()` of a traced layout uses it (Qb when None).
    kv_major: the cached `transpose()`, attached only by `with_kv_major`
      (the op attaches it to host layouts so the dK/dV pass gets exact
      lists). It is not a constructor argument, so it can never disagree
      with the lists by construction: `dataclasses.replace` builds a new
      layout without it. `validate()` (run by the op on host layouts) also
      checks it against the lists, which catches a transpose spliced in by
      pytree surgery; traced layouts cannot be checked cheaply, so never
      rebuild one with a hand-made `kv_major`.
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
  max_q_blocks: int | None = None
  kv_major: KvMajorLayout | None = dataclasses.field(default=None,
                                                      init=False)

  # -- pytree ---------------------------------------------------------------

  def tree_flatten(self):
    children = (self.kv_idx, self.kv_cnt, self.kv_kind, self.tile_idx,
                self.tiles, self.kv_major)
    aux = (self.block_q, self.block_kv, self.num_kv_blocks, self.band,
           self.max_q_blocks)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    *lists, kv_major = children
    return cls(*lists, *aux)._attach(kv_major)

  def _attach(self, kv_major: KvMajorLayout | None) -> BlockLayout:
    """This layout (same object) with `kv_major` set; private on purpose."""
    object.__setattr__(self, "kv_major", kv_major)
    return self

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
  def _from_lists(cls, idx, cnt, kind, tile, tiles, block_q: int,
                  block_kv: int, num_kv_blocks: int, band: Band | None,
                  max_q_blocks: int | None) -> BlockLayout:
    """The one funnel of every constructor: sets the transpose capacity.

    Host layouts get the exact Qmax (a larger `max_q_blocks` is kept, a
    smaller one raises); traced ones keep the argument as their bound.
    """
    _check_capacity("max_q_blocks", max_q_blocks,
                    "query blocks any kv block is listed by")
    if _is_host(idx, cnt):
      exact = _exact_max_q_blocks(idx, cnt, num_kv_blocks)
      if max_q_blocks is not None and max_q_blocks < exact:
        raise ValueError(
            f"max_q_blocks={max_q_blocks} is below the {exact} query blocks "
            "that list one kv block in this layout; the dK/dV lists would "
            "drop blocks")
      max_q_blocks = exact if max_q_blocks is None else max_q_blocks
    return cls(idx, cnt, kind, tile, tiles, block_q, block_kv, num_kv_blocks,
               band, max_q_blocks)

  @classmethod
  def from_kind_map(cls, kind_map, block_q: int, block_kv: int, *,
                    max_kv_blocks: int | None = None,
                    max_q_blocks: int | None = None, tile_map=None,
                    tiles=None, band: Band | None = None) -> BlockLayout:
    """From a dense int8 map [Bl, Hl, Qb, Kb] of EMPTY/PARTIAL/FULL.

    Args:
      kind_map: int [Bl, Hl, Qb, Kb], NumPy (host) or jax (may be traced).
      block_q: query block size.
      block_kv: kv block size.
      max_kv_blocks: static list capacity Kmax; rows with more blocks keep
        the lowest ids. Default: the largest row count for NumPy maps;
        required for jax maps (traced or not, so eager and jit agree).
      max_q_blocks: static capacity of the transpose (see the attribute).
        Default: exact for host maps, Qb for traced ones.
      tile_map: optional int32 [Bl, Hl, Qb, Kb] ids into `tiles`, -1 for none.
      tiles: optional bool [P, block_q, block_kv] tile pool.
      band: optional positional predicate for partial blocks.

    Raises:
      ValueError: on a bad shape or capacity, or a traced map without
        `max_kv_blocks`.
    """
    _check_positive(block_q=block_q, block_kv=block_kv)
    if kind_map.ndim != 4:
      raise ValueError(
          "kind_map must be [Bl, Hl, Qb, Kb], got shape "
          f"{tuple(kind_map.shape)}")
    _check_capacity("max_kv_blocks", max_kv_blocks,
                    "kv blocks any query block lists")
    num_kv_blocks = kind_map.shape[-1]
    if max_kv_blocks is None:
      if not _is_host(kind_map):
        raise _missing_capacity(num_kv_blocks)
      max_kv_blocks = max(int((np.asarray(kind_map) != 0).sum(-1).max()), 1)
    idx, cnt, kind, tile = _compact(kind_map, max_kv_blocks, tile_map)
    return cls._from_lists(idx, cnt, kind, tile, tiles, block_q, block_kv,
                           num_kv_blocks, band, max_q_blocks)

  @classmethod
  def from_block_mask(cls, block_mask, block_q: int, block_kv: int, *,
                      full_block_mask=None, max_kv_blocks: int | None = None,
                      max_q_blocks: int | None = None,
                      band: Band | None = None) -> BlockLayout:
    """From a boolean block mask [Bl, Hl, Qb, Kb] (NumPy or traced).

    Blocks in `block_mask` are partial (element predicates apply) unless also
    set in `full_block_mask`, which marks blocks needing no mask work.
    Capacities as in `from_kind_map`: under jit `max_kv_blocks` is required.
    """
    xp = _xp(block_mask)
    block_mask = xp.asarray(block_mask)
    if block_mask.dtype != bool:
      raise ValueError(
          f"block_mask must be boolean, got dtype {block_mask.dtype}")
    kind = xp.where(block_mask, PARTIAL, EMPTY)
    if full_block_mask is not None:
      kind = xp.where(block_mask & full_block_mask, FULL, kind)
    return cls.from_kind_map(kind.astype(np.int8), block_q, block_kv,
                             max_kv_blocks=max_kv_blocks,
                             max_q_blocks=max_q_blocks, band=band)

  @classmethod
  @_common.numpy_broadcasting
  def from_element_mask(cls, mask, block_q: int, block_kv: int, *,
                        max_kv_blocks: int | None = None,
                        max_q_blocks: int | None = None) -> BlockLayout:
    """From a dense boolean element mask [Bl, Hl, T, S].

    Blocks with every element visible become full, blocks with some visible
    become partial with a tile in the pool. On the host the mask is read one
    block row at a time (`from_mask_fn`) and identical tiles are stored once;
    a mask with no partial block has no pool. Under jit `max_kv_blocks` is
    required and every listed partial entry gets its own tile, so the pool
    is [Bl * Hl * Qb * Kmax, block_q, block_kv].
    """
    host = _is_host(mask)
    xp = np if host else jnp
    mask = xp.asarray(mask)
    if mask.ndim != 4 or mask.dtype != bool:
      raise ValueError(
          "mask must be a boolean [Bl, Hl, T, S] array, got "
          f"{mask.dtype} {tuple(mask.shape)}")
    _check_positive(block_q=block_q, block_kv=block_kv)
    bl, hl, t, s = mask.shape
    if host:
      # from_mask_fn asks for rows [n, 1] x cols [1, m]: two 1-D takes.
      rows_cols = lambda q, kv: mask[..., q[:, 0], :][..., kv[0]]
      return cls.from_mask_fn(rows_cols, t, s,
                              block_q=block_q, block_kv=block_kv,
                              max_kv_blocks=max_kv_blocks,
                              max_q_blocks=max_q_blocks)
    qb, kb = cdiv(t, block_q), cdiv(s, block_kv)
    if max_kv_blocks is None:
      raise _missing_capacity(kb)
    padded = jnp.pad(mask, ((0, 0), (0, 0), (0, qb * block_q - t),
                            (0, kb * block_kv - s)))
    blocks = padded.reshape(bl, hl, qb, block_q, kb, block_kv)
    blocks = blocks.transpose(0, 1, 2, 4, 3, 5)  # [Bl,Hl,Qb,Kb,bq,bkv]
    any_ = blocks.any((-1, -2))
    # "Full" only needs the valid (unpadded) part visible: padding is masked
    # by the op itself.
    valid = np.zeros((qb * block_q, kb * block_kv), bool)
    valid[:t, :s] = True
    valid = valid.reshape(qb, block_q, kb, block_kv).transpose(0, 2, 1, 3)
    all_ = (blocks | ~valid).all((-1, -2))
    kind = jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY))
    layout = cls.from_kind_map(kind.astype(np.int8), block_q, block_kv,
                               max_kv_blocks=max_kv_blocks,
                               max_q_blocks=max_q_blocks)
    # The pool holds the listed blocks only, one tile per list slot.
    lead = (jnp.arange(bl)[:, None, None, None],
            jnp.arange(hl)[None, :, None, None],
            jnp.arange(qb)[None, None, :, None])
    tiles = blocks[(*lead, layout.kv_idx)].reshape(-1, block_q, block_kv)
    slots = jnp.arange(tiles.shape[0], dtype=jnp.int32)
    tile_idx = jnp.where(layout.kv_kind == PARTIAL,
                         slots.reshape(layout.kv_idx.shape), -1)
    return dataclasses.replace(layout, tile_idx=tile_idx, tiles=tiles)

  @classmethod
  def from_mask_fn(cls, mask_fn, q_len: int, kv_len: int, *,
                   block_q: int = 128, block_kv: int = 128,
                   max_kv_blocks: int | None = None,
                   max_q_blocks: int | None = None) -> BlockLayout:
    """Host layout of an element predicate, without a T x S array.

    Each block is classified exactly EMPTY, FULL or PARTIAL; partial blocks
    the predicate's band does not already describe get a tile in the
    deduplicated pool. The mask is evaluated one block row at a time, so
    host memory stays O(Bl * Hl * block_q * S + partial tiles).

    Mask functions from `pallas_kernels.mask_fns` (`causal`,
    `sliding_window`, `prefix_lm`, `chunked`, `document`, combined with
    `&` and `|`) also carry block bounds, so only the blocks their bounds
    leave undecided are evaluated, and a pure band becomes a tile-free
    `from_band` layout. A plain callable is evaluated on every block.

    Args:
      mask_fn: `mask_fn(q_idx, kv_idx) -> bool array`, vectorised with NumPy
        broadcasting over int arrays [rows, 1] and [1, cols] (positions in
        [0, T) and [0, S)); the result is [rows, cols], or [Hl, rows, cols]
        or [Bl, Hl, rows, cols] for per-batch or per-head masks.
      q_len: T, the number of queries.
      kv_len: S, the number of keys.
      block_q: query block size.
      block_kv: kv block size.
      max_kv_blocks: list capacity Kmax; default the exact maximum.
      max_q_blocks: transpose capacity; default the exact maximum.

    Returns:
      A host `BlockLayout` [Bl, Hl, Qb, Kmax].

    Raises:
      ValueError: on bad sizes, a non-callable `mask_fn`, or a result that is
        not boolean or has more than two leading dims.
    """
    if not callable(mask_fn):
      raise ValueError(f"mask_fn must be callable, got {type(mask_fn)}")
    _check_positive(q_len=q_len, kv_len=kv_len, block_q=block_q,
                    block_kv=block_kv)
    band = getattr(mask_fn, "band", None)
    if getattr(mask_fn, "is_band", False):
      return cls.from_band(q_len, kv_len, block_q, block_kv, band,
                           max_kv_blocks=max_kv_blocks,
                           max_q_blocks=max_q_blocks)
    kind, tile_map, tiles = _mask_fn_blocks(mask_fn, band, q_len, kv_len,
                                            block_q, block_kv)
    return cls.from_kind_map(kind, block_q, block_kv, tile_map=tile_map,
                             tiles=tiles, band=band,
                             max_kv_blocks=max_kv_blocks,
                             max_q_blocks=max_q_blocks)

  @classmethod
  def from_band(cls, q_len: int, kv_len: int, block_q: int, block_kv: int,
                band: Band, *, max_kv_blocks: int | None = None,
                max_q_blocks: int | None = None) -> BlockLayout:
    """Host layout of a positional band, shared by all batches and heads.

    Element (i, j) is visible when band[0] <= j - i <= band[1]. Blocks fully
    inside the band are full; blocks crossing an edge are partial and carry
    the band as their predicate.

    Raises:
      ValueError: on bad sizes or a band with band[0] > band[1].
    """
    _check_positive(q_len=q_len, kv_len=kv_len, block_q=block_q,
                    block_kv=block_kv)
    lo, hi = band
    if lo is not None and hi is not None and lo > hi:
      raise ValueError(
          f"band must have min_delta <= max_delta, got {tuple(band)}")
    q_first, q_last = _block_positions(q_len, block_q)
    k_first, k_last = _block_positions(kv_len, block_kv)
    any_, all_ = band_bounds(band, q_first[:, None], q_last[:, None],
                             k_first[None, :], k_last[None, :])
    kind = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
    return cls.from_kind_map(kind[None, None].astype(np.int8), block_q,
                             block_kv, band=tuple(band),
                             max_kv_blocks=max_kv_blocks,
                             max_q_blocks=max_q_blocks)

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
    """Sliding window: i sees keys j in [i + offset - left, i + offset + right].

    `window=(left, right)`, each an int >= 0 or None (that side open);
    `(w, 0)` is a causal window of w past keys plus the key at the query's
    own position. Raises ValueError naming `window` otherwise.
    """
    kv_len = q_len if kv_len is None else kv_len
    return cls.from_band(q_len, kv_len, block_q, block_kv,
                         window_band(window, offset))

  @classmethod
  def dense(cls, q_len: int, kv_len: int, *, block_q: int = 128,
            block_kv: int = 128) -> BlockLayout:
    """Every block full: plain dense attention through the sparse op."""
    _check_positive(q_len=q_len, kv_len=kv_len, block_q=block_q,
                    block_kv=block_kv)
    qb, kb = cdiv(q_len, block_q), cdiv(kv_len, block_kv)
    kind = np.full((1, 1, qb, kb), FULL, np.int8)
    return cls.from_kind_map(kind, block_q, block_kv)

  @classmethod
  @_common.numpy_broadcasting
  def from_segment_ids(cls, segment_ids, *, block_q: int = 128,
                       block_kv: int = 128, causal: bool = False,
                       max_document_len: int | None = None,
                       max_kv_blocks: int | None = None,
                       max_q_blocks: int | None = None) -> BlockLayout:
    """Packed documents: each token sees the tokens of its own segment.

    Works on the host and under jit (one compile for every batch of the
    same shape). Memory and work are O(B * (T + Qb * Kmax)): each query
    block lists the contiguous kv blocks from the first key of its first
    segment to the last key of its last one, found by binary search. No
    T x S or Qb x Kb array is built.

    Inside partial blocks the op's segment ids decide visibility: pass the
    same ids as `q_segment_ids` and `kv_segment_ids` to the op. Use
    `mask_fns.segment_ids_from_cu_seqlens` for `cu_seqlens` input.

    Args:
      segment_ids: int [B, T] segment id per position, non-decreasing along
        T (packed documents); NumPy or traced. Self-attention: S = T.
      block_q: query block size.
      block_kv: kv block size.
      causal: also require j <= i (the layout's band is (None, 0)).
      max_document_len: static bound L on a segment's length; it sets both
        capacities: Kmax covers 2L + block_q - 2 positions (L + block_q - 1
        when causal), Qmax 2L + block_kv - 2 (L + block_kv - 1). Segments
        longer than L lose their farthest blocks under jit.
      max_kv_blocks: explicit Kmax (overrides the one from L).
      max_q_blocks: explicit Qmax (overrides the one from L).

    Returns:
      A `BlockLayout` [B, 1, Qb, Kmax].

    Raises:
      ValueError: on bad ids or sizes, or under jit with neither
        `max_document_len` nor `max_kv_blocks`.
    """
    xp = _xp(segment_ids)
    seg = xp.asarray(segment_ids)
    if seg.ndim != 2 or not xp.issubdtype(seg.dtype, xp.integer):
      raise ValueError(
          "segment_ids must be an int [B, T] array, got "
          f"{seg.dtype} {tuple(seg.shape)}")
    _check_positive(block_q=block_q, block_kv=block_kv)
    _check_capacity("max_document_len", max_document_len,
                    "positions of one segment")
    t = seg.shape[1]
    qb, kb = cdiv(t, block_q), cdiv(t, block_kv)
    if max_document_len is not None:
      span = max_document_len + (0 if causal else max_document_len - 1)
      if max_kv_blocks is None:
        max_kv_blocks = min(_blocks_spanned(span + block_q - 1, block_kv), kb)
      if max_q_blocks is None:
        max_q_blocks = min(_blocks_spanned(span + block_kv - 1, block_q), qb)
    q_first, q_last = _block_positions(t, block_q)
    k_first, k_last = _block_positions(t, block_kv)
    first_seg, last_seg = seg[:, q_first], seg[:, q_last]  # [B, Qb]
    lo = _searchsorted_rows(seg, first_seg, "left")
    hi = _searchsorted_rows(seg, last_seg, "right") - 1
    if causal:
      hi = xp.minimum(hi, q_last)
    j0, j1 = lo // block_kv, hi // block_kv
    count = xp.maximum(j1 - j0 + 1, 0).astype(np.int32)
    if max_kv_blocks is None:
      if not _is_host(seg):
        raise _missing_capacity(kb)
      max_kv_blocks = max(int(count.max()), 1)
    _check_capacity("max_kv_blocks", max_kv_blocks,
                    "kv blocks any query block lists")
    cnt = xp.minimum(count, max_kv_blocks)
    slot = xp.arange(max_kv_blocks, dtype=np.int32)
    idx = j0[..., None] + xp.minimum(slot, xp.maximum(cnt - 1, 0)[..., None])
    take = lambda x: xp.take_along_axis(x[:, None, :], idx, axis=-1)
    uniform = (first_seg == last_seg)[..., None]
    full = (uniform & (take(seg[:, k_first]) == first_seg[..., None])
            & (take(seg[:, k_last]) == first_seg[..., None]))
    if causal:
      full &= xp.asarray(k_last)[idx] <= q_first[:, None]
    kind = xp.where(full, FULL, PARTIAL)
    idx, kind, _ = _finish_lists(cnt, slot < cnt[..., None], idx, kind)
    return cls._from_lists(idx[:, None], cnt[:, None], kind[:, None], None,
                           None, block_q, block_kv, kb,
                           (None, 0) if causal else None, max_q_blocks)

  # -- FlexAttention BlockMask interchange -----------------------------------

  @classmethod
  @_common.numpy_broadcasting
  def from_flex(cls, flex: FlexBlockMask, *,
                max_kv_blocks: int | None = None) -> BlockLayout:
    """From FlexAttention-style lists (see `FlexBlockMask`), host or traced.

    The partial and full lists are merged per query block by a sort over
    their W + Wf entries; no dense Qb x Kb map is built.

    Args:
      flex: the lists, with the static sizes, band and transpose capacity.
      max_kv_blocks: list capacity Kmax. Default: the exact maximum for host
        lists, min(Kb, W + Wf) for traced ones (no row can be truncated).
    """
    if not isinstance(flex, FlexBlockMask):
      raise ValueError(
          f"flex must be a FlexBlockMask, got {type(flex).__name__}")
    _check_capacity("max_kv_blocks", max_kv_blocks,
                    "kv blocks any query block lists")
    kb = flex.num_kv_blocks
    lists = [(flex.kv_num_blocks, flex.kv_indices, PARTIAL,
              flex.tile_indices)]
    if flex.full_kv_num_blocks is not None:
      lists.append((flex.full_kv_num_blocks, flex.full_kv_indices, FULL,
                    None))
    xp = _xp(*jax.tree.leaves(flex))
    keys, kinds, tiles = [], [], []
    for num, ids, kind, tile in lists:
      ids = xp.asarray(ids)
      valid = xp.arange(ids.shape[-1]) < xp.asarray(num)[..., None]
      keys.append(xp.where(valid, ids, kb))
      kinds.append(xp.full(ids.shape, kind, np.int8))
      tiles.append(xp.full(ids.shape, -1, np.int32) if tile is None
                   else xp.asarray(tile, np.int32))
    key = xp.concatenate(keys, -1)
    if max_kv_blocks is None:
      max_kv_blocks = (max(int((key != kb).sum(-1).max()), 1) if xp is np
                       else min(kb, key.shape[-1]))
    extra = [xp.concatenate(tiles, -1)] if flex.tiles is not None else []
    cnt, valid, (idx, kind, *tile) = _pack(
        key, kb, max_kv_blocks, key, xp.concatenate(kinds, -1), *extra)
    idx, kind, tile = _finish_lists(cnt, valid, idx, kind,
                                    tile[0] if tile else None)
    return cls._from_lists(idx, cnt, kind, tile, flex.tiles, flex.block_q,
                           flex.block_kv, kb, flex.band, flex.max_q_blocks)

  @_common.numpy_broadcasting
  def to_flex(self) -> FlexBlockMask:
    """The FlexAttention form: separate partial and full lists.

    Each index array is [Bl, Hl, Qb, Kmax], ascending, padded by repeating
    the last valid id (0 on empty rows). Lossless: `from_flex(to_flex())`
    gives back this layout, band, tiles and capacities included (pass
    `max_kv_blocks` if this layout's Kmax is above its largest row).
    """
    xp = np if self.is_host else jnp
    valid = xp.arange(self.max_kv_blocks) < self.kv_cnt[..., None]
    kb = self.num_kv_blocks
    out = {}
    for kind, name in ((PARTIAL, "kv"), (FULL, "full_kv")):
      key = xp.where(valid & (self.kv_kind == kind), self.kv_idx, kb)
      extra = ([self.tile_idx] if kind == PARTIAL and self.tiles is not None
               else [])
      cnt, sel, (idx, *tile) = _pack(key, kb, self.max_kv_blocks,
                                     self.kv_idx, *extra)
      idx, _, _ = _finish_lists(cnt, sel, idx, self.kv_kind)
      out[f"{name}_num_blocks"], out[f"{name}_indices"] = cnt, idx
      if tile:
        out["tile_indices"] = xp.where(sel, tile[0], -1).astype(np.int32)
    return FlexBlockMask(**out, tiles=self.tiles, block_q=self.block_q,
                         block_kv=self.block_kv, num_kv_blocks=kb,
                         band=self.band, max_q_blocks=self.max_q_blocks)

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

    A stable sort of the listed (query block, kv block) pairs by kv block:
    O(nnz log nnz) work on the Bl * Hl * Qb * Kmax list slots, and no dense
    Qb x Kb map. Counts are clamped to [0, Kmax] and ids to [0, Kb) first.

    Args:
      max_q_blocks: static capacity Qmax of each kv block's list. Default:
        the exact maximum for host layouts; for traced ones the layout's
        `max_q_blocks` bound, else Qb (the only bound that holds for every
        layout: a kv block is listed at most once per query block). A bound
        below the true need drops the farthest query blocks of the dK/dV
        lists; on the host that raises.

    Raises:
      ValueError: on a host layout whose exact need exceeds `max_q_blocks`.
    """
    if self.is_host:
      exact = _exact_max_q_blocks(self.kv_idx, self.kv_cnt,
                                  self.num_kv_blocks)
      if max_q_blocks is not None and max_q_blocks < exact:
        raise ValueError(
            f"max_q_blocks={max_q_blocks} is below the {exact} query blocks "
            "that list one kv block in this layout")
      max_q_blocks = exact if max_q_blocks is None else max_q_blocks
    elif max_q_blocks is None:
      max_q_blocks = self.max_q_blocks or self.num_q_blocks
    _check_capacity("max_q_blocks", max_q_blocks,
                    "query blocks any kv block is listed by")
    return _transpose_lists(self.kv_idx, self.kv_cnt, self.kv_kind,
                            self.tile_idx, self.num_kv_blocks, max_q_blocks)

  def with_kv_major(self, max_q_blocks: int | None = None) -> BlockLayout:
    """A copy of this layout with its kv-major view attached.

    The only way to set `kv_major`: the view is computed from this layout's
    own lists (see `transpose`), and any `dataclasses.replace` drops it.
    """
    return dataclasses.replace(self)._attach(self.transpose(max_q_blocks))

  def kv_major_view(self) -> KvMajorLayout:
    """The attached kv-major view, or `transpose()` computed now."""
    return self.kv_major if self.kv_major is not None else self.transpose()

  # -- validation -------------------------------------------------------------

  def validate(self) -> None:
    """Host-side checks with clear errors; a no-op for traced layouts.

    Raises:
      ValueError: on inconsistent shapes, counts out of [0, Kmax], indices
        out of [0, Kb), unsorted or repeated indices, bad kinds or tiles, a
        `max_q_blocks` below the layout's need, or an attached `kv_major`
        that is not this layout's transpose.
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
    self._validate_kv_major()

  def _validate_kv_major(self) -> None:
    """The transpose capacity and the attached view match the lists."""
    exact = _exact_max_q_blocks(self.kv_idx, self.kv_cnt, self.num_kv_blocks)
    if self.max_q_blocks is not None and self.max_q_blocks < exact:
      raise ValueError(
          f"layout.max_q_blocks={self.max_q_blocks} is below the {exact} "
          "query blocks that list one kv block (stale after "
          "dataclasses.replace of the lists?); rebuild it with a "
          "constructor")
    if self.kv_major is None:
      return
    attached = self.kv_major
    width = attached.q_idx.shape[-1]
    fresh = self.transpose(max(width, exact))
    same = all(
        (a is None) == (b is None) and (a is None or np.array_equal(a, b))
        for a, b in ((getattr(attached, f.name), getattr(fresh, f.name))
                     for f in dataclasses.fields(KvMajorLayout)))
    if width < exact or not same:
      raise ValueError(
          "layout.kv_major is not the transpose of this layout's lists (a "
          "stale view spliced in by pytree surgery?); attach it with "
          "with_kv_major()")


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


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class FlexBlockMask:
  """FlexAttention's BlockMask lists, plus what a BlockLayout round-trip needs.

  FlexAttention keeps partial blocks (its mask_mod applies) and full blocks
  in separate lists; here the mask_mod's role is played by `band` and the
  tile pool, carried along so that `BlockLayout.from_flex(layout.to_flex())`
  is lossless.

  Attributes:
    kv_num_blocks: int32 [Bl, Hl, Qb] partial blocks per query block.
    kv_indices: int32 [Bl, Hl, Qb, W] their kv block ids, ascending within
      the count; entries past it are ignored.
    full_kv_num_blocks: optional int32 [Bl, Hl, Qb] full blocks per row.
    full_kv_indices: optional int32 [Bl, Hl, Qb, Wf] their ids.
    tile_indices: optional int32 [Bl, Hl, Qb, W] ids into `tiles` of the
      partial blocks, aligned with `kv_indices` (-1: no tile).
    tiles: optional bool [P, block_q, block_kv] tile pool.
    block_q: query block size (static).
    block_kv: kv block size (static).
    num_kv_blocks: Kb (static).
    band: optional static band predicate of the partial blocks.
    max_q_blocks: optional static transpose capacity (see BlockLayout).
  """

  kv_num_blocks: Any
  kv_indices: Any
  full_kv_num_blocks: Any = None
  full_kv_indices: Any = None
  tile_indices: Any = None
  tiles: Any = None
  block_q: int = 128
  block_kv: int = 128
  num_kv_blocks: int = 0
  band: Band | None = None
  max_q_blocks: int | None = None

  def tree_flatten(self):
    children = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices, self.tile_indices, self.tiles)
    aux = (self.block_q, self.block_kv, self.num_kv_blocks, self.band,
           self.max_q_blocks)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)
