"""RowLayout: per-query-row key lists, the row-sparse format of jsparse.

Methods that pick keys per query row (SEA, Sparsifiner, DMA per-row, HiP's
token path) describe their choice as a padded list of key token indices per
query group instead of a [T, S] element mask. `block_sparse_attention`
executes it with a gather path whose memory is O(T * Kmax) and work
O(T * Kmax * D); see `block_sparse_attention/row_sparse.py`.

A query group is `group_size` consecutive queries sharing one gathered list
(1: a list per row). Optional row ranges (`row_start`, `row_end`) let each
listed key be seen by an interval of the group's rows only, which reuses each
gathered key `group_size` times when neighbouring rows pick overlapping keys
(a causal boundary, a sliding window, a key that enters or leaves a running
top-k), at O(Kmax) integers per group instead of a [group_size, Kmax] mask.

Like `BlockLayout`, it is a registered pytree: NumPy leaves for a static
layout built on the host, traced leaves for one built under `jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common


def _is_host(*arrays) -> bool:
  return all(isinstance(a, (np.ndarray, np.generic)) for a in arrays
             if a is not None)


def _xp(*arrays):
  return np if _is_host(*arrays) else jnp


def _as_int32(x, name: str):
  xp = _xp(x)
  x = xp.asarray(x)
  if not xp.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
  return x.astype(np.int32)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class RowLayout:
  """Which keys each group of query rows attends to.

  Attributes:
    kv_idx: int32 [Bl, Hl, Qg, Kmax] key token indices in [0, S) listed for
      each query group; entries past the group's count are ignored (any
      value), and so are entries equal to S within it (padding). Bl is 1
      (shared) or B; Hl is 1, the number of kv heads (the q heads of a kv
      head share the list) or of q heads. The valid entries of
      one list must be distinct: `validate` checks host layouts, while
      duplicates in a traced layout are counted twice (the key gets twice
      its softmax weight).
    kv_cnt: int32 [Bl, Hl, Qg] number of valid entries; the op clamps it to
      [0, Kmax]. A group with no visible key gives output 0 and lse -inf.
    row_start: optional int32 [Bl, Hl, Qg, Kmax], with `row_end`: row r
      (0 <= r < group_size) of group g sees listed key m only when
      row_start[..., g, m] <= r < row_end[..., g, m]. None: every row of a
      group sees every listed key.
    row_end: optional int32 [Bl, Hl, Qg, Kmax], see `row_start`.
    group_size: queries per group (static); Qg = ceil(T / group_size).
    num_keys: S, the length of the kv axis (static).
  """

  kv_idx: Any
  kv_cnt: Any
  row_start: Any = None
  row_end: Any = None
  group_size: int = 1
  num_keys: int = 0

  # -- pytree ---------------------------------------------------------------

  def tree_flatten(self):
    return ((self.kv_idx, self.kv_cnt, self.row_start, self.row_end),
            (self.group_size, self.num_keys))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  # -- constructor ----------------------------------------------------------

  @classmethod
  def from_indices(cls, kv_idx, kv_cnt=None, *, num_keys: int,
                   group_size: int = 1, row_start=None,
                   row_end=None) -> RowLayout:
    """From index lists (NumPy on the host, or jax arrays, maybe traced).

    Args:
      kv_idx: integer [Bl, Hl, Qg, Kmax] key indices per query group.
      kv_cnt: optional integer [Bl, Hl, Qg] valid entries; None: all Kmax.
      num_keys: S, the number of keys.
      group_size: queries per group.
      row_start: optional integer [Bl, Hl, Qg, Kmax], with `row_end`: the
        rows [row_start, row_end) of a group see the entry.
      row_end: optional integer [Bl, Hl, Qg, Kmax].

    Raises:
      ValueError: on non-integer indices or ranges, inconsistent shapes, or
        only one of row_start and row_end.
    """
    kv_idx = _as_int32(kv_idx, "kv_idx")
    if kv_idx.ndim != 4:
      raise ValueError(
          f"kv_idx must be [Bl, Hl, Qg, Kmax], got shape {tuple(kv_idx.shape)}")
    xp = _xp(kv_idx)
    if kv_cnt is None:
      kv_cnt = xp.full(kv_idx.shape[:3], kv_idx.shape[3], np.int32)
    if (row_start is None) != (row_end is None):
      given = "row_end" if row_start is None else "row_start"
      raise ValueError(
          f"row_start and row_end must be given together, got only {given}")
    if row_start is not None:
      row_start = _as_int32(row_start, "row_start")
      row_end = _as_int32(row_end, "row_end")
    layout = cls(kv_idx, _as_int32(kv_cnt, "kv_cnt"), row_start, row_end,
                 int(group_size), int(num_keys))
    check_shapes(layout)
    return layout

  # -- shape helpers --------------------------------------------------------

  @property
  def batch_size(self) -> int:
    return self.kv_idx.shape[0]

  @property
  def num_heads(self) -> int:
    return self.kv_idx.shape[1]

  @property
  def num_groups(self) -> int:
    return self.kv_idx.shape[2]

  @property
  def max_keys(self) -> int:
    return self.kv_idx.shape[3]

  @property
  def is_host(self) -> bool:
    """True when every leaf is a NumPy array (a static, host-built layout)."""
    return _is_host(*jax.tree_util.tree_leaves(self))

  # -- views ----------------------------------------------------------------

  @_common.numpy_broadcasting
  def listed(self):
    """bool [Bl, Hl, Qg, group_size|1, Kmax]: entries a row may see.

    An entry is listed when its slot is below the clamped count, its index
    lies in [0, S) and the row's position lies in the entry's row range (if
    any).
    """
    xp = _xp(*jax.tree_util.tree_leaves(self))
    cnt = xp.clip(self.kv_cnt, 0, self.max_keys)
    valid = xp.arange(self.max_keys) < cnt[..., None]
    valid = valid & (self.kv_idx >= 0) & (self.kv_idx < self.num_keys)
    valid = valid[..., None, :]
    if self.row_start is None:
      return valid
    rows = xp.arange(self.group_size)[:, None]
    return valid & ((rows >= self.row_start[..., None, :])
                    & (rows < self.row_end[..., None, :]))

  def density(self):
    """Mean number of keys a query row sees, divided by S."""
    xp = _xp(*jax.tree_util.tree_leaves(self))
    listed = xp.broadcast_to(self.listed(), (*self.kv_idx.shape[:3],
                                             self.group_size, self.max_keys))
    return xp.mean(listed.sum(-1)) / self.num_keys

  @_common.numpy_broadcasting
  def to_dense_mask(self, q_len: int, kv_len: int):
    """bool [Bl, Hl, T, S]: which elements the lists allow (tests only).

    Op-level predicates (causal, segment ids) are not applied.
    """
    want = -(-q_len // self.group_size)
    if want != self.num_groups:
      raise ValueError(
          f"q_len={q_len} with group_size={self.group_size} needs "
          f"{want} query groups, the layout has {self.num_groups}")
    if kv_len != self.num_keys:
      raise ValueError(
          f"kv_len={kv_len} must equal the layout's num_keys={self.num_keys}")
    bl, hl, qg, kmax = self.kv_idx.shape
    gs = self.group_size
    listed = jnp.broadcast_to(self.listed(), (bl, hl, qg, gs, kmax))
    # Entries not listed go to an extra column that is dropped.
    cols = jnp.where(listed, self.kv_idx[..., None, :], kv_len)
    cols = cols.reshape(bl, hl, qg * gs, kmax)
    rows = jnp.arange(qg * gs)[:, None]
    dense = jnp.zeros((bl, hl, qg * gs, kv_len + 1), bool)
    dense = dense.at[jnp.arange(bl)[:, None, None, None],
                     jnp.arange(hl)[None, :, None, None], rows, cols].set(True)
    return dense[:, :, :q_len, :kv_len]

  # -- validation -----------------------------------------------------------

  def validate(self) -> None:
    """Host-side checks with clear errors; shapes only for traced layouts.

    Raises:
      ValueError: on inconsistent shapes, listed indices outside [0, S]
        (S is padding) or valid indices repeated within one list.
    """
    check_shapes(self)
    if not self.is_host:
      return
    idx = np.asarray(self.kv_idx)
    cnt = np.clip(np.asarray(self.kv_cnt), 0, self.max_keys)
    valid = np.arange(self.max_keys) < cnt[..., None]
    bad = valid & ((idx < 0) | (idx > self.num_keys))
    if bad.any():
      raise ValueError(
          f"kv_idx entries within kv_cnt must lie in [0, num_keys="
          f"{self.num_keys}) (or equal num_keys, padding), found "
          f"{idx[bad][:4].tolist()}")
    valid &= idx < self.num_keys
    # Invalid slots get distinct negative fillers so only real repeats tie.
    keyed = np.where(valid, idx, -1 - np.arange(self.max_keys))
    repeated = np.diff(np.sort(keyed, axis=-1), axis=-1) == 0
    if repeated.any():
      where = np.argwhere(repeated.any(-1))[0]
      raise ValueError(
          "kv_idx entries within kv_cnt must be distinct; the list of "
          f"(b, h, group)={tuple(where.tolist())} repeats an index")


def check_shapes(layout: RowLayout) -> None:
  """Raises ValueError naming the field whose shape or dtype is wrong."""
  idx_shape = tuple(layout.kv_idx.shape)
  if len(idx_shape) != 4:
    raise ValueError(
        f"layout.kv_idx must be [Bl, Hl, Qg, Kmax], got shape {idx_shape}")
  for name in ("kv_idx", "kv_cnt"):
    dtype = getattr(layout, name).dtype
    if dtype != np.int32:
      raise ValueError(f"layout.{name} must be int32, got dtype {dtype}")
  if tuple(layout.kv_cnt.shape) != idx_shape[:3]:
    raise ValueError(
        f"layout.kv_cnt must be [Bl, Hl, Qg]={idx_shape[:3]}, got "
        f"{tuple(layout.kv_cnt.shape)}")
  if layout.group_size < 1:
    raise ValueError(
        f"layout.group_size must be >= 1, got {layout.group_size}")
  if layout.num_keys < 1:
    raise ValueError(f"layout.num_keys must be >= 1, got {layout.num_keys}")
  if (layout.row_start is None) != (layout.row_end is None):
    raise ValueError("layout.row_start and layout.row_end must be given "
                     "together")
  for name in ("row_start", "row_end"):
    x = getattr(layout, name)
    if x is not None and (tuple(x.shape) != idx_shape or x.dtype != np.int32):
      raise ValueError(
          f"layout.{name} must be int32 [Bl, Hl, Qg, Kmax]={list(idx_shape)},"
          f" got {x.dtype} {tuple(x.shape)}")
