"""Forward of block_sparse_attention on Pallas Mosaic GPU (sm90), UNVERIFIED.

No GPU has run this kernel: it is only lowered (`jax.export` for an
abstract H100) in the tests, so it is not in the default backend order.

One CTA per (query block, q head, batch) runs three warpgroups. A producer
warpgroup streams the K/V blocks listed for the query block with TMA into a
ring of SMEM slots; two consumer warpgroups each own half the query rows,
compute Q.K^T and P.V with wgmma into f32 accumulators and run a base-2
online softmax (the logit scale and log2(e) folded into one multiply).

Block lists are rescheduled outside the kernel (`schedule`): blocks that need
an element mask (PARTIAL blocks of a layout with a band, the last block of a
ragged kv, blocks cut by the op's causal diagonal) come first, blocks that
need none after, and blocks wholly above the causal diagonal are dropped.
The consumers run one masked and one unmasked loop over them.

Limits: bf16/f16 inputs, head dim 64 or 128, block_q 128, block_kv 64 or
128; no bias_k, segment ids, tile pools or softcap.
The backward raises NotImplementedError.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import schedule as schedule_lib
from pallas_kernels.block_sparse_attention import tile_math

NAME = "mosaic_gpu"
SECOND_ORDER = False

_CONSUMERS = 2
_WGMMA_ROWS = 64
_LOG2E = math.log2(math.e)


def unavailable_reason(platform: str, interpret: bool) -> str | None:
  del interpret  # wgmma pipelines cannot run in the Mosaic GPU interpreter.
  if platform == "gpu":
    return None
  return (f"the Mosaic GPU backend needs an sm90 (Hopper) GPU, the platform "
          f"is {platform!r}; it is unverified (only lowered, never run) and "
          "cannot be interpreted on CPU")


@dataclasses.dataclass(frozen=True)
class MosaicGpuConfig:
  """Launch parameters of the Mosaic GPU forward.

  Attributes:
    num_stages: K/V blocks in flight (SMEM ring slots), >= 2.
  """

  num_stages: int = 2

  def __post_init__(self):
    if self.num_stages < 2:
      raise ValueError(
          f"MosaicGpuConfig.num_stages must be >= 2, got {self.num_stages}")


def check_supported(q, layout: layout_lib.BlockLayout, spec, bias_k,
                    q_seg) -> None:
  """Raises NotImplementedError for what this forward does not cover."""
  d = q.shape[-1]
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)):
    raise NotImplementedError(
        f"mosaic_gpu needs bfloat16 or float16 q, k, v, got {q.dtype}")
  if d not in (64, 128):
    raise NotImplementedError(f"mosaic_gpu needs head dim 64 or 128, got {d}")
  # One wgmma row group per consumer; the f32 logits tile of a consumer is
  # 64 x block_kv, which bounds block_kv by the register file.
  if layout.block_q != _CONSUMERS * _WGMMA_ROWS:
    raise NotImplementedError(
        f"mosaic_gpu needs layout.block_q == {_CONSUMERS * _WGMMA_ROWS}, got "
        f"{layout.block_q}")
  if layout.block_kv not in (64, 128):
    raise NotImplementedError(
        f"mosaic_gpu needs layout.block_kv 64 or 128, got {layout.block_kv}")
  unsupported = [name for name, present in (
      ("bias_k", bias_k is not None), ("segment ids", q_seg is not None),
      ("a tile pool", spec.has_tiles), ("softcap", spec.softcap is not None))
                 if present]
  if unsupported:
    raise NotImplementedError(
        f"mosaic_gpu does not support {', '.join(unsupported)} yet; use "
        "implementation='triton'")


@_common.numpy_broadcasting
def schedule(layout: layout_lib.BlockLayout, spec: tile_math.MaskSpec,
             causal_offset):
  """Reorders each row's block list: masked blocks, then unmasked ones.

  Args:
    layout: the BlockLayout, lists [Bl, Hl, Qb, W].
    spec: the static MaskSpec; which blocks need an element mask.
    causal_offset: int32 scalar (when spec.causal); blocks wholly above the
      diagonal are dropped.

  Returns:
    codes: int32 [Bl, Hl, Qb, W]: kv block id * 2 + (1 if PARTIAL).
    counts: int32 [Bl, Hl, Qb, 2]: (masked, total) kept entries per row.
  """
  order, counts = schedule_lib.masked_first(
      layout.kv_idx, layout.kv_cnt, layout.kv_kind, spec, causal_offset,
      rows_are_q=True, block_q=layout.block_q, block_kv=layout.block_kv,
      num_kv_blocks=layout.num_kv_blocks)
  idx, kind = schedule_lib.reorder(order, layout.kv_idx, layout.kv_kind)
  return idx * 2 + (kind == layout_lib.PARTIAL), counts


def _head_index(h, n: int, num_q_heads: int, group: int):
  """Index into a head dim of size n in {1, Hkv, Hq} for q head h."""
  if n == 1:
    return 0
  return h if n == num_q_heads else lax.div(h, jnp.int32(group))


def _consumer(refs, scratch, *, spec, geo, causal_offset_ref):
  """One consumer warpgroup: its half of the query rows, both loops."""
  q_ref, out_ref, lse_ref, codes_ref, counts_ref = refs
  q_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free = (
      scratch)
  b, h, qi, lb, lh, wg = geo["ids"]
  rows, block_kv, stages, dtype = (geo["rows"], geo["block_kv"],
                                   geo["stages"], geo["dtype"])
  q_smem, lse_smem = q_smem.at[wg], lse_smem.at[wg]
  q_base = qi * geo["block_q"] + wg * rows
  plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, rows), h], q_smem,
                          q_bar.at[wg])
  plgpu.barrier_wait(q_bar.at[wg])
  n_masked = counts_ref[lb, lh, qi, 0]
  n_total = counts_ref[lb, lh, qi, 1]
  offset = causal_offset_ref[0] if spec.causal else None
  # The logit scale and log2(e) in one multiply: softmax in base 2.
  scale2 = spec.sm_scale * _LOG2E

  def step(j, carry, *, masked: bool):
    acc, m, l = carry
    slot = lax.rem(j, jnp.int32(stages))
    plgpu.barrier_wait(k_bar.at[slot])

    def qk_scope(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
      return acc_ref[...]

    s = pl.run_scoped(qk_scope, plgpu.ACC((rows, block_kv), jnp.float32))
    plgpu.barrier_arrive(k_free.at[slot])
    s = s * scale2
    if masked:
      code = codes_ref[lb, lh, qi, j]
      kv_first = lax.div(code, jnp.int32(2)) * block_kv
      full = lax.rem(code, jnp.int32(2)) == 0
      q_pos = q_base + plgpu.broadcasted_iota(
          jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
      kv_pos = kv_first + plgpu.broadcasted_iota(
          jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
      mask = tile_math.element_mask(q_pos, kv_pos, spec, full=full,
                                    causal_offset=offset)
      if mask is not None:  # None: the spec masks nothing (no masked loop).
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row with nothing visible yet keeps m = -inf; shift it by 0.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m - shift)
    p = jnp.exp2(s - lax.broadcast_in_dim(shift, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    plgpu.barrier_wait(v_bar.at[slot])

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc, m_new, l

  d = geo["head_dim"]
  init = (
      plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32),
                        plgpu.Layout.WGMMA),
      plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32),
                        plgpu.Layout.WGMMA.reduce(1)),
      plgpu.layout_cast(jnp.zeros((rows,), jnp.float32),
                        plgpu.Layout.WGMMA.reduce(1)),
  )
  carry = lax.fori_loop(0, n_masked, functools.partial(step, masked=True),
                        init)
  acc, m, l = lax.fori_loop(n_masked, n_total,
                            functools.partial(step, masked=False), carry)
  # Rows that saw no key: out 0 (acc is 0) and lse -inf (m = -inf).
  l_safe = jnp.where(l == 0.0, 1.0, l)
  acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
  q_smem[...] = acc.astype(dtype)
  lse_smem[...] = (m + jnp.log2(l)) * (1.0 / _LOG2E)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q_base, rows), h])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_base, rows)])
  plgpu.wait_smem_to_gmem(0)


def _producer(refs, scratch, *, geo):
  """The producer warpgroup: TMA of the listed K/V blocks into the ring."""
  k_ref, v_ref, codes_ref, counts_ref = refs
  _, k_smem, v_smem, _, _, k_bar, v_bar, k_free, v_free = scratch
  b, h, qi, lb, lh, _ = geo["ids"]
  block_kv, stages = geo["block_kv"], geo["stages"]
  kv_head = lax.div(h, jnp.int32(geo["group"]))

  @pl.loop(0, counts_ref[lb, lh, qi, 1])
  def _(j):
    slot = lax.rem(j, jnp.int32(stages))
    start = lax.div(codes_ref[lb, lh, qi, j], jnp.int32(2)) * block_kv
    src = (b, pl.ds(start, block_kv), kv_head)

    @pl.when(j >= stages)
    def _():
      plgpu.barrier_wait(k_free.at[slot])

    plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])

    @pl.when(j >= stages)
    def _():
      plgpu.barrier_wait(v_free.at[slot])

    plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])


def _kernel(q_ref, k_ref, v_ref, codes_ref, counts_ref, offset_ref, out_ref,
            lse_ref, *, spec, geo):
  h, qi, b = (lax.axis_index(n) for n in ("heads", "q_block", "batch"))
  lb = 0 if geo["layout_batch"] == 1 else b
  lh = _head_index(h, geo["layout_heads"], geo["num_q_heads"], geo["group"])
  wg = lax.axis_index("wg")
  geo = dict(geo, ids=(b, h, qi, lb, lh, wg))
  rows, block_kv, d, stages = (geo["rows"], geo["block_kv"], geo["head_dim"],
                               geo["stages"])
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  smem = (
      plgpu.SMEM((_CONSUMERS, rows, d), geo["dtype"], transforms=swizzled),
      plgpu.SMEM((stages, block_kv, d), geo["dtype"], transforms=swizzled),
      plgpu.SMEM((stages, block_kv, d), geo["dtype"], transforms=swizzled),
      plgpu.SMEM((_CONSUMERS, rows), jnp.float32),
  )
  barriers = (
      plgpu.Barrier(num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
  )

  def body(*scratch):
    @pl.when(wg < _CONSUMERS)
    def _():
      plgpu.set_max_registers(232, action="increase")
      _consumer((q_ref, out_ref, lse_ref, codes_ref, counts_ref), scratch,
                spec=spec, geo=geo, causal_offset_ref=offset_ref)

    @pl.when(wg == _CONSUMERS)
    def _():
      plgpu.set_max_registers(40, action="decrease")
      _producer((k_ref, v_ref, codes_ref, counts_ref), scratch, geo=geo)

  pl.run_scoped(body, *smem, *barriers, collective_axes="wg")


@_common.numpy_broadcasting
def forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, *,
            causal_offset=None, config=None):
  """Forward pass on block-padded inputs (UNVERIFIED on hardware).

  Args:
    q: [B, T, N, D] bf16/f16 queries, T a multiple of layout.block_q.
    k: [B, S, K, D] keys, S a multiple of layout.block_kv.
    v: [B, S, K, D] values.
    bias_k: must be None.
    q_seg: must be None.
    kv_seg: must be None.
    layout: the BlockLayout (block_q 128, block_kv 64 or 128).
    spec: the static MaskSpec (no tiles, no softcap).
    causal_offset: int32 scalar of the causal predicate (when spec.causal).
    config: optional MosaicGpuConfig.

  Returns:
    out [B, T, N, D] in q's dtype and lse f32 [B, N, T] (-inf for rows that
    see no key).

  Raises:
    NotImplementedError: for inputs outside the limits above.
  """
  del kv_seg  # Given with q_seg, which check_supported rejects.
  check_supported(q, layout, spec, bias_k, q_seg)
  cfg = config or MosaicGpuConfig()
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  codes, counts = schedule(layout, spec, causal_offset)
  offset = jnp.reshape(
      jnp.asarray(0 if causal_offset is None else causal_offset, jnp.int32),
      (1,))
  geo = dict(rows=layout.block_q // _CONSUMERS, block_q=layout.block_q,
             block_kv=layout.block_kv, head_dim=d, dtype=q.dtype,
             stages=cfg.num_stages, group=hq // hkv, num_q_heads=hq,
             layout_batch=codes.shape[0], layout_heads=codes.shape[1])
  kernel = functools.partial(_kernel, spec=spec, geo=geo)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
      grid=(hq, t // layout.block_q, b),
      grid_names=("heads", "q_block", "batch"),
      num_threads=_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, codes, counts, offset)


def backward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, out, lse, dout,
             dlse, *, causal_offset=None):
  """Not implemented: differentiate with implementation='triton'."""
  del q, k, v, bias_k, q_seg, kv_seg, layout, spec, out, lse, dout, dlse
  del causal_offset
  raise NotImplementedError(
      "implementation='mosaic_gpu' has a forward pass only; use "
      "implementation='triton' for gradients")
