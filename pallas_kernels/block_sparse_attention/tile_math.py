"""Backend-neutral per-tile math of block-sparse attention.

Every backend (the XLA gather path and the Pallas kernels) computes logits,
element masks, softmax statistics and their gradients with these functions,
so the numerics are defined once. All functions broadcast: a "tile" is any
array whose last two axes are (query rows, keys).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of what partial blocks mask and how logits are made.

  Attributes:
    q_len: true number of queries T (before padding to the block size).
    kv_len: true number of keys S; keys at or past it are masked.
    kv_len_padded: S rounded up to the kv block size.
    band: positional predicate on kv_pos - q_pos (layout's band intersected
      with the op's causal band), or None.
    has_segments: whether segment ids are compared.
    has_tiles: whether the layout carries a tile pool.
    sm_scale: multiplier of q.k.
    softcap: logit soft-cap c (s -> c * tanh(s / c)), or None.
  """

  q_len: int
  kv_len: int
  kv_len_padded: int
  band: layout_lib.Band | None
  has_segments: bool
  has_tiles: bool
  sm_scale: float
  softcap: float | None

  @property
  def partial_needs_mask(self) -> bool:
    """False when partial blocks would mask nothing (then kinds don't matter)."""
    return self.band is not None or self.has_segments or self.has_tiles

  @property
  def kv_is_ragged(self) -> bool:
    """True when the last kv block holds padding keys."""
    return self.kv_len != self.kv_len_padded


def logits(dot, spec: MaskSpec, bias=None):
  """Logits from raw q.k products: scale, soft-cap, then add the key bias."""
  s = dot.astype(jnp.float32) * spec.sm_scale
  if spec.softcap is not None:
    s = spec.softcap * jnp.tanh(s / spec.softcap)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  return s


def dot_cotangent(ds, dot, spec: MaskSpec):
  """d(loss)/d(q.k) from d(loss)/d(logits), recomputing the soft-cap."""
  if spec.softcap is not None:
    t = jnp.tanh(dot.astype(jnp.float32) * spec.sm_scale / spec.softcap)
    ds = ds * (1.0 - t * t)
  return ds * spec.sm_scale


def partial_block_mask(q_pos, kv_pos, spec: MaskSpec, *, q_seg=None,
                       kv_seg=None, tile=None):
  """Element visibility inside a partial block, or None when all visible.

  Args:
    q_pos: int query positions, broadcastable to the tile.
    kv_pos: int key positions, broadcastable to the tile.
    spec: the static mask description.
    q_seg: query segment ids (when spec.has_segments).
    kv_seg: key segment ids (when spec.has_segments).
    tile: bool tile from the pool (when spec.has_tiles).
  """
  masks = [layout_lib.band_mask(q_pos, kv_pos, spec.band)]
  if spec.has_segments:
    masks.append(q_seg == kv_seg)
  if spec.has_tiles:
    masks.append(tile)
  mask = None
  for m in masks:
    if m is not None:
      mask = m if mask is None else mask & m
  return mask


def padding_mask(kv_pos, spec: MaskSpec):
  """Masks the padding keys of the last kv block (any kind), or None."""
  return kv_pos < spec.kv_len if spec.kv_is_ragged else None


def softmax_stats(s, axes):
  """Masked-safe softmax over `axes` of logits `s` (-inf where masked).

  Returns:
    p: unnormalised probabilities exp(s - m), 0 where masked.
    l: their sum (keepdims), 0 for rows with nothing visible.
    lse: log-sum-exp (keepdims), -inf for rows with nothing visible.
  """
  m = jnp.max(s, axis=axes, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=axes, keepdims=True)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return p, l, lse


def normalise(acc, l):
  """acc / l with 0 (never NaN) for rows that saw no key."""
  return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def probabilities(s, lse):
  """Normalised probabilities recomputed from the saved log-sum-exp."""
  return jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0))


def logits_cotangent(p, dp, delta):
  """dS = P * (dP - delta), delta = rowsum(dO * O)."""
  return p * (dp - delta)


def mask_logits(s, mask):
  """Logits with masked elements set to -inf (`mask` None: unchanged)."""
  return s if mask is None else jnp.where(mask, s, -jnp.inf)


def online_softmax_update(m_prev, l_prev, s):
  """One step of the streaming (flash) softmax over a new tile of logits.

  Args:
    m_prev: f32 [..., R, 1] running row max, -inf for rows that saw nothing.
    l_prev: f32 [..., R, 1] running sum of exp(logits - m_prev).
    s: f32 [..., R, K] logits of the new tile, -inf where masked.

  Returns:
    m: updated row max [..., R, 1] (-inf while a row has seen nothing).
    l: updated row sum [..., R, 1].
    p: exp(s - m) [..., R, K], 0 where masked.
    alpha: [..., R, 1] factor rescaling accumulators built under `m_prev`.
  """
  m = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  # A row with nothing visible so far keeps m = -inf; shifting by 0 instead
  # makes alpha = p = 0 there rather than NaN from (-inf) - (-inf).
  shift = jnp.where(m == -jnp.inf, 0.0, m)
  alpha = jnp.exp(m_prev - shift)
  p = jnp.exp(s - shift)
  l = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  return m, l, p, alpha


def online_softmax_finish(m, l, acc):
  """Output and log-sum-exp [..., R, 1] from the final streaming state.

  Rows that saw no key (l = 0) give output 0 and log-sum-exp -inf.
  """
  seen = l > 0
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
  return normalise(acc, l), lse


def backward_tile(dot, s, lse, dp, delta, spec: MaskSpec):
  """Gradient pieces of one tile, recomputed from the saved statistics.

  Args:
    dot: f32 [..., R, K] raw q.k products.
    s: f32 [..., R, K] masked logits (-inf where masked).
    lse: f32 [..., R, 1] saved log-sum-exp (-inf for rows that saw nothing).
    dp: f32 [..., R, K] dO.V^T.
    delta: f32 [..., R, 1] rowsum(dO * O).
    spec: the static mask description.

  Returns:
    p: normalised probabilities [..., R, K] (for dV = P^T dO).
    ds: d(loss)/d(logits) [..., R, K] (its column sums give d(bias_k)).
    ddot: d(loss)/d(q.k) [..., R, K] (dQ = ddot K, dK = ddot^T Q).
  """
  p = probabilities(s, lse)
  ds = logits_cotangent(p, dp, delta)
  return p, ds, dot_cotangent(ds, dot, spec)
