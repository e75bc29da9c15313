"""Mosaic TPU kernels of block-sparse attention (forward, dQ, dK/dV).

The layout's lists drive the pipelines through scalar prefetch. Each
(batch, head) walks its rows as a list of steps, one per live (row, slot)
pair, as splash attention's COO path does: the grid is (batch x heads,
steps) and each BlockSpec index_map reads the row and block id of the
current step from SMEM, so the pipeline DMAs exactly the listed blocks.
Slots past a row's count and slots wholly above the causal diagonal are
left out of the walk; a row with nothing listed keeps one skipped step, so
its output (zeros, lse -inf) is still written. A host layout's walk is as
long as its listed blocks (`host_layout_options`: a causal layout takes
about half of Qb x Kmax steps); a traced one is Qb x Kmax steps long, the
most its lists can hold, with the unused steps at the end doing nothing.
Skipped steps repeat the previous block id, so the pipeline sees an
unchanged block index and issues no copy.

- forward and dQ: the walk of `layout.kv_idx`; the output block stays
  resident over its row's steps ("arbitrary" axis) while a flash
  (online-softmax) state accumulates in VMEM scratch, initialised at the
  row's first step and written at its last.
- dK/dV(/d bias_k): per kv head, the walk of the transposed lists visits
  each kv block's q heads of the GQA group (members) one after the other, so
  dK/dV of a kv head sum their contributions in VMEM: no atomics. Its tiles
  are [keys, queries] (k.q^T), so dV += P^T dO and dK += dS^T Q need no
  transpose of P or dS in VMEM.

GQA reads the kv head h // G in the index maps (no K/V repeat). Full blocks
the diagonal leaves whole do no mask work (unless segment ids are given);
the others evaluate the op's causal and segment predicates, partial
blocks also the layout's band and tile; the last kv block masks its padding
keys when S is ragged.
The running max and sum are lane-replicated [rows, 128] VMEM scratch, as in
splash attention. The log-sum-exp and the backward's delta cross the kernel
boundary compact (never [B, H, Tp, 128]): as [B, H, Tp, 1] columns for the
forward and dQ kernels, as [B, H, Qb, 1, block_q] rows for dK/dV, both
views of one [B, H, Tp] array; the kernels broadcast them over the keys.

On a non-TPU backend the kernels run in Pallas interpret mode; exporting for
TPU from any host lowers the Mosaic kernels (`lax.platform_dependent`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import config as config_lib
from pallas_kernels.block_sparse_attention import tile_math

NAME = "mosaic_tpu"
# The backward kernels have no derivative of their own.
SECOND_ORDER = False

NUM_LANES = 128
NUM_SUBLANES = 8
# Step codes of the prefetched lists: 0 skips the slot (past the row's
# count); PARTIAL and FULL as in the layout; TILED is a partial block that
# also reads its element mask from the tile pool.
_SKIP = 0
_TILED = 3
_NT_DIMS = (((1,), (1,)), ((), ()))


# Layout blocks below this many rows or keys run far below peak on TPU.
_FAST_TPU_BLOCK = 512


def block_size_advice(layout, platform: str, interpret) -> str | None:
  """Why a layout's blocks will be slow on a TPU, or None.

  Each grid step DMAs one (q block, kv block) pair and costs a fixed
  overhead (about 0.35 us), so blocks of 128 spend most of a step waiting;
  512-1024 is the sweet spot. Only said when compiling for a TPU.
  """
  if platform != "tpu" or interpret:
    return None
  small = min(layout.block_q, layout.block_kv)
  if small >= _FAST_TPU_BLOCK:
    return None
  return (
      f"block_sparse_attention on TPU with {layout.block_q}x"
      f"{layout.block_kv} layout blocks: every grid step moves one block "
      "pair and pays a fixed step overhead, so blocks under "
      f"{_FAST_TPU_BLOCK} run well below the chip's peak. Build the layout "
      f"with block_q = block_kv = {_FAST_TPU_BLOCK} or 1024 where the method "
      "allows (the compute tile, MosaicTpuConfig.block_kv_compute, stays "
      "128-512).")


def unavailable_reason(platform: str, interpret) -> str | None:
  """None when the kernels can run: on TPU, or anywhere in interpret mode."""
  if platform == "tpu" or interpret:
    return None
  return f"Mosaic TPU kernels need a TPU or interpret mode, not {platform!r}"


# -- static geometry -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static sizes of one kernel launch (after any SMEM split)."""

  batch: int
  num_q_heads: int
  num_kv_heads: int
  layout_batch: int
  layout_heads: int
  bias_batch: int  # 0: no bias
  bias_heads: int
  head_dim: int
  block_q: int
  block_kv: int
  block_kv_compute: int
  num_q_blocks: int
  num_kv_blocks: int

  @property
  def group(self) -> int:
    return self.num_q_heads // self.num_kv_heads

  @property
  def token_major(self) -> bool:
    """Whether q/k/v/out blocks index [B, T, H * D] directly.

    A [rows, D] block of head h is then a lane-aligned column slice, which
    the TPU block-shape rule allows when D is a multiple of 128, and the
    operands need no [B, T, H, D] <-> [B, H, T, D] transposes (a free
    reshape). Other head dims use head-major [B, H, T, D] operands.
    """
    return self.head_dim % NUM_LANES == 0

  def kv_head(self, h):
    return h if self.group == 1 else lax.div(h, self.group)

  def _entry(self, b, h, batch, heads):
    """(batch, head) of a [1|B, 1|Hkv|Hq, ...] operand for q head h."""
    if heads == 1:
      head = 0
    elif heads == self.num_q_heads:
      head = h
    else:
      head = self.kv_head(h)
    return (b if batch > 1 else 0), head

  def layout_entry(self, b, h):
    """(layout batch, layout head) read by q head h of batch b."""
    return self._entry(b, h, self.layout_batch, self.layout_heads)

  def bias_entry(self, b, h):
    """(bias batch, bias head) read by q head h of batch b."""
    return self._entry(b, h, self.bias_batch, self.bias_heads)


def _compute_tile(cfg: config_lib.MosaicTpuConfig, block_kv: int,
                  head_dim: int) -> int:
  tile = cfg.kv_compute_tile(block_kv, head_dim)
  if block_kv % tile:
    raise ValueError(
        f"block_kv_compute={tile} must divide the layout's block_kv="
        f"{block_kv}")
  return tile


# -- scalar-prefetched step lists ----------------------------------------------


def _smallest_int(max_value: int):
  for dtype in (np.int8, np.int16):
    if max_value <= np.iinfo(dtype).max:
      return dtype
  return np.int32


@dataclasses.dataclass(frozen=True)
class _Lists:
  """The steps of one launch's walk, flat [Bl * H' * N] arrays in SMEM.

  Each (layout batch, list head) walks its N steps in order: step n visits
  block `block[n]` of row `row[n]` (`member[n]` of the GQA group in the
  dK/dV walk) with step code `code[n]` and pool tile `tile[n]`. `edge[n]`
  flags the first and last step of a row and of a (row, member) run. Every
  row (run) has at least one step, a skipped one when nothing is listed, so
  its outputs are still written; steps past a walk's end repeat its last
  row and block and do nothing.
  """

  block: jax.Array
  code: jax.Array
  row: jax.Array
  edge: jax.Array
  member: jax.Array | None
  tile: jax.Array | None
  steps: int  # N
  heads: int  # H', list heads of the walk

  def arrays(self):
    return ((self.block, self.code, self.row, self.edge)
            + (() if self.member is None else (self.member,))
            + (() if self.tile is None else (self.tile,)))


# Bits of the edge flags.
_FIRST_OF_ROW, _LAST_OF_ROW, _FIRST_OF_RUN, _LAST_OF_RUN = 1, 2, 4, 8


def _hold(values, live):
  """`values` [..., W] with each dead slot taking the last live slot's value.

  Dead slots before the first live one take the first live value. A slot
  whose fetch id repeats the previous one costs the pipeline no copy.
  """
  slot = jnp.arange(values.shape[-1], dtype=jnp.int32)
  last = lax.cummax(jnp.where(live, slot, -1), axis=values.ndim - 1)
  first = jnp.argmax(live, axis=-1)[..., None]
  return jnp.take_along_axis(values, jnp.where(last >= 0, last, first),
                             axis=-1)


def walk_length(cnt, width: int, group: int = 1,
                per_member: bool = False) -> int:
  """Steps N of the longest walk over layout-style counts [Bl, Hl, R].

  Each (row, member) takes max(count, 1) steps (counts clipped to the list
  width); `group` members share a list unless `per_member`, where
  consecutive groups of Hl heads are the members of one list head.
  """
  steps = np.maximum(np.minimum(np.asarray(cnt), width), 1)
  bl, hl, r = steps.shape
  if per_member:
    return int(steps.reshape(bl, hl // group, group * r).sum(-1).max())
  return int(steps.sum(-1).max()) * group


@_common.numpy_broadcasting
def _walk(idx, cnt, kind, tile_idx, *, num_blocks: int, num_tiles,
          steps: int | None, group: int = 1, per_member: bool = False,
          hidden=None) -> _Lists:
  """The step lists of layout-style lists [Bl, Hl, R, W].

  Rows are walked in order, the `group` members of a row one after the
  other (the q heads of a kv head in the dK/dV walk), and within a run its
  live slots: those before the count and not `hidden` (bool [.., R, W]).
  Dead slots are left out, so the walk is N <= R * G * W steps long
  (`steps`, `walk_length` of a host layout; None: R * G * W).

  Args:
    idx, cnt, kind, tile_idx: the lists, counts, kinds and pool tiles.
    num_blocks: block ids the lists address (for their int type).
    num_tiles: the pool size, or None.
    steps: static N, at least the longest walk.
    group: G members per row.
    per_member: Hl = H' * G heads, each the list of one member; else the
      members share their head's list.
    hidden: optional bool [Bl, Hl, R, W] slots to skip.
  """
  idx, cnt, kind = jnp.asarray(idx), jnp.asarray(cnt), jnp.asarray(kind)
  bl, hl, r, w = idx.shape
  live = jnp.arange(w, dtype=jnp.int32) < cnt[..., None]
  if hidden is not None:
    live = live & jnp.logical_not(hidden)
  code = jnp.where(live, kind.astype(jnp.int32), _SKIP)
  if tile_idx is not None:
    tile_idx = jnp.asarray(tile_idx)
    code = jnp.where(live & (code == layout_lib.PARTIAL) & (tile_idx >= 0),
                     _TILED, code)
  heads = hl // group if per_member else hl

  def runs(x):  # [Bl, Hl, R, W] -> [Bl, H', R * G * W] in walk order
    if per_member:
      x = x.reshape(bl, heads, group, r, w)
    else:
      x = jnp.broadcast_to(x[:, :, None], (bl, hl, group, r, w))
    return x.transpose(0, 1, 3, 2, 4).reshape(bl, heads, r * group * w)

  live_w = runs(live)
  slot_w = jnp.arange(r * group * w, dtype=jnp.int32)
  # An empty run keeps its first slot as a skipped step.
  empty = ~jnp.any(live_w.reshape(bl, heads, r * group, w), -1)
  keep = live_w | (jnp.repeat(empty, w, axis=-1) & (slot_w % w == 0))
  n = r * group * w if steps is None else steps
  order = jnp.argsort(jnp.logical_not(keep), axis=-1, stable=True)[..., :n]
  total = jnp.sum(keep, -1, keepdims=True)
  valid = jnp.arange(n, dtype=jnp.int32) < total
  pick = lambda x: jnp.take_along_axis(runs(x), order, axis=-1)
  # Steps past the end stay on the last run (row R - 1, member G - 1).
  run = jnp.where(valid, order // w, r * group - 1)
  row = run // group
  code = jnp.where(valid, pick(code), _SKIP)
  active = code != _SKIP
  edge = jnp.zeros_like(run)
  at_end = jnp.arange(n) == total - 1
  for key, first, last in ((row, _FIRST_OF_ROW, _LAST_OF_ROW),
                           (run, _FIRST_OF_RUN, _LAST_OF_RUN)):
    prev = jnp.concatenate([jnp.full_like(key[..., :1], -1), key[..., :-1]],
                           -1)
    nxt = jnp.concatenate([key[..., 1:], jnp.full_like(key[..., :1], -1)],
                          -1)
    edge += jnp.where(valid & (key != prev), first, 0)
    edge += jnp.where(valid & ((key != nxt) | at_end), last, 0)
  tile = None
  if tile_idx is not None:
    # Steps without a tile re-fetch the previous one: no copy.
    tile = jnp.maximum(_hold(pick(tile_idx), code == _TILED), 0)
    tile = tile.reshape(-1).astype(_smallest_int(num_tiles - 1))
  flat = lambda x, top: x.reshape(-1).astype(_smallest_int(top))
  return _Lists(
      block=flat(_hold(pick(idx), active), num_blocks - 1),
      code=code.reshape(-1).astype(np.int8), row=flat(row, r - 1),
      edge=edge.reshape(-1).astype(np.int8),
      member=flat(run % group, group - 1) if group > 1 else None,
      tile=tile, steps=n, heads=heads)


def prefetch_bytes(num_steps: int, *, num_blocks: int, num_rows: int,
                   num_tiles: int | None, members: int = 1) -> int:
  """SMEM bytes of `num_steps` walk steps (`_Lists`).

  Block ids, row ids, members and tile ids each in the smallest int type
  that holds them, int8 step codes and edge flags, each array padded to
  whole 32-bit SMEM words.
  """
  sizes = [np.dtype(_smallest_int(num_blocks - 1)).itemsize, 1,
           np.dtype(_smallest_int(num_rows - 1)).itemsize, 1]
  if members > 1:
    sizes.append(np.dtype(_smallest_int(members - 1)).itemsize)
  if num_tiles is not None:
    sizes.append(np.dtype(_smallest_int(num_tiles - 1)).itemsize)
  return sum(-(-num_steps * s // 4) * 4 for s in sizes)


# -- kernels -------------------------------------------------------------------


def _lanes(x, n: int):
  """Widens a lane-replicated [rows, 128] array to [rows, n]."""
  if n <= NUM_LANES:
    return x[:, :n]
  return jnp.tile(x, (1, -(-n // NUM_LANES)))[:, :n]


@dataclasses.dataclass(frozen=True)
class _Kernel:
  """Static description shared by the three kernels.

  With `kv_rows` (the dK/dV kernel) compute tiles are [keys, queries]: the
  kernel forms k.q^T, so P^T and dS^T need no transpose in VMEM.
  """

  geo: _Geometry
  spec: tile_math.MaskSpec
  has_bias: bool
  steps: int  # N, steps of each walk
  list_heads: int  # H', heads of the walk's lists
  kv_rows: bool = False

  @property
  def has_segments(self) -> bool:
    return self.spec.has_segments

  @property
  def has_tiles(self) -> bool:
    return self.spec.has_tiles


def _unpack(refs, names):
  """Splits the flat ref list of a kernel call into a dict by name."""
  return dict(zip(names, refs, strict=True))


def _input_names(kern: _Kernel, *, backward: bool):
  names = ["q", "k", "v"]
  names += ["bias"] if kern.has_bias else []
  names += ["q_seg", "kv_seg"] if kern.has_segments else []
  names += ["tiles"] if kern.has_tiles else []
  names += ["causal_offset"] if kern.spec.causal else []
  names += ["do", "lse", "delta"] if backward else []
  return names


def _prefetch_names(kern: _Kernel):
  members = kern.kv_rows and kern.geo.group > 1
  return (["block", "code", "row", "edge"] + (["member"] if members else [])
          + (["tile_id"] if kern.has_tiles else []))


def _walk_slot(kern: _Kernel, b, h, n):
  """Flat index of step n of the walk read by (batch b, grid head h).

  Grid heads are q heads for the forward and dQ walks (their list head is
  the layout's), kv heads for the dK/dV walk (list heads 1 or Hkv).
  """
  geo = kern.geo
  if kern.kv_rows:
    lb = b if geo.layout_batch > 1 else 0
    lh = h if kern.list_heads > 1 else 0
  else:
    lb, lh = geo.layout_entry(b, h)
  return (lb * kern.list_heads + lh) * kern.steps + n


def _step_fields(kern: _Kernel, names: tuple[str, ...]):
  """Fields `names` of step n (`_Lists`) as int32s, read by
  (b, h, n, *refs) from one walk slot.

  Serves the index maps and the kernel bodies (with the prefetch refs).
  """

  def read(b, h, n, *refs):
    r = dict(zip(_prefetch_names(kern), refs))
    slot = _walk_slot(kern, b, h, n)
    return tuple(r[name][slot].astype(jnp.int32) for name in names)

  return read


def _step_field(kern: _Kernel, name: str):
  """Index-map form of `_step_fields` for one field."""
  read = _step_fields(kern, (name,))
  return lambda b, h, n, *refs: read(b, h, n, *refs)[0]


def _step(kern: _Kernel, refs, b, h, n):
  """(row, block, code, edge) of step n from the prefetch refs."""
  return _step_fields(kern, ("row", "block", "code", "edge"))(b, h, n, *refs)


def _key_slice(kern: _Kernel, ref, keys):
  """The `keys` of a per-key VMEM block: rows with kv_rows, else columns."""
  return ref[keys, :] if kern.kv_rows else ref[:, keys]


def _by_kv_rows(kern: _Kernel, q_side, kv_side):
  """(q_side, kv_side), swapped when tiles are [keys, queries]."""
  return (kv_side, q_side) if kern.kv_rows else (q_side, kv_side)


def _logits(kern: _Kernel, r, q, chunk: int, code, q_block, kv_block,
            masked: bool):
  """Raw products and masked logits of one compute tile.

  The tile is [block_q, block_kv_compute] (q.k^T), or [block_kv_compute,
  block_q] (k.q^T) with `kern.kv_rows`. `chunk` selects the compute
  sub-tile of the resident kv block; q is the [block_q, D] query block.
  """
  geo, spec = kern.geo, kern.spec
  n = geo.block_kv_compute
  keys = pl.ds(chunk * n, n)
  dot = lax.dot_general(*_by_kv_rows(kern, q, r["k"][keys, :]), _NT_DIMS,
                        preferred_element_type=jnp.float32)
  s = tile_math.logits(dot, spec, _key_slice(kern, r["bias"], keys)
                       if kern.has_bias else None)
  if not masked:
    return dot, s
  q_axis, kv_axis = _by_kv_rows(kern, 0, 1)
  q_pos = (q_block * geo.block_q
           + lax.broadcasted_iota(jnp.int32, dot.shape, q_axis))
  kv_pos = (kv_block * geo.block_kv + chunk * n
            + lax.broadcasted_iota(jnp.int32, dot.shape, kv_axis))
  q_seg = kv_seg = tile = None
  if kern.has_segments and kern.kv_rows:
    q_seg, kv_seg = r["q_seg"][...], r["kv_seg"][keys, :]
  elif kern.has_segments:
    q_seg, kv_seg = _lanes(r["q_seg"][...], n), r["kv_seg"][:1, keys]
  if kern.has_tiles:
    tile = (_key_slice(kern, r["tiles"], keys) != 0) | (code != _TILED)
  mask = tile_math.element_mask(
      q_pos, kv_pos, spec, full=code == layout_lib.FULL,
      causal_offset=_causal_offset(kern, r), q_seg=q_seg, kv_seg=kv_seg,
      tile=tile)
  return dot, tile_math.mask_logits(s, mask)


def _causal_offset(kern: _Kernel, r):
  return r["causal_offset"][0] if kern.spec.causal else None


def _run_steps(kern: _Kernel, r, code, q_block, kv_block, step):
  """Calls step(masked) for a listed slot; only cut tiles do mask work.

  Slots the causal diagonal hides are already skipped by the step lists.
  """
  geo = kern.geo
  listed = code != _SKIP
  causal_all = None
  if kern.spec.causal:
    _, causal_all = tile_math.causal_tile_test(
        q_block * geo.block_q, q_block * geo.block_q + geo.block_q - 1,
        kv_block * geo.block_kv, kv_block * geo.block_kv + geo.block_kv - 1,
        _causal_offset(kern, r))
  needs_mask = tile_math.needs_mask(
      kern.spec, is_partial=(code == layout_lib.PARTIAL) | (code == _TILED),
      is_last_kv_block=kv_block == geo.num_kv_blocks - 1,
      causal_all=causal_all)
  if isinstance(needs_mask, bool):
    pl.when(listed)(lambda: step(needs_mask))
    return
  pl.when(listed & needs_mask)(lambda: step(True))
  pl.when(listed & jnp.logical_not(needs_mask))(lambda: step(False))


def _flag(edge, bit):
  return (edge & bit) != 0


def _fwd_kernel(*refs, kern: _Kernel):
  prefetch = _prefetch_names(kern)
  names = (prefetch + _input_names(kern, backward=False)
           + ["out", "lse_out", "m", "l", "acc"])
  r = _unpack(refs, names)
  geo = kern.geo
  b, h, n = _grid_ids(geo.num_q_heads)
  i, kv_block, code, edge = _step(kern, refs[:len(prefetch)], b, h, n)

  @pl.when(_flag(edge, _FIRST_OF_ROW))
  def _init():
    r["m"][...] = jnp.full_like(r["m"], -jnp.inf)
    r["l"][...] = jnp.zeros_like(r["l"])
    r["acc"][...] = jnp.zeros_like(r["acc"])

  def step(masked):
    q = r["q"][...]
    for chunk in range(geo.block_kv // geo.block_kv_compute):
      _, s = _logits(kern, r, q, chunk, code, i, kv_block, masked)
      m_prev = r["m"][...]
      m, l, p, alpha = tile_math.online_softmax_update(
          m_prev[:, :1], r["l"][:, :1], s)
      r["m"][...] = jnp.broadcast_to(m, m_prev.shape)
      r["l"][...] = jnp.broadcast_to(l, m_prev.shape)
      v = r["v"][pl.ds(chunk * geo.block_kv_compute, geo.block_kv_compute),
                 :]
      r["acc"][...] = alpha * r["acc"][...] + jnp.dot(
          p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  _run_steps(kern, r, code, i, kv_block, step)

  @pl.when(_flag(edge, _LAST_OF_ROW))
  def _finish():
    out, lse = tile_math.online_softmax_finish(
        r["m"][:, :1], r["l"][:, :1], r["acc"][...])
    r["out"][...] = out.astype(r["out"].dtype)
    r["lse_out"][...] = lse


def _bwd_tile(kern: _Kernel, r, q, do, chunk, code, q_block, kv_block,
              masked):
  """Recomputed gradient pieces of one compute sub-tile."""
  n = kern.geo.block_kv_compute
  dot, s = _logits(kern, r, q, chunk, code, q_block, kv_block, masked)
  v = r["v"][pl.ds(chunk * n, n), :]
  dp = lax.dot_general(*_by_kv_rows(kern, do, v), _NT_DIMS,
                       preferred_element_type=jnp.float32)
  return tile_math.backward_tile(dot, s, r["lse"][...], dp, r["delta"][...],
                                 kern.spec)


def _dq_kernel(*refs, kern: _Kernel):
  prefetch = _prefetch_names(kern)
  names = prefetch + _input_names(kern, backward=True) + ["dq", "dq_acc"]
  r = _unpack(refs, names)
  geo = kern.geo
  b, h, n = _grid_ids(geo.num_q_heads)
  i, kv_block, code, edge = _step(kern, refs[:len(prefetch)], b, h, n)

  @pl.when(_flag(edge, _FIRST_OF_ROW))
  def _init():
    r["dq_acc"][...] = jnp.zeros_like(r["dq_acc"])

  def step(masked):
    q, do = r["q"][...], r["do"][...]
    n = geo.block_kv_compute
    for chunk in range(geo.block_kv // n):
      _, _, ddot = _bwd_tile(kern, r, q, do, chunk, code, i, kv_block, masked)
      k = r["k"][pl.ds(chunk * n, n), :]
      r["dq_acc"][...] += jnp.dot(ddot.astype(k.dtype), k,
                                  preferred_element_type=jnp.float32)

  _run_steps(kern, r, code, i, kv_block, step)

  @pl.when(_flag(edge, _LAST_OF_ROW))
  def _finish():
    r["dq"][...] = r["dq_acc"][...].astype(r["dq"].dtype)


def _dkv_kernel(*refs, kern: _Kernel):
  prefetch = _prefetch_names(kern)
  names = (prefetch + _input_names(kern, backward=True)
           + ["dk", "dv"] + (["dbias"] if kern.has_bias else [])
           + ["dk_acc", "dv_acc"] + (["dbias_acc"] if kern.has_bias else []))
  r = _unpack(refs, names)
  geo = kern.geo
  b, hk, n = _grid_ids(geo.num_kv_heads)
  kb, q_block, code, edge = _step(kern, refs[:len(prefetch)], b, hk, n)

  @pl.when(_flag(edge, _FIRST_OF_ROW))
  def _init():
    r["dk_acc"][...] = jnp.zeros_like(r["dk_acc"])
    r["dv_acc"][...] = jnp.zeros_like(r["dv_acc"])

  if kern.has_bias:
    # d bias_k is kept per q head: its block moves with the group member.
    @pl.when(_flag(edge, _FIRST_OF_RUN))
    def _init_bias():
      r["dbias_acc"][...] = jnp.zeros_like(r["dbias_acc"])

  def step(masked):
    q, do = r["q"][...], r["do"][...]
    n = geo.block_kv_compute
    for chunk in range(geo.block_kv // n):
      rows = pl.ds(chunk * n, n)
      p, ds, ddot = _bwd_tile(kern, r, q, do, chunk, code, q_block, kb,
                              masked)
      # p, ds and ddot are [keys, queries]: dV = P^T dO, dK = dS^T Q.
      r["dv_acc"][rows, :] += jnp.dot(p.astype(do.dtype), do,
                                      preferred_element_type=jnp.float32)
      r["dk_acc"][rows, :] += jnp.dot(ddot.astype(q.dtype), q,
                                      preferred_element_type=jnp.float32)
      if kern.has_bias:
        r["dbias_acc"][rows, :] += jnp.sum(ds, axis=1, keepdims=True)

  _run_steps(kern, r, code, q_block, kb, step)

  if kern.has_bias:
    @pl.when(_flag(edge, _LAST_OF_RUN))
    def _finish_bias():
      r["dbias"][...] = r["dbias_acc"][...]

  @pl.when(_flag(edge, _LAST_OF_ROW))
  def _finish():
    r["dk"][...] = r["dk_acc"][...].astype(r["dk"].dtype)
    r["dv"][...] = r["dv_acc"][...].astype(r["dv"].dtype)


# -- pallas_call wrappers ------------------------------------------------------


def _grid_ids(heads: int):
  """(batch, head, step) of the current step of a fused grid."""
  bh = pl.program_id(0)
  return lax.div(bh, heads), lax.rem(bh, heads), pl.program_id(1)


def _fuse_batch_heads(spec, heads: int):
  """Moves `spec` from the (b, h, step) to the (b * heads + h, step) grid."""
  if spec.index_map is None:
    return spec
  index_map = spec.index_map

  def fused(bh, n, *refs):
    return index_map(lax.div(bh, heads), lax.rem(bh, heads), n, *refs)

  return dataclasses.replace(spec, index_map=fused)


def _call(kernel, kern: _Kernel, *, grid, in_specs, out_specs, out_shape,
          scratch_shapes, cfg: config_lib.MosaicTpuConfig, interpret, name):
  """pallas_call with a TPU grid spec; interpret None picks by platform.

  The specs index a (batch, heads, steps) `grid`; the launch fuses batch
  and heads into the leading parallel axis, which megacore chips split over
  their two TensorCores (the batch alone is often 1). The steps axis walks
  rows one after the other, each output block resident over its row's
  steps, so it is "arbitrary".
  """
  batch, heads, steps = grid
  fuse = lambda specs: jax.tree.map(
      lambda spec: _fuse_batch_heads(spec, heads), specs,
      is_leaf=lambda x: isinstance(x, pl.BlockSpec))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(_prefetch_names(kern)),
      grid=(batch * heads, steps), in_specs=fuse(in_specs),
      out_specs=fuse(out_specs), scratch_shapes=scratch_shapes)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary"),
      vmem_limit_bytes=cfg.vmem_limit(_vmem_capacity()))

  def run(interpret_mode, *args):
    return pl.pallas_call(
        functools.partial(kernel, kern=kern), grid_spec=grid_spec,
        out_shape=out_shape, compiler_params=params,
        interpret=interpret_mode, name=name)(*args)

  if interpret is not None:
    return functools.partial(run, interpret)
  # Compiled Mosaic when lowering for TPU, the interpreter elsewhere.
  return lambda *args: lax.platform_dependent(
      *args, tpu=functools.partial(run, False),
      default=functools.partial(run, True))


def _vmem_capacity() -> int | None:
  """VMEM bytes per TensorCore of the target TPU; None off TPU.

  The target is the default device, or the abstract device of the current
  abstract mesh (`jax.sharding.use_abstract_mesh`) when exporting.
  """
  try:
    return pltpu.get_tpu_info().vmem_capacity_bytes
  except ValueError:
    return None


def _heads_operand(geo: _Geometry, x):
  """[B, T, H, D] in the kernels' layout (see `_Geometry.token_major`)."""
  if geo.token_major:
    return x.reshape(*x.shape[:2], -1)
  return x.transpose(0, 2, 1, 3)


def _heads_result(geo: _Geometry, y):
  """A kernel output in `_heads_operand`'s layout -> [B, T, H, D]."""
  if geo.token_major:
    return y.reshape(*y.shape[:2], -1, geo.head_dim)
  return y.transpose(0, 2, 1, 3)


def _heads_shape(geo: _Geometry, length: int, heads: int):
  """Shape of a [B, length, heads, D] kernel output in its layout."""
  if geo.token_major:
    return (geo.batch, length, heads * geo.head_dim)
  return (geo.batch, heads, length, geo.head_dim)


def _heads_spec(geo: _Geometry, rows: int, index):
  """BlockSpec of [rows, D] blocks of a per-head operand or output.

  index(*grid, *prefetch) -> (batch, head, block).
  """
  d = geo.head_dim
  if geo.token_major:
    def token_map(*ix):
      b, h, blk = index(*ix)
      return b, blk, h
    return pl.BlockSpec((None, rows, d), token_map)

  def head_map(*ix):
    b, h, blk = index(*ix)
    return b, h, blk, 0
  return pl.BlockSpec((None, None, rows, d), head_map)


def _operands(kern: _Kernel, q, k, v, bias, q_seg, kv_seg, tiles,
              causal_offset):
  """Kernel-side operand layouts and their names (see _input_names)."""
  geo = kern.geo
  ops = [_heads_operand(geo, x) for x in (q, k, v)]
  if kern.has_bias:
    bias = bias.astype(jnp.float32)
    ops.append(bias[..., None] if kern.kv_rows else bias[:, :, None, :])
  if kern.has_segments and kern.kv_rows:
    # q ids as per-block rows, kv ids as columns of [keys, queries] tiles.
    ops += [_q_block_rows(q_seg, geo.block_q), kv_seg[..., None]]
  elif kern.has_segments:
    # q ids lane-replicated, kv ids sublane-replicated (as splash).
    ops.append(jnp.broadcast_to(q_seg[:, :, None],
                                (*q_seg.shape, NUM_LANES)))
    ops.append(jnp.broadcast_to(kv_seg[:, None, :], (
        geo.batch, NUM_SUBLANES, kv_seg.shape[1])))
  if kern.has_tiles:
    # int8: a bool operand would cross the kernel boundary as int32.
    tiles = jnp.asarray(tiles, jnp.int8)
    ops.append(tiles.transpose(0, 2, 1) if kern.kv_rows else tiles)
  if kern.spec.causal:
    ops.append(jnp.reshape(causal_offset, (1,)))
  return ops


def _specs(kern: _Kernel, q_index, kv_index, tile_index, *, backward: bool):
  """BlockSpecs of the inputs given the per-step (b, h, block) callables.

  q_index(*grid, *prefetch) -> (b, q head, q block); kv_index -> (b, kv head,
  kv block); tile_index -> pool id.
  """
  geo = kern.geo
  specs = [_heads_spec(geo, geo.block_q, q_index),
           _heads_spec(geo, geo.block_kv, kv_index),
           _heads_spec(geo, geo.block_kv, kv_index)]
  if kern.has_bias:
    def bias_map(*ix):
      b, h, _ = q_index(*ix)
      _, _, blk = kv_index(*ix)
      return (*geo.bias_entry(b, h), *_by_kv_rows(kern, 0, blk))
    specs.append(pl.BlockSpec(
        (None, None, *_by_kv_rows(kern, 1, geo.block_kv)), bias_map))
  if kern.has_segments:
    specs += _segment_specs(kern, q_index, kv_index)
  if kern.has_tiles:
    specs.append(pl.BlockSpec(
        (None, *_by_kv_rows(kern, geo.block_q, geo.block_kv)),
        lambda *ix: (tile_index(*ix), 0, 0)))
  if kern.spec.causal:
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  if backward:
    specs.append(_heads_spec(geo, geo.block_q, q_index))
    specs += [_row_stat_spec(kern, q_index)] * 2
  return specs


def _q_block_rows(x, block_q: int):
  """[..., Tp] -> [..., Qb, 1, block_q]: one row per query block."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // block_q, 1, block_q)


def _row_stat(kern: _Kernel, x):
  """lse or delta [B, H, Tp] in the kernel's view (see `_row_stat_spec`)."""
  return _q_block_rows(x, kern.geo.block_q) if kern.kv_rows else x[..., None]


def _row_stat_spec(kern: _Kernel, q_index):
  """BlockSpec of lse or delta: a column, or a row with `kern.kv_rows`.

  Columns are [block_q, 1] blocks of [B, H, Tp, 1]; rows are [1, block_q]
  blocks of [B, H, Qb, 1, block_q] (`_q_block_rows`).
  """
  block_q = kern.geo.block_q
  if kern.kv_rows:
    return pl.BlockSpec((None, None, None, 1, block_q),
                        lambda *ix: (*q_index(*ix), 0, 0))
  return pl.BlockSpec((None, None, block_q, 1),
                      lambda *ix: (*q_index(*ix), 0))


def _segment_specs(kern: _Kernel, q_index, kv_index):
  """BlockSpecs of the q and kv segment ids (see `_operands`)."""
  geo = kern.geo

  def q_seg_map(*ix):
    b, _, blk = q_index(*ix)
    return (b, blk, 0, 0) if kern.kv_rows else (b, blk, 0)

  def kv_seg_map(*ix):
    b, _, blk = kv_index(*ix)
    return (b, blk, 0) if kern.kv_rows else (b, 0, blk)

  if kern.kv_rows:
    return [pl.BlockSpec((None, None, 1, geo.block_q), q_seg_map),
            pl.BlockSpec((None, geo.block_kv, 1), kv_seg_map)]
  return [pl.BlockSpec((None, geo.block_q, NUM_LANES), q_seg_map),
          pl.BlockSpec((None, NUM_SUBLANES, geo.block_kv), kv_seg_map)]


def _row_walk_maps(kern: _Kernel):
  """(q_index, kv_index, tile_index, out_map) of a forward / dQ walk."""
  geo = kern.geo
  row, block = _step_field(kern, "row"), _step_field(kern, "block")
  q_index = lambda b, h, n, *refs: (b, h, row(b, h, n, *refs))
  kv_index = lambda b, h, n, *refs: (b, geo.kv_head(h),
                                     block(b, h, n, *refs))
  out_map = lambda b, h, n, *refs: (b, h, row(b, h, n, *refs), 0)
  return q_index, kv_index, _step_field(kern, "tile_id"), out_map


def _forward_slice(q, k, v, bias, q_seg, kv_seg, lists: _Lists, tiles, spec,
                   block_kv_compute, cfg, interpret, layout_shape,
                   causal_offset):
  """One launch of the forward kernel; shapes as `forward`."""
  geo = _geometry_of(q, k, bias, layout_shape, block_kv_compute)
  kern = _Kernel(geo, spec, bias is not None, lists.steps, lists.heads)
  q_index, kv_index, tile, out_map = _row_walk_maps(kern)
  in_specs = _specs(kern, q_index, kv_index, tile, backward=False)
  grid = (geo.batch, geo.num_q_heads, lists.steps)
  tp = geo.num_q_blocks * geo.block_q
  out, lse = _call(
      _fwd_kernel, kern, grid=grid, in_specs=in_specs,
      out_specs=[
          _heads_spec(geo, geo.block_q, q_index),
          pl.BlockSpec((None, None, geo.block_q, 1), out_map)],
      out_shape=[
          jax.ShapeDtypeStruct(_heads_shape(geo, tp, geo.num_q_heads),
                               q.dtype),
          jax.ShapeDtypeStruct((geo.batch, geo.num_q_heads, tp, 1),
                               jnp.float32)],
      scratch_shapes=[pltpu.VMEM((geo.block_q, NUM_LANES), jnp.float32),
                      pltpu.VMEM((geo.block_q, NUM_LANES), jnp.float32),
                      pltpu.VMEM((geo.block_q, geo.head_dim), jnp.float32)],
      cfg=cfg, interpret=interpret, name="block_sparse_attention_fwd",
  )(*lists.arrays(), *_operands(kern, q, k, v, bias, q_seg, kv_seg, tiles,
                                causal_offset))
  return _heads_result(geo, out), lse[..., 0]


def _geometry_of(q, k, bias, layout_shape, block_kv_compute) -> _Geometry:
  bl, hl, block_q, block_kv, num_kv_blocks = layout_shape
  b, tp, hq, d = q.shape
  bb, bh = (0, 0) if bias is None else bias.shape[:2]
  return _Geometry(
      batch=b, num_q_heads=hq, num_kv_heads=k.shape[2], layout_batch=bl,
      layout_heads=hl, bias_batch=bb, bias_heads=bh, head_dim=d,
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv_compute,
      num_q_blocks=tp // block_q, num_kv_blocks=num_kv_blocks)


def _backward_slice(q, k, v, bias, q_seg, kv_seg, lists: _Lists,
                    lists_t: _Lists, tiles, spec, block_kv_compute, cfg,
                    interpret, layout_shape, causal_offset, out, lse, dout,
                    dlse):
  """dq, dk, dv and per-(batch, q head) d bias_k [B, Hq, Sp] of one slice."""
  geo = _geometry_of(q, k, bias, layout_shape, block_kv_compute)
  tp = geo.num_q_blocks * geo.block_q
  sp = geo.num_kv_blocks * geo.block_kv
  d = geo.head_dim
  # d lse_i / d s_ij = p_ij, so the lse cotangent enters as
  # dS = P * (dP - (delta - dlse)).
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)
  delta = delta.transpose(0, 2, 1) - dlse.astype(jnp.float32)
  dout_t = _heads_operand(geo, dout)
  has_bias = bias is not None

  def operands(kern):
    return (_operands(kern, q, k, v, bias, q_seg, kv_seg, tiles,
                      causal_offset)
            + [dout_t] + [_row_stat(kern, x) for x in (lse, delta)])

  # dQ over the forward walk.
  kern = _Kernel(geo, spec, has_bias, lists.steps, lists.heads)
  q_index, kv_index, tile, _ = _row_walk_maps(kern)
  dq = _call(
      _dq_kernel, kern, grid=(geo.batch, geo.num_q_heads, lists.steps),
      in_specs=_specs(kern, q_index, kv_index, tile, backward=True),
      out_specs=_heads_spec(geo, geo.block_q, q_index),
      out_shape=jax.ShapeDtypeStruct(_heads_shape(geo, tp, geo.num_q_heads),
                                     q.dtype),
      scratch_shapes=[pltpu.VMEM((geo.block_q, d), jnp.float32)],
      cfg=cfg, interpret=interpret, name="block_sparse_attention_dq",
  )(*lists.arrays(), *operands(kern))

  # dK/dV over the transposed walk: per kv head, each kv block's steps walk
  # the q heads of its group (members) one after the other.
  kern_t = _Kernel(geo, spec, has_bias, lists_t.steps, lists_t.heads,
                   kv_rows=True)
  row, block = _step_field(kern_t, "row"), _step_field(kern_t, "block")
  member = (_step_field(kern_t, "member") if geo.group > 1
            else lambda *ix: 0)
  q_head = lambda b, hk, n, *refs: hk * geo.group + member(b, hk, n, *refs)
  q_index_t = lambda *ix: (ix[0], q_head(*ix), block(*ix))
  kv_index_t = lambda *ix: (ix[0], ix[1], row(*ix))
  out_specs = [_heads_spec(geo, geo.block_kv, kv_index_t)] * 2
  out_shape = [jax.ShapeDtypeStruct(
      _heads_shape(geo, sp, geo.num_kv_heads), x.dtype) for x in (k, v)]
  scratch = [pltpu.VMEM((geo.block_kv, d), jnp.float32)] * 2
  if has_bias:
    dbias_map = lambda *ix: (ix[0], q_head(*ix), row(*ix), 0)
    out_specs.append(pl.BlockSpec((None, None, geo.block_kv, 1), dbias_map))
    out_shape.append(jax.ShapeDtypeStruct(
        (geo.batch, geo.num_q_heads, sp, 1), jnp.float32))
    scratch.append(pltpu.VMEM((geo.block_kv, 1), jnp.float32))
  grads = _call(
      _dkv_kernel, kern_t,
      grid=(geo.batch, geo.num_kv_heads, lists_t.steps),
      in_specs=_specs(kern_t, q_index_t, kv_index_t,
                      _step_field(kern_t, "tile_id"), backward=True),
      out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
      cfg=cfg, interpret=interpret, name="block_sparse_attention_dkv",
  )(*lists_t.arrays(), *operands(kern_t))
  dk, dv = (_heads_result(geo, g) for g in grads[:2])
  dbias = grads[2][..., 0] if has_bias else None
  return _heads_result(geo, dq), dk, dv, dbias


# -- SMEM budget: split the launch over batch / kv-head slices -----------------


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class _WalkSize:
  """Static size of one walk's step lists, for the SMEM budget."""

  batch: int  # Bl
  heads: int  # H'
  steps: int  # N
  num_blocks: int  # block ids addressed
  num_rows: int
  members: int


def _per_member(layout_heads: int, num_q_heads: int, group: int) -> bool:
  """Whether the dK/dV walk's members (q heads) have lists of their own."""
  return group > 1 and layout_heads == num_q_heads


def _walks(layout, num_q_heads: int, group: int, num_steps
           ) -> list[_WalkSize]:
  """Sizes of the forward / dQ walk and of the dK/dV walk of `layout`."""
  bl, hl, qb, kmax = layout.kv_idx.shape
  kb = layout.num_kv_blocks
  qmax = layout.kv_major_view().q_idx.shape[-1]
  per_member = _per_member(hl, num_q_heads, group)
  heads_t = hl // group if per_member else hl
  fwd, dkv = num_steps or (qb * kmax, kb * group * qmax)
  return [_WalkSize(bl, hl, fwd, kb, qb, 1),
          _WalkSize(bl, heads_t, dkv, qb, kb, group)]


def _plan_split(batch: int, num_kv_heads: int, walks, *, num_tiles,
                budget: int, what: str):
  """Fewest (batch chunks, kv-head chunks) whose step lists fit in SMEM.

  Args:
    batch: B.
    num_kv_heads: Hkv.
    walks: `_WalkSize`s of the walks one launch prefetches (the largest of
      them must fit).
    num_tiles: the tile pool size, or None.
    budget: SMEM bytes allowed for one launch's lists.
    what: name of the pass, for the error message.

  Returns:
    (nb, nh): split the batch into nb and the kv heads into nh chunks.

  Raises:
    ValueError: when even one (batch, kv head) slice does not fit.
  """
  bl, hl = walks[0].batch, walks[0].heads
  options = itertools.product(_divisors(batch) if bl > 1 else [1],
                              _divisors(num_kv_heads) if hl > 1 else [1])

  def need(nb, nh):
    return max(prefetch_bytes(
        max(w.batch // nb, 1) * max(w.heads // nh, 1) * w.steps,
        num_blocks=w.num_blocks, num_rows=w.num_rows, num_tiles=num_tiles,
        members=w.members) for w in walks)

  for nb, nh in sorted(options, key=lambda o: (o[0] * o[1], o[0])):
    if need(nb, nh) <= budget:
      return nb, nh
  smallest = need(batch if bl > 1 else 1, num_kv_heads if hl > 1 else 1)
  raise ValueError(
      f"mosaic_tpu {what}: the scalar-prefetched step lists of one "
      f"(batch, kv head) slice need {smallest} bytes of SMEM (walks of "
      f"{[w.steps for w in walks]} steps), over the budget of {budget} "
      "bytes (MosaicTpuConfig.smem_budget_bytes). Use larger layout blocks "
      "(fewer query/kv blocks), a smaller max_kv_blocks, or raise the "
      "budget on chips with more SMEM.")


def _chunk(x, axis, n: int, index):
  """Chunk `index` of n along `axis`; size-1 (broadcast) axes are kept."""
  if x is None or axis is None or n == 1 or x.shape[axis] == 1:
    return x
  size = x.shape[axis] // n
  return lax.dynamic_slice_in_dim(jnp.asarray(x), index * size, size, axis)


def _merge(y, batch_axis: int, head_axis: int, nb: int, nh: int):
  """[nb * nh, ...] stacked slice results -> one array (inverse of _chunk)."""
  if y is None:
    return None
  shape = y.shape[1:]
  y = y.reshape(nb, nh, *shape)
  perm = []
  for a in range(len(shape)):
    perm += [0] if a == batch_axis else []
    perm += [1] if a == head_axis else []
    perm.append(a + 2)
  merged = [s * (nb if a == batch_axis else 1) * (nh if a == head_axis else 1)
            for a, s in enumerate(shape)]
  return y.transpose(perm).reshape(merged)


def _map_slices(fn, split, args, out_axes):
  """Runs fn on each (batch, head) slice of args and merges its outputs.

  Args:
    fn: callable of the sliced args returning a tuple of arrays (or None).
    split: (nb, nh) from `_plan_split`.
    args: (array or None, batch axis or None, head axis or None) triples.
    out_axes: (batch axis, head axis) per output of fn.
  """
  nb, nh = split
  if nb * nh == 1:
    return fn(*(a for a, _, _ in args))

  def piece(index):
    ib, ih = index // nh, index % nh
    return fn(*(_chunk(_chunk(a, ba, nb, ib), ha, nh, ih)
                for a, ba, ha in args))

  outs = lax.map(piece, jnp.arange(nb * nh))
  return tuple(_merge(o, ba, ha, nb, nh) for o, (ba, ha) in zip(outs,
                                                                 out_axes))


def _layout_args(layout):
  """The layout's per-(batch, head) leaves as _map_slices args."""
  return [(layout.kv_idx, 0, 1), (layout.kv_cnt, 0, 1),
          (layout.kv_kind, 0, 1), (layout.tile_idx, 0, 1)]


def _num_tiles(layout):
  return None if layout.tiles is None else layout.tiles.shape[0]


def _layout_lists(layout, spec, causal_offset, idx, cnt, kind, tile_idx, *,
                  rows_are_q: bool, steps: int | None, group: int = 1,
                  per_member: bool = False) -> _Lists:
  """The walk of a forward (`rows_are_q`) or transposed list slice.

  The transposed walk visits the `group` q heads of each kv head per kv
  block; `per_member`: its lists are per q head (Hl = Hq).
  """
  hidden = None
  if spec.causal:
    hidden = tile_math.causal_hidden_blocks(
        jnp.asarray(idx), causal_offset, rows_are_q=rows_are_q,
        block_q=layout.block_q, block_kv=layout.block_kv)
  return _walk(
      idx, cnt, kind, tile_idx, num_tiles=_num_tiles(layout), hidden=hidden,
      num_blocks=layout.num_kv_blocks if rows_are_q else layout.num_q_blocks,
      steps=steps, group=group, per_member=per_member)


def host_layout_options(layout, num_q_heads: int, num_kv_heads: int
                        ) -> tuple[tuple[str, object], ...]:
  """Static options of a host layout: the exact lengths of its walks.

  Rows are walked as lists of their live slots (COO), so the grids of a
  causal or otherwise ragged layout are sized by its listed blocks, not by
  Qb x Kmax: (("num_steps", (forward / dQ steps, dK/dV steps)),).
  """
  group = num_q_heads // num_kv_heads
  layout_t = layout.kv_major_view()
  per_member = _per_member(layout.num_heads, num_q_heads, group)
  return (("num_steps", (
      walk_length(layout.kv_cnt, layout.max_kv_blocks),
      walk_length(layout_t.q_cnt, layout_t.q_idx.shape[-1], group,
                  per_member))),)


# -- public entry points (called by api.py) ------------------------------------


@_common.numpy_broadcasting
def forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, *,
            causal_offset=None, config=None, interpret=None, num_steps=None):
  """Forward pass on block-padded inputs.

  Args:
    q: [B, Tp, Hq, D] queries, Tp = Qb * block_q.
    k: [B, Sp, Hkv, D] keys, Sp = Kb * block_kv.
    v: [B, Sp, Hkv, D] values.
    bias_k: optional [B|1, Hq|Hkv|1, Sp] per-key logit bias.
    q_seg: optional int32 [B, Tp] query segment ids.
    kv_seg: optional int32 [B, Sp] key segment ids.
    layout: the `BlockLayout` ([Bl, Hl, Qb, Kmax] lists).
    spec: the op's `tile_math.MaskSpec`.
    causal_offset: int32 scalar of the causal predicate (when spec.causal).
    config: a `MosaicTpuConfig`; default `MosaicTpuConfig.get_default()`.
    interpret: None runs Mosaic on TPU and the interpreter elsewhere; True or
      a `pltpu.InterpretParams` forces interpret mode, False forces Mosaic.
    num_steps: optional static (forward, dK/dV) walk lengths of a host
      layout (`host_layout_options`); None walks Qb * Kmax (Kb * G * Qmax)
      steps, the most a traced layout can list.

  Returns:
    out [B, Tp, Hq, D] in q's dtype and lse f32 [B, Hq, Tp] (-inf for rows
    that see no key).

  Raises:
    ValueError: if block_kv_compute does not divide block_kv, or the block
      lists of one (batch, kv head) slice exceed the SMEM budget.
  """
  cfg = config or config_lib.MosaicTpuConfig.get_default()
  tile = _compute_tile(cfg, layout.block_kv, q.shape[-1])
  num_tiles = _num_tiles(layout)
  walks = _walks(layout, q.shape[2], q.shape[2] // k.shape[2], num_steps)
  split = _plan_split(q.shape[0], k.shape[2], walks[:1], num_tiles=num_tiles,
                      budget=cfg.smem_budget_bytes, what="forward")

  def run(q, k, v, bias, q_seg, kv_seg, idx, cnt, kind, tile_idx):
    lists = _layout_lists(layout, spec, causal_offset, idx, cnt, kind,
                          tile_idx, rows_are_q=True, steps=walks[0].steps)
    shape = (idx.shape[0], idx.shape[1], layout.block_q, layout.block_kv,
             layout.num_kv_blocks)
    return _forward_slice(q, k, v, bias, q_seg, kv_seg, lists, layout.tiles,
                          spec, tile, cfg, interpret, shape, causal_offset)

  args = [(q, 0, 2), (k, 0, 2), (v, 0, 2), (bias_k, 0, 1), (q_seg, 0, None),
          (kv_seg, 0, None), *_layout_args(layout)]
  return _map_slices(run, split, args, [(0, 2), (0, 1)])


@_common.numpy_broadcasting
def backward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, out, lse, dout,
             dlse, *, causal_offset=None, config=None, interpret=None,
             num_steps=None):
  """Gradients of `forward` with respect to q, k, v and bias_k.

  Args:
    q, k, v, bias_k, q_seg, kv_seg, layout, spec: as `forward`.
    out: [B, Tp, Hq, D] forward output.
    lse: f32 [B, Hq, Tp] forward log-sum-exp.
    dout: [B, Tp, Hq, D] output cotangent.
    dlse: f32 [B, Hq, Tp] cotangent of the log-sum-exp.
    causal_offset, config, interpret, num_steps: as `forward`.

  Returns:
    dq [B, Tp, Hq, D], dk and dv [B, Sp, Hkv, D], and d bias_k in bias_k's
    shape and dtype (None without a bias).
  """
  cfg = config or config_lib.MosaicTpuConfig.get_default()
  tile = _compute_tile(cfg, layout.block_kv, q.shape[-1])
  num_tiles = _num_tiles(layout)
  layout_t = layout.kv_major_view()
  group = q.shape[2] // k.shape[2]
  walks = _walks(layout, q.shape[2], group, num_steps)
  split = _plan_split(q.shape[0], k.shape[2], walks, num_tiles=num_tiles,
                      budget=cfg.smem_budget_bytes, what="backward")

  def run(q, k, v, bias, q_seg, kv_seg, out, lse, dout, dlse, idx, cnt, kind,
          tile_idx, idx_t, cnt_t, kind_t, tile_idx_t):
    lists = _layout_lists(layout, spec, causal_offset, idx, cnt, kind,
                          tile_idx, rows_are_q=True, steps=walks[0].steps)
    lists_t = _layout_lists(layout, spec, causal_offset, idx_t, cnt_t,
                            kind_t, tile_idx_t, rows_are_q=False,
                            steps=walks[1].steps, group=group,
                            per_member=_per_member(idx.shape[1], q.shape[2],
                                                   group))
    shape = (idx.shape[0], idx.shape[1], layout.block_q, layout.block_kv,
             layout.num_kv_blocks)
    return _backward_slice(q, k, v, bias, q_seg, kv_seg, lists, lists_t,
                           layout.tiles, spec, tile, cfg, interpret, shape,
                           causal_offset, out, lse, dout, dlse)

  args = [(q, 0, 2), (k, 0, 2), (v, 0, 2), (bias_k, 0, 1), (q_seg, 0, None),
          (kv_seg, 0, None), (out, 0, 2), (lse, 0, 1), (dout, 0, 2),
          (dlse, 0, 1),
          *_layout_args(layout), (layout_t.q_idx, 0, 1),
          (layout_t.q_cnt, 0, 1), (layout_t.q_kind, 0, 1),
          (layout_t.tile_idx, 0, 1)]
  dq, dk, dv, dbias = _map_slices(run, split, args,
                                  [(0, 2), (0, 2), (0, 2), (0, 1)])
  if bias_k is not None:
    dbias = _reduce_bias_grad(dbias, bias_k, q.shape[2] // k.shape[2])
  return dq, dk, dv, dbias


def _reduce_bias_grad(dbias, bias_k, group: int):
  """Per-(batch, q head) [B, Hq, Sp] -> bias_k's [B|1, Hq|Hkv|1, Sp]."""
  bb, hb, _ = bias_k.shape
  _, hq, sp = dbias.shape
  if bb == 1:
    dbias = dbias.sum(0, keepdims=True)
  if hb == 1:
    dbias = dbias.sum(1, keepdims=True)
  elif hb != hq:
    dbias = dbias.reshape(dbias.shape[0], hq // group, group, sp).sum(2)
  return dbias.astype(bias_k.dtype)
