"""jax.nn / flax.nnx attention masks as SparsePlans.

`jax.nn.dot_product_attention` and `flax.nnx` say what a query sees with a
boolean mask broadcastable to [B, N, T, S], `is_causal`, a local window and
sequence lengths. Each becomes the cheapest form the op knows: causal and
windows a band layout; lengths and padding masks (a mask with a unit T or S
dim, or a concrete [B, 1, T, S] mask that is an outer product of query and
key validity, optionally causal) segment ids, with no T x S array; only a
mask with a real T x S pattern goes through `BlockLayout.from_element_mask`.

A query that sees no key returns zeros (jax.nn returns the mean of all
values there).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import base
from pallas_kernels import layout as layout_lib

# Segment ids of invalid queries and keys: they match no segment (method
# segment ids are non-negative) and not each other.
_NO_KEY = np.iinfo(np.int32).min
_NO_QUERY = _NO_KEY + 1
_CAUSAL = (None, 0)


@dataclasses.dataclass(frozen=True)
class Visibility:
  """What each query of one attention call may see.

  Query i sees key j when all given parts allow it.

  Attributes:
    batch: B.
    q_len: T.
    kv_len: S.
    q_valid: optional bool [B|1, T]: queries that see anything.
    kv_valid: optional bool [B|1, S]: keys that are seen at all.
    element: optional bool [B|1, N|1, T, S] mask with a real T x S pattern;
      NumPy when it was concrete, else a jax array.
    band: optional (lo, hi) on kv_pos - q_pos (causal: (None, 0)).
  """

  batch: int
  q_len: int
  kv_len: int
  q_valid: Any = None
  kv_valid: Any = None
  element: Any = None
  band: layout_lib.Band | None = None

  @property
  def has_padding(self) -> bool:
    return self.q_valid is not None or self.kv_valid is not None


def block_size(n: int, largest: int = 128) -> int:
  """Layout block of a length-n axis: a power of two in [16, largest]."""
  return min(largest, max(16, 1 << (n - 1).bit_length()))


def visibility(mask=None, *, batch: int, heads: int, q_len: int,
               kv_len: int, is_causal: bool = False,
               window: tuple[int, int] | None = None, q_lengths=None,
               kv_lengths=None) -> Visibility:
  """Normalises jax.nn-style masking arguments.

  Args:
    mask: optional bool array broadcastable to [B, N, T, S] (at most 4
      dims; missing leading dims are 1, as in jax.nn). Only a mask whose
      value is known (NumPy, or concrete even under jit: see
      `host_if_known`) can factor into segment ids or give an exact host
      layout.
    batch: B.
    heads: N, the number of query heads.
    q_len: T.
    kv_len: S.
    is_causal: query i sees keys j <= i (top-left aligned).
    window: optional (left, right): query i sees i - left <= j <= i + right.
    q_lengths: optional int [B]: queries i >= q_lengths[b] see nothing.
    kv_lengths: optional int [B]: keys j >= kv_lengths[b] are never seen.

  Returns:
    The Visibility.

  Raises:
    ValueError: on a mask of the wrong rank, dtype or shape.
  """
  band = _CAUSAL if is_causal else None
  if window is not None:
    band = layout_lib.intersect_bands(band, (-window[0], window[1]))
  q_valid = kv_valid = element = None
  if mask is not None:
    q_valid, kv_valid, element, mask_band = _split_mask(
        mask, batch, heads, q_len, kv_len)
    band = layout_lib.intersect_bands(band, mask_band)
  if q_lengths is not None:
    q_valid = _both(q_valid, jnp.arange(q_len)[None, :]
                    < jnp.asarray(q_lengths)[:, None])
  if kv_lengths is not None:
    kv_valid = _both(kv_valid, jnp.arange(kv_len)[None, :]
                     < jnp.asarray(kv_lengths)[:, None])
  return Visibility(batch, q_len, kv_len, q_valid, kv_valid, element, band)


def key_bias(bias, *, batch: int, heads: int, q_len: int, kv_len: int):
  """The op's per-key bias_k [B|1, N|1, S] of a jax.nn-style bias, or None.

  Args:
    bias: optional array broadcastable to [B, N, T, S] (at most 4 dims)
      whose T dim is 1: the same additive bias for every query.

  Raises:
    ValueError: when the bias varies along T (the op has no T x S bias).
  """
  if bias is None:
    return None
  bias = _as_4d(bias, "bias")
  _check_broadcastable(bias, "bias", (batch, heads, q_len, kv_len))
  if bias.shape[2] != 1:
    raise ValueError(
        "bias must be per key, broadcastable to [B, N, 1, S] = "
        f"[{batch}, {heads}, 1, {kv_len}]; got shape {tuple(bias.shape)}. "
        "The block-sparse op has no T x S bias: express a pattern as a "
        "boolean mask instead")
  b, h = bias.shape[:2]
  return jnp.broadcast_to(bias[:, :, 0, :], (b, h, kv_len))


def dense_plan(vis: Visibility, *, block_q: int, block_kv: int,
               bias_k=None) -> base.SparsePlan:
  """The plan of dense attention under `vis`."""
  t, s = vis.q_len, vis.kv_len
  if vis.element is not None:
    layout = _element_layout(vis, block_q, block_kv)
  elif vis.band is not None:
    layout = layout_lib.BlockLayout.from_band(t, s, block_q, block_kv,
                                              vis.band)
  else:
    layout = layout_lib.BlockLayout.dense(t, s, block_q=block_q,
                                          block_kv=block_kv)
  return _with_padding(base.SparsePlan(layout=layout, bias_k=bias_k), vis)


def restrict(plan: base.SparsePlan, vis: Visibility,
             bias_k=None) -> base.SparsePlan:
  """A method's plan further limited by `vis` (and a per-key bias).

  Raises:
    ValueError: for what a method's plan cannot take: a mask with a T x S
      pattern, a band other than causal, or any restriction when the plan
      appends extra (pooled) keys.
  """
  if not (vis.has_padding or vis.band is not None or vis.element is not None
          or bias_k is not None):
    return plan
  if vis.element is not None:
    raise ValueError(
        "a mask with a T x S pattern cannot restrict a sparse method's "
        "plan; pass padding masks ([B, 1, 1, S] keys, [B, 1, T, 1] queries) "
        "or use method=None")
  if plan.extra_k is not None:
    raise ValueError(
        "this method appends pooled keys to the plan; masks, is_causal and "
        "bias cannot be applied to them")
  if vis.band not in (None, _CAUSAL):
    raise ValueError(
        f"only a causal band can restrict a method's plan, got {vis.band}")
  if bias_k is not None:
    if plan.bias_k is not None:
      raise ValueError("the method's plan already has a per-key bias")
    plan = plan.replace(bias_k=bias_k)
  if vis.band is not None:
    plan = plan.replace(causal=True)
  return _with_padding(plan, vis)


def _with_padding(plan: base.SparsePlan, vis: Visibility) -> base.SparsePlan:
  """Invalid queries and keys get segment ids that match nothing."""
  if not vis.has_padding:
    return plan
  b, t, s = vis.batch, vis.q_len, vis.kv_len
  q_seg, kv_seg = plan.q_segment_ids, plan.kv_segment_ids
  if q_seg is None:
    q_seg = jnp.zeros((b, t), jnp.int32)
    kv_seg = jnp.zeros((b, s), jnp.int32)
  if vis.q_valid is not None:
    q_seg = jnp.where(jnp.broadcast_to(vis.q_valid, (b, t)), q_seg, _NO_KEY)
  if vis.kv_valid is not None:
    kv_seg = jnp.where(jnp.broadcast_to(vis.kv_valid, (b, s)), kv_seg,
                       _NO_QUERY)
  return plan.replace(q_segment_ids=q_seg, kv_segment_ids=kv_seg)


def _element_layout(vis: Visibility, block_q: int, block_kv: int):
  """from_element_mask of the mask with the band folded in.

  A concrete mask gives a host layout with exact capacity; a traced one
  lists up to every kv block per row.
  """
  mask = vis.element
  host = isinstance(mask, np.ndarray)
  xp = np if host else jnp
  in_band = layout_lib.band_mask(xp.arange(vis.q_len)[:, None],
                                 xp.arange(vis.kv_len)[None, :], vis.band)
  if in_band is not None:
    mask = mask & in_band[None, None]
  capacity = None if host else layout_lib.cdiv(vis.kv_len, block_kv)
  return layout_lib.BlockLayout.from_element_mask(
      mask, block_q, block_kv, max_kv_blocks=capacity)


def _split_mask(mask, batch, heads, q_len, kv_len):
  """(q_valid, kv_valid, element, band) of a boolean mask."""
  mask = _as_4d(mask, "mask")
  if mask.dtype != bool:
    raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
  _check_broadcastable(mask, "mask", (batch, heads, q_len, kv_len))
  mb, mh, mt, ms = mask.shape
  if mh == 1 and mt == 1:
    return None, jnp.broadcast_to(mask[:, 0, 0, :], (mb, kv_len)), None, None
  if mh == 1 and ms == 1:
    return mask[:, 0, :, 0], None, None, None
  mask = host_if_known(mask)
  host = isinstance(mask, np.ndarray)
  if mh == 1 and host:
    factors = _factorize(mask[:, 0])
    if factors is not None:
      return factors
  xp = np if host else jnp
  return None, None, xp.broadcast_to(mask, (mb, mh, q_len, kv_len)), None


def _factorize(mask: np.ndarray):
  """(q_valid, kv_valid, None, band) when a host [B, T, S] mask is that.

  Padding masks (`nnx.make_attention_mask` of validity vectors), optionally
  combined with a causal mask, factor this way.
  """
  q_valid, kv_valid = mask.any(-1), mask.any(-2)
  outer = q_valid[:, :, None] & kv_valid[:, None, :]
  t, s = mask.shape[1:]
  causal = layout_lib.band_mask(np.arange(t)[:, None], np.arange(s)[None, :],
                                _CAUSAL)
  for band, want in ((None, outer), (_CAUSAL, outer & causal[None])):
    if np.array_equal(mask, want):
      return q_valid, kv_valid, None, band
  return None


def host_if_known(x):
  """x as a NumPy array when its value is known (also inside jit), else x.

  Convert masks with it before any jnp operation, which would trace them.
  """
  return x if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _both(a, b):
  return b if a is None else a & b


def _as_4d(x, name: str):
  if x.ndim > 4:
    raise ValueError(
        f"{name} must have at most 4 dims [B, N, T, S], got shape "
        f"{tuple(x.shape)}")
  return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


def _check_broadcastable(x, name: str, shape: tuple[int, ...]) -> None:
  if any(d not in (1, want) for d, want in zip(x.shape, shape)):
    raise ValueError(
        f"{name} must be broadcastable to [B, N, T, S] = {list(shape)} "
        f"(each dim 1 or full), got shape {tuple(x.shape)}")
