"""block_sparse_attention: the one public attention op of jsparse."""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib
from pallas_kernels.block_sparse_attention import reference
from pallas_kernels.block_sparse_attention import tile_math

Implementation = Literal["reference", "xla", "triton", "mosaic_tpu"]

# Backends with a custom VJP. Each module defines `NAME`,
# `unavailable_reason(platform, interpret) -> str | None`,
# `forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec) -> (out, lse)` and
# `backward(..., out, lse, dout, dlse) -> (dq, dk, dv, dbias_k)` on padded
# inputs. Pallas backends are imported on first use.
BACKENDS: dict[str, str] = {
    "xla": "pallas_kernels.block_sparse_attention.xla",
    "triton": "pallas_kernels.block_sparse_attention.pallas_triton",
    "mosaic_tpu": "pallas_kernels.block_sparse_attention.pallas_mosaic_tpu",
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
    layout: layout_lib.BlockLayout,
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

  Element (i, j) attends when kv block j // block_kv is listed for query block
  i // block_q and the block is FULL, or it is PARTIAL and every active
  predicate holds: the layout's band and tile, `causal`, and equal segment
  ids. Logits are `softcap(sm_scale * q.k) + bias_k`.

  Args:
    q: [B, T, Hq, D] queries.
    k: [B, S, Hkv, D] keys; Hq must be a multiple of Hkv (GQA: q head h reads
      kv head h // (Hq // Hkv)).
    v: [B, S, Hkv, D] values.
    layout: a `BlockLayout` with Qb = ceil(T / block_q), Kb = ceil(S /
      block_kv), batch dim in {1, B} and head dim in {1, Hkv, Hq}.
    bias_k: optional [B|1, Hq|Hkv|1, S] additive per-key logit bias; it has a
      gradient.
    q_segment_ids: optional int [B, T]; with `kv_segment_ids`, a query only
      sees keys of its own segment (inside partial blocks).
    kv_segment_ids: optional int [B, S].
    causal: inside partial blocks, query i only sees keys j <= i +
      causal_offset (top-left aligned, as `jax.nn.dot_product_attention`).
    causal_offset: shift of the causal diagonal.
    sm_scale: logit scale; default 1 / sqrt(D).
    softcap: optional logit soft-cap c: s -> c * tanh(s / c).
    return_lse: also return the log-sum-exp.
    implementation: "reference" (dense masked oracle, materialises T x S),
      "xla" (gather-based, any platform), or None for the best available on
      the default backend. An explicit choice that cannot run raises.
    interpret: True lets the Pallas backends run where no accelerator is
      present (Pallas interpret mode, for CPU tests; on a GPU/TPU they still
      compile); a `pltpu.InterpretParams` runs "mosaic_tpu" in TPU interpret
      mode (races, DMA and memory semantics).

  Returns:
    out [B, T, Hq, D] in q's dtype; with `return_lse`, also lse f32
    [B, Hq, T]. Rows that see no key give out 0 and lse -inf.

  Raises:
    ValueError: on bad shapes, layouts or arguments, before any work.
  """
  _check_inputs(q, k, v, layout, bias_k, q_segment_ids, kv_segment_ids,
                softcap)
  impl = _choose_implementation(implementation, interpret)
  if q_segment_ids is not None:
    q_segment_ids = jnp.asarray(q_segment_ids, jnp.int32)
    kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  causal_band = (None, causal_offset) if causal else None
  spec = tile_math.MaskSpec(
      q_len=t,
      kv_len=s,
      kv_len_padded=layout.num_kv_blocks * layout.block_kv,
      band=layout_lib.intersect_bands(layout.band, causal_band),
      has_segments=q_segment_ids is not None,
      has_tiles=layout.tiles is not None,
      sm_scale=1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale),
      softcap=None if softcap is None else float(softcap),
  )
  if impl == "reference":
    out, lse = reference.attention(q, k, v, layout, spec, bias_k=bias_k,
                                   q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids)
  else:
    options = _backend_options(impl, interpret)
    if layout.is_host and layout.kv_major is None:
      # Exact Qmax for the dK/dV lists while the layout is still on the host.
      layout = layout.with_kv_major()
    out, lse = _padded_attention((impl, options), spec, q, k, v, bias_k,
                                 q_segment_ids, kv_segment_ids, layout)
  return (out, lse) if return_lse else out


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


def _padded_attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout):
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
  out, lse = _attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout)
  return out[:, :spec.q_len], lse[..., :spec.q_len]


def backend(name: str):
  """The module implementing backend `name`."""
  return importlib.import_module(BACKENDS[name])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout):
  name, options = impl
  return backend(name).forward(q, k, v, bias_k, q_seg, kv_seg, layout, spec,
                               **dict(options))


def _attention_fwd(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout):
  out, lse = _attention(impl, spec, q, k, v, bias_k, q_seg, kv_seg, layout)
  return (out, lse), (q, k, v, bias_k, q_seg, kv_seg, layout, out, lse)


def _attention_bwd(impl, spec, residuals, cotangents):
  q, k, v, bias_k, q_seg, kv_seg, layout, out, lse = residuals
  # d(lse_i)/d(s_ij) = p_ij, so the lse cotangent enters the backward as
  # dS = P * (dP - (delta - dlse)): branches merged by LSE train correctly.
  dout, dlse = cotangents
  name, options = impl
  dq, dk, dv, dbias = backend(name).backward(
      q, k, v, bias_k, q_seg, kv_seg, layout, spec, out, lse, dout, dlse,
      **dict(options))
  return dq, dk, dv, dbias, None, None, None


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


def _check_inputs(q, k, v, layout, bias_k, q_seg, kv_seg, softcap):
  """Raises ValueError naming the argument and the expected shape."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(
          f"{name} must be [B, T|S, H, D], got shape {tuple(x.shape)}")
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
  if not isinstance(layout, layout_lib.BlockLayout):
    raise ValueError(
        f"layout must be a BlockLayout, got {type(layout).__name__}")
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
  if bias_k is not None:
    if (bias_k.ndim != 3 or bias_k.shape[0] not in (1, b)
        or bias_k.shape[1] not in (1, hkv, hq) or bias_k.shape[2] != s):
      raise ValueError(
          f"bias_k must be [B|1, Hq|Hkv|1, S] = [{b}|1, {hq}|{hkv}|1, {s}], "
          f"got shape {tuple(bias_k.shape)}")
  if (q_seg is None) != (kv_seg is None):
    raise ValueError(
        "q_segment_ids and kv_segment_ids must be given together")
  if q_seg is not None:
    if tuple(q_seg.shape) != (b, t):
      raise ValueError(
          f"q_segment_ids must be [B, T] = [{b}, {t}], got "
          f"{tuple(q_seg.shape)}")
    if tuple(kv_seg.shape) != (b, s):
      raise ValueError(
          f"kv_segment_ids must be [B, S] = [{b}, {s}], got "
          f"{tuple(kv_seg.shape)}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be > 0, got {softcap}")
  if layout.is_host:
    layout.validate()
