"""Block-sparse attention as Pallas Triton (GPU) kernels: the forward pass.

Grid (query slabs, batch, q heads). Each program reads its layout row (kv
block ids, kinds, counts) as ordinary inputs, since GPU lowering has no
scalar prefetch, and slices K/V chunks out of the whole-sequence K/V refs.
The rows are reordered outside the kernel (`schedule.masked_first`): blocks
that need an element mask (partial blocks, the ragged last kv block, blocks
the causal diagonal cuts, every block with segment ids) first, then the
others, and blocks wholly above the diagonal dropped. A program runs two
`fori_loop`s, a masked and an unmasked one, so no loop branches per block;
each iteration carries the next block id so the next K/V tiles' addresses
are known a step early (the software pipeliner can prefetch them). A layout
block wider than the chunk is walked chunk by chunk inside the iteration
(unrolled), with no div/rem and one id load per block. GQA reads kv head
h // (Hq // Hkv) without repeating K/V. The dQ and dK/dV kernels live in
`pallas_triton_vjp`.

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
from pallas_kernels.block_sparse_attention import schedule
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


def tile_logits(dot_qk, spec: tile_math.MaskSpec, bias, mask_inputs=None):
  """Base-2 f32 logits of one [R, C] tile, masked in the masked loop.

  Args:
    dot_qk: f32 [R, C] raw q.k products.
    spec: the static mask description.
    bias: f32 [1, C] key bias, or None.
    mask_inputs: None in the unmasked loop; in the masked one, () -> the
      keyword arguments of `tile_math.element_mask` (positions, kind,
      segments, tile), loaded only there.
  """
  s = tile_math.logits(dot_qk, spec, bias)
  if mask_inputs is None:
    return s
  return tile_math.mask_logits(
      s, tile_math.element_mask(spec=spec, **mask_inputs()))


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


def scheduled_lists(name: str, idx, cnt, kind, tile_idx, spec, causal_offset,
                    *, rows_are_q: bool, geo: Geometry):
  """The `masked_first` lists a kernel walks, by operand name.

  Returns {name_idx, name_kind, name_cnt (masked, total), tile_idx (with a
  tile pool)} arrays [..., R, W] ([..., R, 2] for the counts).
  """
  order, counts = schedule.masked_first(
      idx, cnt, kind, spec, causal_offset, rows_are_q=rows_are_q,
      block_q=geo.block_q, block_kv=geo.block_kv,
      num_kv_blocks=geo.num_kv_blocks)
  idx, kind, tile_idx = schedule.reorder(order, idx, kind, tile_idx)
  lists = {f"{name}_idx": idx.astype(jnp.int32), f"{name}_kind": kind,
           f"{name}_cnt": counts}
  if tile_idx is not None:
    lists["tile_idx"] = tile_idx
  return lists


def tile_pool_operand(layout):
  """The layout's int8 tile pool, whole, for every program."""
  tiles = jnp.asarray(layout.tiles).astype(jnp.int8)
  return tiles, pl.BlockSpec(tiles.shape, lambda *_: (0, 0, 0))


def layout_operands(layout, row_map, spec, causal_offset, geo: Geometry):
  """The forward-orientation layout row a program reads, as operands.

  `row_map(i, b, h)` gives (layout batch, layout head, query block) of the
  program; used by the forward and dQ kernels.
  """
  lists = scheduled_lists(
      "kv", layout.kv_idx, layout.kv_cnt, layout.kv_kind,
      None if layout.tiles is None else layout.tile_idx, spec, causal_offset,
      rows_are_q=True, geo=geo)
  ops = {name: (x, pl.BlockSpec((None, None, None, x.shape[-1]),
                                lambda *g: (*row_map(*g), 0)))
         for name, x in lists.items()}
  if layout.tiles is not None:
    ops["tiles"] = tile_pool_operand(layout)
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

  ops = layout_operands(layout, row_map, spec, causal_offset, geo)
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


def walk(r, name: str, spec: tile_math.MaskSpec, chunks: int, body, init,
         index=()):
  """The masked, then the unmasked loop over a program's scheduled list.

  Calls body(slot, block, chunk, carry, masked=...) for each chunk of each
  walked slot. `block` is the slot's listed block id, loaded one iteration
  ahead and carried. The list and counts are refs `name_idx`, `name_cnt`,
  read at `index` (the list of a GQA head in the dK/dV kernel).
  """
  idx = getattr(r, name + "_idx")
  cnt = getattr(r, name + "_cnt")
  width = idx.shape[-1]

  def block_id(j):
    return idx[(*index, jnp.minimum(j, width - 1))]

  def run(lo, hi, masked, carry):
    def slot(j, state):
      block, carry = state
      for c in range(chunks):  # Unrolled: one loop for the pipeliner.
        carry = body(j, block, c, carry, masked=masked)
      return block_id(j + 1), carry

    return lax.fori_loop(lo, hi, slot, (block_id(lo), carry))[1]

  has_masked, has_unmasked = schedule.loops(spec)
  n_masked, n_total = cnt[(*index, 0)], cnt[(*index, 1)]
  carry = init
  if has_masked:
    carry = run(0, n_masked, True, carry)
  if has_unmasked:
    carry = run(n_masked, n_total, False, carry)
  return carry


def _fwd_kernel(r, *, spec: tile_math.MaskSpec, geo: Geometry, rows: int,
                chunk: int):
  i = pl.program_id(0)
  row_off = lax.rem(i, geo.block_q // rows) * rows
  q = r.q[...]
  q_pos = i * rows + jnp.arange(rows, dtype=jnp.int32)[:, None]
  q_seg = r.q_seg[...][:, None] if spec.has_segments else None
  offset = r.causal_offset[0] if spec.causal else None

  def step(j, block, c, carry, *, masked):
    m, l, acc = carry
    start = pl.multiple_of(block * geo.block_kv + c * chunk, chunk)
    keys = pl.ds(start, chunk)
    k = r.k[keys, :]
    v = r.v[keys, :]
    bias = r.bias[keys][None, :] if geo.bias_heads else None
    mask_inputs = None
    if masked:
      mask_inputs = functools.partial(
          q_major_mask_inputs, r, spec, j, keys, q_pos=q_pos, q_seg=q_seg,
          causal_offset=offset, tile_rows=pl.ds(row_off, rows),
          tile_cols=pl.ds(c * chunk, chunk))
    s = tile_logits(dot(q, k, trans_b=True), spec, bias, mask_inputs)
    m, l, p, alpha = tile_math.online_softmax_update(m, l, s)
    acc = alpha * acc + dot(p.astype(v.dtype), v)
    return m, l, acc

  init = (jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, geo.head_dim), jnp.float32))
  m, l, acc = walk(r, "kv", spec, geo.block_kv // chunk, step, init)
  out, lse = tile_math.online_softmax_finish(m, l, acc)
  r.out[...] = out.astype(r.out.dtype)
  r.lse[...] = lse[:, 0]


def q_major_mask_inputs(r, spec: tile_math.MaskSpec, slot, keys, *, q_pos,
                        q_seg, causal_offset, tile_rows, tile_cols):
  """`element_mask` inputs of a forward-list tile (forward and dQ kernels).

  `keys` is the tile's key slice; `tile_rows`/`tile_cols` its slice of the
  layout block (for the tile pool).
  """
  return dict(
      q_pos=q_pos,
      kv_pos=keys.start + jnp.arange(keys.size, dtype=jnp.int32)[None, :],
      full=r.kv_kind[slot] == layout_lib.FULL, causal_offset=causal_offset,
      q_seg=q_seg,
      kv_seg=r.kv_seg[keys][None, :] if spec.has_segments else None,
      tile=(load_tile(r, slot, tile_rows, tile_cols) if spec.has_tiles
            else None))


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
