"""block_sparse_attention: the one public attention op of jsparse."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import warnings
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels import row_layout
from pallas_kernels.block_sparse_attention import partitioning
from pallas_kernels.block_sparse_attention import reference
from pallas_kernels.block_sparse_attention import row_sparse
from pallas_kernels.block_sparse_attention import tile_math

Implementation = Literal["reference", "xla", "triton", "mosaic_tpu",
                         "mosaic_gpu"]

# Backends with a custom VJP. Each module defines `NAME`, `SECOND_ORDER`
# (whether its backward pass can be differentiated),
# `unavailable_reason(platform, interpret) -> str | None`,
# `forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, *, causal_offset)
# -> (out, lse)` and `backward(..., out, lse, dout, dlse, *, causal_offset)
# -> (dq, dk, dv, dbias_k)` on padded inputs. Pallas backends are imported on
# first use.
BACKENDS: dict[str, str] = {
    "xla": "pallas_kernels.block_sparse_attention.xla",
    "triton": "pallas_kernels.block_sparse_attention.pallas_triton",
    "mosaic_tpu": "pallas_kernels.block_sparse_attention.pallas_mosaic_tpu",
    # Forward only and unverified on hardware: never in PREFERENCE.
    "mosaic_gpu": "pallas_kernels.block_sparse_attention.pallas_mosaic_gpu",
}
# Default order per platform when `implementation=None`.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("xla",),
    "gpu": ("triton", "xla"),
    "tpu": ("mosaic_tpu", "xla"),
}
IMPLEMENTATIONS = ("reference", *BACKENDS)


@_common.numpy_broadcasting
def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: layout_lib.BlockLayout | row_layout.RowLayout,
    *,
    bias_k: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sm_scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    implementation: Implementation | None = None,
    interpret: bool = False,
):
  """Attention restricted to the blocks listed in `layout`.

  Element (i, j) attends when kv block j // block_kv is listed for query
  block i // block_q, the layout allows it (a FULL block allows every
  element, a PARTIAL block those its band and tile allow), and the op's own
  masks hold: `causal` (j <= i + causal_offset) and equal segment ids. The
  op's masks apply to every listed block, FULL or PARTIAL; block kinds are
  only a speed hint (a FULL block is never masked by the layout), and the
  kernels skip or mask blocks the op's masks exclude or cut. Logits are
  `softcap(sm_scale * q.k) + bias_k`.

  NaN or +inf in q, k, v or bias_k propagate: a row that sees one gets NaN
  output (and, except for v, NaN lse). Only rows that see no key at all give
  out 0 and lse -inf.

  Args:
    q: [B, T, Hq, D] queries, float dtype.
    k: [B, S, Hkv, D] keys, q's dtype; Hq must be a multiple of Hkv (GQA: q
      head h reads kv head h // (Hq // Hkv)).
    v: [B, S, Hkv, D] values, q's dtype.
    layout: a `BlockLayout` with Qb = ceil(T / block_q), Kb = ceil(S /
      block_kv), batch dim in {1, B} and head dim in {1, Hkv, Hq}. A traced
      layout (built under jit) has its counts clamped to [0, Kmax] and its
      ids to [0, Kb); its lists must be ascending, and an id repeated in a
      row counts once (with its first kind and tile). Or a `RowLayout`
      (per-row key lists): every implementation but "reference" then runs
      the XLA gather of `row_sparse.py`, on GPU and TPU too.
    bias_k: optional [B|1, Hq|Hkv|1, S] float additive per-key logit bias; it
      has a gradient.
    q_segment_ids: optional integer [B, T]; with `kv_segment_ids`, a query
      only sees keys of its own segment.
    kv_segment_ids: optional integer [B, S].
    causal: query i only sees keys j <= i + causal_offset (top-left aligned,
      as `jax.nn.dot_product_attention`). A static Python bool.
    causal_offset: integer shift of the causal diagonal; may be traced.
    sm_scale: finite logit scale; default 1 / sqrt(D). A traced scalar is
      folded into q (differentiable).
    softcap: optional finite logit soft-cap c > 0: s -> c * tanh(s / c).
    return_lse: also return the log-sum-exp.
    implementation: "reference" (dense masked oracle, materialises T x S),
      "xla" (gather-based, any platform), "triton", "mosaic_tpu", or None for
      the best available on the default backend. An explicit choice that
      cannot run raises. Second-order derivatives need "xla" or
      "reference"; the Pallas backends raise NotImplementedError.
    interpret: True lets the Pallas backends run where no accelerator is
      present (Pallas interpret mode, for CPU tests; on a GPU/TPU they still
      compile); a `pltpu.InterpretParams` runs "mosaic_tpu" in TPU interpret
      mode (races, DMA and memory semantics).

  Returns:
    out [B, T, Hq, D] in q's dtype; with `return_lse`, also lse f32
    [B, Hq, T]. Rows that see no key give out 0 and lse -inf.

  Raises:
    ValueError: on bad shapes, dtypes, layouts or arguments, before any work.
  """
  q, k, v, bias_k, q_segment_ids, kv_segment_ids = (
      None if x is None else jnp.asarray(x)
      for x in (q, k, v, bias_k, q_segment_ids, kv_segment_ids))
  _check_arrays(q, k, v, bias_k, q_segment_ids, kv_segment_ids)
  if isinstance(layout, row_layout.RowLayout):
    row_sparse.check_layout(layout, q, k)
  else:
    _check_block_layout(layout, q, k)
  if q_segment_ids is not None:
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  scale = 1.0 / math.sqrt(d) if sm_scale is None else _static_scalar(
      "sm_scale", sm_scale)
  softcap = _static_softcap(softcap)
  offset = _causal_offset(causal, causal_offset)
  impl = _choose_implementation(implementation, interpret)
  if scale is None:
    q, scale = _fold_scale(q, sm_scale), 1.0
  if isinstance(layout, row_layout.RowLayout):
    out, lse = row_sparse.attention(
        q, k, v, layout, bias_k=bias_k, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, causal_offset=offset, sm_scale=scale,
        softcap=softcap, dense_reference=impl == "reference")
    return (out, lse) if return_lse else out
  if not layout.is_host:
    layout = _sanitised(layout)
  spec = tile_math.MaskSpec(
      q_len=t,
      kv_len=s,
      kv_len_padded=layout.num_kv_blocks * layout.block_kv,
      band=layout.band,
      has_segments=q_segment_ids is not None,
      has_tiles=layout.tiles is not None,
      sm_scale=scale,
      softcap=softcap,
      causal=offset is not None,
  )
  if impl == "reference":
    out, lse = reference.attention(q, k, v, layout, spec, bias_k=bias_k,
                                   q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids,
                                   causal_offset=offset)
  else:
    options = _backend_options(impl, interpret)
    if impl == "mosaic_tpu":
      advice = backend(impl).block_size_advice(
          layout, jax.default_backend(), interpret)
      if advice:
        warnings.warn(advice, stacklevel=2)
    if layout.is_host and layout.kv_major is None:
      # Exact Qmax for the dK/dV lists while the layout is still on the host.
      layout = layout.with_kv_major()
    if layout.is_host and impl in ("xla", "mosaic_tpu"):
      # Static facts of the host lists: xla gathers rows of very different
      # lengths in ranges of their own Kmax, mosaic_tpu sizes its grids by
      # the listed blocks.
      options += backend(impl).host_layout_options(layout, q.shape[2],
                                                   k.shape[2])
    out, lse = _padded_attention((impl, options), spec, q, k, v, bias_k,
                                 q_segment_ids, kv_segment_ids, layout,
                                 offset)
  return (out, lse) if return_lse else out


def _static_scalar(name: str, value) -> float | None:
  """`value` as a finite float, or None when it is traced."""
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    return None
  try:
    if jnp.ndim(value) != 0:
      raise TypeError
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real scalar, got {value!r}") from None
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  return value


def _static_softcap(softcap) -> float | None:
  if softcap is None:
    return None
  value = _static_scalar("softcap", softcap)
  if value is None:
    raise ValueError("softcap must be a static Python float, got a traced "
                     "value (it selects the kernels' code path)")
  if not value > 0:
    raise ValueError(f"softcap must be > 0, got {value}")
  return value


def _fold_scale(q, sm_scale):
  """q * sm_scale in q's dtype: a traced scale needs no static logit scale."""
  if not jnp.issubdtype(sm_scale.dtype, jnp.number):
    raise ValueError(f"sm_scale must be a real scalar, got {sm_scale.dtype}")
  return (q.astype(jnp.float32) * sm_scale.astype(jnp.float32)).astype(
      q.dtype)


# Static offsets are clipped into int32; positions never differ by more.
_MAX_OFFSET = 2**30


def _causal_offset(causal, causal_offset):
  """int32 scalar offset of the causal predicate, or None when not causal."""
  if isinstance(causal, jax.core.Tracer):
    raise ValueError("causal must be a static Python bool, got a traced "
                     "value (use causal_offset to move the diagonal)")
  if not causal:
    return None
  offset = causal_offset
  if (jnp.ndim(offset) != 0 or isinstance(offset, bool)
      or not jnp.issubdtype(jnp.result_type(offset), jnp.integer)):
    raise ValueError(
        f"causal_offset must be an integer scalar, got {causal_offset!r}")
  if not isinstance(offset, jax.core.Tracer):
    offset = max(-_MAX_OFFSET, min(_MAX_OFFSET, int(offset)))
  return jnp.asarray(offset, jnp.int32)


def _sanitised(layout: layout_lib.BlockLayout) -> layout_lib.BlockLayout:
  """A traced layout made safe to index: no count past Kmax, no repeat.

  Counts are clamped to [0, Kmax] and ids to [0, Kb); an id equal to the
  previous one in its row is dropped (the row keeps its first kind and tile),
  so repeats count once on every backend, as in the dense reference.
  """
  kmax = layout.max_kv_blocks
  slot = jnp.arange(kmax, dtype=jnp.int32)
  idx = jnp.clip(jnp.asarray(layout.kv_idx), 0, layout.num_kv_blocks - 1)
  repeat = jnp.concatenate(
      [jnp.zeros_like(idx[..., :1], bool), idx[..., 1:] == idx[..., :-1]],
      axis=-1)
  keep = (slot < jnp.asarray(layout.kv_cnt)[..., None]) & ~repeat
  cnt = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  pos = jnp.where(keep, jnp.cumsum(keep, axis=-1) - 1, kmax)
  # Padding repeats the row's last valid id (the layout's contract).
  fill = jnp.minimum(slot, jnp.maximum(cnt - 1, 0)[..., None])
  valid = slot < cnt[..., None]

  def compact(x, empty):
    packed = jnp.put_along_axis(jnp.zeros_like(x), pos, x, axis=-1,
                                inplace=False, mode="drop")
    packed = jnp.take_along_axis(packed, fill, axis=-1)
    return packed if empty is None else jnp.where(valid, packed, empty)

  tile_idx = layout.tile_idx
  if tile_idx is not None:
    tile_idx = compact(jnp.asarray(tile_idx), -1)
  return dataclasses.replace(
      layout, kv_idx=compact(idx, None), kv_cnt=cnt,
      kv_kind=compact(jnp.asarray(layout.kv_kind), layout_lib.EMPTY),
      tile_idx=tile_idx)


def _backend_options(impl: str, interpret) -> tuple[tuple[str, object], ...]:
  """Static keyword options for the backend (hashable).

  `interpret=True` needs no option: Pallas backends already interpret when
  no accelerator is present. A `pltpu.InterpretParams` selects TPU interpret
  mode and only applies to "mosaic_tpu".
  """
  if isinstance(interpret, bool):
    return ()
  if impl != "mosaic_tpu":
    raise ValueError(
        f"interpret={interpret!r} only applies to implementation="
        f"'mosaic_tpu'; use interpret=True for {impl!r}")
  return (("interpret", interpret),)


def _padded_attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout,
                      causal_offset):
  """Pads T and S to block multiples, runs the backend, slices back."""
  tp = layout.num_q_blocks * layout.block_q
  sp = spec.kv_len_padded
  pad_t, pad_s = tp - spec.q_len, sp - spec.kv_len
  if pad_t:
    q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    if q_seg is not None:
      q_seg = jnp.pad(q_seg, ((0, 0), (0, pad_t)))
  if pad_s:
    k = jnp.pad(k, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad_s), (0, 0), (0, 0)))
    if kv_seg is not None:
      kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad_s)))
    if bias_k is not None:
      bias_k = jnp.pad(bias_k, ((0, 0), (0, 0), (0, pad_s)))
  out, lse = _attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout,
                        causal_offset)
  return out[:, :spec.q_len], lse[..., :spec.q_len]


def backend(name: str):
  """The module implementing backend `name`."""
  return importlib.import_module(BACKENDS[name])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout,
               causal_offset):
  name, options = impl
  forward = functools.partial(_backend_forward, backend(name), spec,
                              options)
  args = (q, k, v, bias_k, q_seg, kv_seg, layout, causal_offset)
  return partitioning.call(forward, args, _operand_roles(args),
                           (partitioning.Q, partitioning.LSE),
                           _mesh_dims(q, k))


def _backend_forward(module, spec, options, q, k, v, bias_k, q_seg, kv_seg,
                     layout, causal_offset):
  return module.forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec,
                        causal_offset=causal_offset, **dict(options))


def _backend_backward(module, spec, options, q, k, v, bias_k, q_seg, kv_seg,
                      layout, out, lse, dout, dlse, causal_offset):
  return module.backward(q, k, v, bias_k, q_seg, kv_seg, layout, spec, out,
                         lse, dout, dlse, causal_offset=causal_offset,
                         **dict(options))


def _mesh_dims(q, k) -> partitioning.Dims:
  return partitioning.Dims(q.shape[0], q.shape[2], k.shape[2])


def _operand_roles(args):
  """Partitioning roles of the op's operands (see `partitioning`).

  `args` is (q, k, v, bias_k, q_seg, kv_seg, layout, causal_offset) or the
  backward's (q, k, v, bias_k, q_seg, kv_seg, layout, out, lse, dout, dlse,
  causal_offset).
  """
  q, k, v, bias_k, q_seg, kv_seg, layout, *rest = args
  maybe = lambda x, role: None if x is None else role
  # The backward's out, lse, dout, dlse sit between the layout and offset.
  rest_roles = (partitioning.Q, partitioning.LSE) * ((len(rest) - 1) // 2)
  return (partitioning.Q, partitioning.KV, partitioning.KV,
          maybe(bias_k, partitioning.LEADING),
          maybe(q_seg, partitioning.Q_SEGMENTS),
          maybe(kv_seg, partitioning.KV_SEGMENTS),
          partitioning.layout_roles(layout),
          *rest_roles, maybe(rest[-1], partitioning.FREE))


def _attention_fwd(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout,
                   causal_offset):
  out, lse = _attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout,
                        causal_offset)
  return (out, lse), (q, k, v, bias_k, q_seg, kv_seg, layout, causal_offset,
                      out, lse)


def _attention_bwd(impl, spec, residuals, cotangents):
  q, k, v, bias_k, q_seg, kv_seg, layout, causal_offset, out, lse = residuals
  # d(lse_i)/d(s_ij) = p_ij, so the lse cotangent enters the backward as
  # dS = P * (dP - (delta - dlse)): branches merged by LSE train correctly.
  dout, dlse = cotangents
  name, options = impl
  module = backend(name)

  def grads(*args):
    backward = functools.partial(_backend_backward, module, spec, options)
    return partitioning.call(
        backward, args, _operand_roles(args),
        (partitioning.Q, partitioning.KV, partitioning.KV,
         None if args[3] is None else partitioning.LEADING),
        _mesh_dims(args[0], args[1]))

  if not module.SECOND_ORDER:
    grads = _first_order_only(grads, name)
  dq, dk, dv, dbias = grads(q, k, v, bias_k, q_seg, kv_seg, layout, out, lse,
                            dout, dlse, causal_offset)
  return dq, dk, dv, dbias, None, None, None, None


def _first_order_only(fn, name: str):
  """`fn` whose own differentiation raises a clear NotImplementedError."""
  wrapped = jax.custom_jvp(fn)

  def no_derivative(primals, tangents):
    del primals, tangents
    raise NotImplementedError(
        f"block_sparse_attention(implementation={name!r}) has first-order "
        "gradients only: its backward pass is a Pallas kernel, which has no "
        "derivative. Second-order derivatives (grad of grad, Hessian-vector "
        "products) are supported on implementation='xla'.")

  wrapped.defjvp(no_derivative)
  return wrapped


_attention.defvjp(_attention_fwd, _attention_bwd)


def unavailable_reason(name: str, platform: str | None = None,
                       interpret: bool = False) -> str | None:
  """Why backend `name` cannot run on `platform`, or None if it can."""
  platform = platform or jax.default_backend()
  try:
    module = backend(name)
  except ImportError as e:
    return f"backend module could not be imported ({e})"
  return module.unavailable_reason(platform, interpret)


def available_implementations(platform: str | None = None,
                              interpret: bool = False) -> tuple[str, ...]:
  """Backends (besides "reference") that can run on `platform`."""
  return tuple(name for name in BACKENDS
               if unavailable_reason(name, platform, interpret) is None)


def _choose_implementation(implementation, interpret) -> str:
  platform = jax.default_backend()
  if implementation is None:
    skipped = []
    for name in PREFERENCE.get(platform, ("xla",)):
      reason = unavailable_reason(name, platform, interpret)
      if reason is None:
        if skipped:
          warnings.warn(
              f"block_sparse_attention on {platform}: using {name!r} "
              f"because {'; '.join(skipped)}", stacklevel=3)
        return name
      skipped.append(f"{name!r} is unavailable ({reason})")
    raise ValueError(
        f"no backend of block_sparse_attention runs on {platform}: "
        f"{'; '.join(skipped)}")
  if implementation == "reference":
    return implementation
  if implementation not in BACKENDS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS} or None, got "
        f"{implementation!r}")
  reason = unavailable_reason(implementation, platform, interpret)
  if reason is not None:
    raise ValueError(
        f"implementation={implementation!r} cannot run here: {reason}")
  return implementation


def _check_arrays(q, k, v, bias_k, q_seg, kv_seg):
  """Raises ValueError naming the argument and the expected shape/dtype."""
  for name, x, dims in (("q", q, "B, T, Hq, D"), ("k", k, "B, S, Hkv, D"),
                        ("v", v, "B, S, Hkv, D")):
    if x.ndim != 4:
      raise ValueError(
          f"{name} must be [B, T|S, H, D], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
          f"{name} must have a float dtype (float32, bfloat16, float16), "
          f"got {x.dtype}")
    if 0 in x.shape:
      raise ValueError(
          f"{name} must be [{dims}] with every size >= 1, got shape "
          f"{tuple(x.shape)}")
  if not k.dtype == v.dtype == q.dtype:
    raise ValueError(
        f"k and v must have q's dtype {q.dtype}, got k {k.dtype} and v "
        f"{v.dtype}")
  b, t, hq, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(
        f"k must be [B={b}, S, Hkv, D={d}], got shape {tuple(k.shape)}")
  if v.shape != k.shape:
    raise ValueError(
        f"v must match k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
  s, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(
        f"q heads (Hq={hq}) must be a multiple of kv heads (Hkv={hkv})")
  if bias_k is not None:
    if not jnp.issubdtype(bias_k.dtype, jnp.floating):
      raise ValueError(f"bias_k must have a float dtype, got {bias_k.dtype}")
    if (bias_k.ndim != 3 or bias_k.shape[0] not in (1, b)
        or bias_k.shape[1] not in (1, hkv, hq) or bias_k.shape[2] != s):
      raise ValueError(
          f"bias_k must be [B|1, Hq|Hkv|1, S] = [{b}|1, {hq}|{hkv}|1, {s}], "
          f"got shape {tuple(bias_k.shape)}")
  if (q_seg is None) != (kv_seg is None):
    raise ValueError(
        "q_segment_ids and kv_segment_ids must be given together")
  if q_seg is not None:
    for name, x in (("q_segment_ids", q_seg), ("kv_segment_ids", kv_seg)):
      if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == bool):
        raise ValueError(
            f"{name} must have an integer dtype, got {x.dtype} (float ids "
            "would be truncated)")
    if tuple(q_seg.shape) != (b, t):
      raise ValueError(
          f"q_segment_ids must be [B, T] = [{b}, {t}], got "
          f"{tuple(q_seg.shape)}")
    if tuple(kv_seg.shape) != (b, s):
      raise ValueError(
          f"kv_segment_ids must be [B, S] = [{b}, {s}], got "
          f"{tuple(kv_seg.shape)}")


def _check_block_layout(layout, q, k):
  """Raises ValueError unless `layout` is a BlockLayout fitting q and k."""
  b, t, hq, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if not isinstance(layout, layout_lib.BlockLayout):
    raise ValueError(
        f"layout must be a BlockLayout, got {type(layout).__name__}")
  for name in ("block_q", "block_kv"):
    if getattr(layout, name) < 1:
      raise ValueError(
          f"layout.{name} must be >= 1, got {getattr(layout, name)}")
  layout_lib.check_shapes(layout)
  bl, hl, qb, _ = layout.kv_idx.shape
  want_qb = layout_lib.cdiv(t, layout.block_q)
  want_kb = layout_lib.cdiv(s, layout.block_kv)
  if qb != want_qb:
    raise ValueError(
        f"layout has Qb={qb} query blocks but T={t} with block_q="
        f"{layout.block_q} needs ceil(T / block_q)={want_qb}")
  if layout.num_kv_blocks != want_kb:
    raise ValueError(
        f"layout has num_kv_blocks={layout.num_kv_blocks} but S={s} with "
        f"block_kv={layout.block_kv} needs ceil(S / block_kv)={want_kb}")
  if bl not in (1, b):
    raise ValueError(f"layout batch dim must be 1 or B={b}, got {bl}")
  if hl not in (1, hkv, hq):
    raise ValueError(
        f"layout head dim must be 1, Hkv={hkv} or Hq={hq}, got {hl}")
  if layout.is_host:
    layout.validate()
