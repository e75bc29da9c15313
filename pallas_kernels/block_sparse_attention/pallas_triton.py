"""Block-sparse attention as Pallas Triton (GPU) kernels: the forward pass.

Grid (query slabs, batch, q heads). Each program reads its layout row (kv
block ids, count, kinds) as ordinary inputs, since GPU lowering has no scalar
prefetch, and walks the row with a `fori_loop` bounded by the row's count,
slicing K/V chunks out of the whole-sequence K/V refs. With `causal`, a row
walks only the slots from its first to its last block the diagonal does not
hide (precomputed per row; ascending lists hide a suffix in the forward
lists, a prefix in the transposed ones). Tiles no predicate cuts (full
blocks the diagonal leaves whole, without segment ids) skip the element
mask. GQA reads kv head h // (Hq // Hkv) without repeating K/V. The dQ and
dK/dV kernels live in `pallas_triton_vjp`.

The kernels lower to Triton when compiled for CUDA or ROCm and run in Pallas
interpret mode on every other platform (CPU tests). The choice is made at
lowering time (`lax.platform_dependent`), so exporting for "cuda" from a CPU
host lowers to Triton.

Shape letters: B batch, T/S padded query/key lengths, N q heads, K kv heads,
D head dim, R rows of a program's slab, C keys of a walked chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import config as config_lib
from pallas_kernels.block_sparse_attention import tile_math

NAME = "triton"
# The backward kernels have no derivative of their own.
SECOND_ORDER = False


def unavailable_reason(platform: str, interpret: bool) -> str | None:
  if platform == "gpu" or interpret:
    return None
  return (f"the Triton backend needs a GPU, the platform is {platform!r} "
          "(pass interpret=True to run its kernels in Pallas interpret mode)")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes and head/batch maps shared by the three kernels."""

  num_q_heads: int
  num_kv_heads: int
  head_dim: int  # Padded to a power of two >= 16.
  block_q: int
  block_kv: int
  num_kv_blocks: int
  layout_batch: int
  layout_heads: int
  bias_batch: int  # 0 without bias_k.
  bias_heads: int

  @property
  def group(self) -> int:
    return self.num_q_heads // self.num_kv_heads

  def q_head_map(self, n: int, h):
    """Index into a head axis of size n in {1, K, N} for q head h."""
    if n == self.num_q_heads:
      return h
    return 0 if n == 1 else lax.div(h, self.group)

  def kv_head_block(self, n: int):
    """Heads per block of a size-n head axis in a kernel over kv heads."""
    return self.group if n == self.num_q_heads and self.group > 1 else 1


def geometry(q, k, layout, bias_k) -> Geometry:
  bias_batch, bias_heads = (0, 0) if bias_k is None else bias_k.shape[:2]
  return Geometry(q.shape[2], k.shape[2], q.shape[3], layout.block_q,
                  layout.block_kv, layout.num_kv_blocks, layout.batch_size,
                  layout.num_heads, bias_batch, bias_heads)


def check_supported(layout: layout_lib.BlockLayout) -> None:
  """Raises ValueError for layouts whose blocks Triton cannot tile."""
  for name in ("block_q", "block_kv"):
    value = getattr(layout, name)
    if value < 16 or value & (value - 1):
      raise ValueError(
          f"the triton backend needs layout.{name} to be a power of two "
          f">= 16, got {value}")


def padded_head_dim(d: int) -> int:
  """Smallest power of two >= max(d, 16): Triton's dot needs such tiles."""
  return max(16, 1 << (d - 1).bit_length())


def pad_head_dim(x, d: int):
  """Zero-pads the last axis to d; zeros change no dot product."""
  extra = d - x.shape[-1]
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


def device_kind() -> str | None:
  """The local GPU's kind (keys the tuned config table), else None."""
  if jax.default_backend() != "gpu":
    return None
  return jax.devices()[0].device_kind


def kernel_config(q) -> config_lib.TritonConfig:
  return config_lib.TritonConfig.heuristic(q.shape[-1], q.dtype,
                                           device_kind())


def dot(a, b, *, trans_a=False, trans_b=False):
  """f32-accumulated 2-D matmul with optional transposed operands."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def tile_logits(dot_qk, spec: tile_math.MaskSpec, geo: Geometry, *, kind,
                kv_block, q_pos, kv_pos, bias, causal_offset, causal_all,
                mask_operands):
  """Masked f32 logits of one [R, C] tile.

  Tiles that no predicate cuts take a branch with no mask work; the others
  (partial blocks, the ragged last kv block, tiles the causal diagonal cuts,
  every tile when segment ids are given) apply the element mask.

  Args:
    dot_qk: f32 [R, C] raw q.k products.
    spec: the static mask description.
    geo: kernel geometry.
    kind: int8 scalar PARTIAL or FULL.
    kv_block: int32 scalar kv block id of the tile.
    q_pos: int32 [R, 1] query positions.
    kv_pos: int32 [1, C] key positions.
    bias: f32 [1, C] key bias, or None.
    causal_offset: int32 scalar (when spec.causal).
    causal_all: bool scalar: the causal predicate holds on the whole tile.
    mask_operands: () -> (q_seg, kv_seg, tile) loading what the predicates
      read (None for those unused); called only off the fast path.
  """
  s = tile_math.logits(dot_qk, spec, bias)
  need = tile_math.needs_mask(
      spec, is_partial=kind != layout_lib.FULL,
      is_last_kv_block=kv_block == geo.num_kv_blocks - 1,
      causal_all=causal_all)

  def masked(s):
    q_seg, kv_seg, tile = mask_operands()
    mask = tile_math.element_mask(
        q_pos, kv_pos, spec, full=kind == layout_lib.FULL,
        causal_offset=causal_offset, q_seg=q_seg, kv_seg=kv_seg, tile=tile)
    return tile_math.mask_logits(s, mask)

  if isinstance(need, bool):
    return masked(s) if need else s
  return lax.cond(need, masked, lambda s: s, s)


def causal_all(spec: tile_math.MaskSpec, causal_offset, q_span, kv_span):
  """Whether the causal predicate holds on a whole tile (None: no causal).

  `q_span` and `kv_span` are the (first, last) positions of the tile. Tiles
  the diagonal hides entirely are walked only inside a row's live range (or
  for unsorted lists) and come out fully masked.
  """
  if not spec.causal:
    return None
  return tile_math.causal_tile_test(*q_span, *kv_span, causal_offset)[1]


@_common.numpy_broadcasting
def list_bounds(idx, cnt, spec: tile_math.MaskSpec, causal_offset, *,
                rows_are_q: bool, block_q: int, block_kv: int):
  """(start, end) int32 [..., R]: the list slots each row walks.

  [0, cnt) without causal; with it, from the row's first to its last slot
  the diagonal does not hide (start = end = 0 when it hides them all).
  """
  if not spec.causal:
    return None, cnt
  idx = jnp.asarray(idx)
  width = idx.shape[-1]
  live = jnp.arange(width) < jnp.asarray(cnt)[..., None]
  live = live & jnp.logical_not(tile_math.causal_hidden_blocks(
      idx, causal_offset, rows_are_q=rows_are_q, block_q=block_q,
      block_kv=block_kv))
  some = jnp.any(live, axis=-1)
  start = jnp.where(some, jnp.argmax(live, axis=-1), 0)
  end = jnp.where(some, width - jnp.argmax(live[..., ::-1], axis=-1), 0)
  return start.astype(jnp.int32), end.astype(jnp.int32)


def causal_offset_operand(causal_offset):
  """The causal offset as a one-element operand every program reads."""
  return (jnp.reshape(causal_offset, (1,)),
          pl.BlockSpec((1,), lambda *_: (0,)))


def load_tile(refs, slot, rows, cols):
  """bool tile-pool slice for list entry `slot`; no tile: all visible."""
  tile_id = refs.tile_idx[slot]
  tile = refs.tiles[jnp.maximum(tile_id, 0), rows, cols]
  return (tile != 0) | (tile_id < 0)


def call(kernel, operands, outputs, *, grid, num_warps, num_stages, name):
  """Runs `kernel` as a Triton pallas_call on GPU, interpreted elsewhere.

  Args:
    kernel: body taking one namespace of refs named as operands and outputs.
    operands: dict name -> (array, BlockSpec).
    outputs: dict name -> (ShapeDtypeStruct, BlockSpec).
    grid: the launch grid.
    num_warps: Triton warps per program.
    num_stages: Triton pipelining stages.
    name: kernel name (shows in profiles).

  Returns:
    The list of outputs, in the order of `outputs`.
  """
  names = (*operands, *outputs)

  def body(*refs):
    kernel(types.SimpleNamespace(**dict(zip(names, refs))))

  def run(interpret, *args):
    params = None if interpret else pltriton.CompilerParams(
        num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        body,
        grid=grid,
        in_specs=[s for _, s in operands.values()],
        out_specs=[s for _, s in outputs.values()],
        out_shape=[o for o, _ in outputs.values()],
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*args)

  triton = functools.partial(run, False)
  return lax.platform_dependent(
      *[x for x, _ in operands.values()], cuda=triton, rocm=triton,
      default=functools.partial(run, True))


def layout_operands(layout, row_map, spec, causal_offset):
  """The forward-orientation layout row a program reads, as operands.

  `row_map(i, b, h)` gives (layout batch, layout head, query block) of the
  program; used by the forward and dQ kernels. The row's walk bounds are
  "kv_start" (with causal) and "kv_end".
  """
  kmax = layout.max_kv_blocks
  row_spec = pl.BlockSpec((None, None, 1), lambda *g: row_map(*g))
  start, end = list_bounds(layout.kv_idx, layout.kv_cnt, spec, causal_offset,
                           rows_are_q=True, block_q=layout.block_q,
                           block_kv=layout.block_kv)
  ops = {
      "kv_idx": (layout.kv_idx,
                 pl.BlockSpec((None, None, None, kmax),
                              lambda *g: (*row_map(*g), 0))),
      "kv_end": (end, row_spec),
      "kv_kind": (layout.kv_kind,
                  pl.BlockSpec((None, None, None, kmax),
                               lambda *g: (*row_map(*g), 0))),
  }
  if start is not None:
    ops["kv_start"] = (start, row_spec)
  if layout.tiles is not None:
    ops["tile_idx"] = (layout.tile_idx,
                       pl.BlockSpec((None, None, None, kmax),
                                    lambda *g: (*row_map(*g), 0)))
    tiles = jnp.asarray(layout.tiles).astype(jnp.int8)
    ops["tiles"] = (tiles, pl.BlockSpec(tiles.shape, lambda *g: (0, 0, 0)))
  return ops


def q_major_operands(q, k, v, bias_k, q_seg, kv_seg, layout, spec,
                     geo: Geometry, rows: int, causal_offset):
  """Operands of a kernel over (query slabs, batch, q heads).

  Per program: its R query rows, the whole K/V of its kv head, the key bias
  and segment rows, its layout row and the causal offset.
  """
  sub = geo.block_q // rows
  seq_kv = k.shape[1]
  d = geo.head_dim

  def row_map(i, b, h):
    return (b if geo.layout_batch > 1 else 0,
            geo.q_head_map(geo.layout_heads, h), lax.div(i, sub))

  ops = layout_operands(layout, row_map, spec, causal_offset)
  ops["q"] = (q, pl.BlockSpec((None, rows, None, d),
                              lambda i, b, h: (b, i, h, 0)))
  kv_spec = pl.BlockSpec((None, seq_kv, None, d),
                         lambda i, b, h: (b, 0, lax.div(h, geo.group), 0))
  ops["k"] = (k, kv_spec)
  ops["v"] = (v, kv_spec)
  if bias_k is not None:
    ops["bias"] = (bias_k, pl.BlockSpec(
        (None, None, seq_kv),
        lambda i, b, h: (b if geo.bias_batch > 1 else 0,
                         geo.q_head_map(geo.bias_heads, h), 0)))
  if q_seg is not None:
    ops["q_seg"] = (q_seg, pl.BlockSpec((None, rows), lambda i, b, h: (b, i)))
    ops["kv_seg"] = (kv_seg, pl.BlockSpec((None, seq_kv),
                                          lambda i, b, h: (b, 0)))
  if causal_offset is not None:
    ops["causal_offset"] = causal_offset_operand(causal_offset)
  return ops


def walk(start, end, chunks: int, body, init):
  """fori_loop over (list slot, chunk) pairs of slots [start, end).

  Calls body(slot, chunk, carry); `start` None means 0.
  """
  start = 0 if start is None else start
  if chunks == 1:
    return lax.fori_loop(start, end, lambda j, c: body(j, 0, c), init)

  def flat_body(t, carry):
    return body(lax.div(t, chunks), lax.rem(t, chunks), carry)

  return lax.fori_loop(start * chunks, end * chunks, flat_body, init)


def walk_bounds(r, name: str, index=()):
  """(start, end) scalars of a program's list walk from its `name` refs."""
  start = getattr(r, name + "_start", None)
  return (None if start is None else start[(*index, 0)],
          getattr(r, name + "_end")[(*index, 0)])


def _fwd_kernel(r, *, spec: tile_math.MaskSpec, geo: Geometry, rows: int,
                chunk: int):
  i = pl.program_id(0)
  row_off = lax.rem(i, geo.block_q // rows) * rows
  q = r.q[...]
  q_pos = i * rows + jnp.arange(rows, dtype=jnp.int32)[:, None]
  q_seg = r.q_seg[...][:, None] if spec.has_segments else None
  offset = r.causal_offset[0] if spec.causal else None

  def step(j, c, carry):
    m, l, acc = carry
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
        tile = load_tile(r, j, pl.ds(row_off, rows), pl.ds(c * chunk, chunk))
      return q_seg, kv_seg, tile

    s = tile_logits(
        dot(q, k, trans_b=True), spec, geo, kind=r.kv_kind[j],
        kv_block=kv_block, q_pos=q_pos,
        kv_pos=start + jnp.arange(chunk, dtype=jnp.int32)[None, :],
        bias=bias, causal_offset=offset,
        causal_all=causal_all(spec, offset, (i * rows, i * rows + rows - 1),
                              (start, start + chunk - 1)),
        mask_operands=mask_operands)
    m, l, p, alpha = tile_math.online_softmax_update(m, l, s)
    acc = alpha * acc + dot(p.astype(v.dtype), v)
    return m, l, acc

  init = (jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, geo.head_dim), jnp.float32))
  m, l, acc = walk(*walk_bounds(r, "kv"), geo.block_kv // chunk, step, init)
  out, lse = tile_math.online_softmax_finish(m, l, acc)
  r.out[...] = out.astype(r.out.dtype)
  r.lse[...] = lse[:, 0]


def prepare(q, k, v, layout):
  """Checks the layout and pads the head dim; returns (q, k, v, D)."""
  check_supported(layout)
  d = q.shape[-1]
  dp = padded_head_dim(d)
  return pad_head_dim(q, dp), pad_head_dim(k, dp), pad_head_dim(v, dp), d


@_common.numpy_broadcasting
def forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, *,
            causal_offset=None, config=None):
  """Forward pass on block-padded inputs.

  Args:
    q: [B, T, N, D] queries, T a multiple of layout.block_q.
    k: [B, S, K, D] keys, S a multiple of layout.block_kv.
    v: [B, S, K, D] values.
    bias_k: optional [B|1, N|K|1, S] key bias.
    q_seg: optional int32 [B, T] segment ids (with kv_seg).
    kv_seg: optional int32 [B, S].
    layout: the BlockLayout (blocks must be powers of two >= 16).
    spec: the static MaskSpec.
    causal_offset: int32 scalar of the causal predicate (when spec.causal).
    config: optional TritonConfig; default: the tuned table or heuristic of
      the head dim and dtype (`config.TritonConfig.heuristic`).

  Returns:
    out [B, T, N, D] in q's dtype and lse f32 [B, N, T] (-inf for rows that
    see no key).

  Raises:
    ValueError: when the layout's block sizes are not powers of two >= 16.
  """
  cfg = config or kernel_config(q)
  q, k, v, d = prepare(q, k, v, layout)
  geo = geometry(q, k, layout, bias_k)
  rows = min(cfg.block_q, geo.block_q)
  chunk = min(cfg.block_kv, geo.block_kv)
  b, t, hq, dp = q.shape
  ops = q_major_operands(q, k, v, bias_k, q_seg, kv_seg, layout, spec, geo,
                         rows, causal_offset)
  outputs = {
      "out": (jax.ShapeDtypeStruct(q.shape, q.dtype),
              pl.BlockSpec((None, rows, None, dp),
                           lambda i, b, h: (b, i, h, 0))),
      "lse": (jax.ShapeDtypeStruct((b, hq, t), jnp.float32),
              pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i))),
  }
  kernel = functools.partial(_fwd_kernel, spec=spec, geo=geo, rows=rows,
                             chunk=chunk)
  out, lse = call(kernel, ops, outputs, grid=(t // rows, b, hq),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  name="block_sparse_attention_fwd")
  return out[..., :d], lse


@_common.numpy_broadcasting
def backward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, out, lse, dout,
             dlse, *, causal_offset=None, config=None):
  """Gradients (dq, dk, dv, dbias_k or None) of `forward`."""
  # The VJP module builds on this one's helpers, hence the late import.
  # pylint: disable-next=g-import-not-at-top
  from pallas_kernels.block_sparse_attention import pallas_triton_vjp
  return pallas_triton_vjp.backward(q, k, v, bias_k, q_seg, kv_seg, layout,
                                    spec, out, lse, dout, dlse,
                                    causal_offset=causal_offset,
                                    config=config)
