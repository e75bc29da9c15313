"""Backend-neutral per-tile math of block-sparse attention.

Every backend (the XLA gather path and the Pallas kernels) computes logits,
element masks, softmax statistics and their gradients with these functions,
so the numerics are defined once. All functions broadcast: a "tile" is any
array whose last two axes are (query rows, keys).

Logits are kept in base 2: `logits` returns log2(e) times the natural logit,
with the scale and log2(e) folded into one multiply, and the softmax uses
exp2 (FlashAttention-2 style; on GPU exp2 is one instruction). Log-sum-exps
going in (`probabilities`) and out stay natural logs, and gradients are taken
with respect to the natural logits.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import layout as layout_lib

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of the element masks and of how logits are made.

  Two kinds of predicates exist. The layout's own (its band and tile pool)
  refine PARTIAL blocks only: a FULL block is, by the layout, visible
  everywhere. The op's own (`causal` and segment ids) apply to every listed
  element, whatever the block kind; kernels decide per tile with a scalar
  test whether they cut it.

  Attributes:
    q_len: true number of queries T (before padding to the block size).
    kv_len: true number of keys S; keys at or past it are masked.
    kv_len_padded: S rounded up to the kv block size.
    band: the layout's positional predicate on kv_pos - q_pos inside partial
      blocks, or None.
    has_segments: whether segment ids are compared (every block).
    has_tiles: whether the layout carries a tile pool (partial blocks).
    sm_scale: multiplier of q.k.
    softcap: logit soft-cap c (s -> c * tanh(s / c)), or None.
    causal: whether the op's causal predicate kv_pos - q_pos <= offset
      applies (every block); the offset is a run-time int32 scalar.
  """

  q_len: int
  kv_len: int
  kv_len_padded: int
  band: layout_lib.Band | None
  has_segments: bool
  has_tiles: bool
  sm_scale: float
  softcap: float | None
  causal: bool = False

  @property
  def has_layout_mask(self) -> bool:
    """Whether partial blocks mask anything by the layout's own predicate."""
    return self.band is not None or self.has_tiles

  @property
  def has_op_mask(self) -> bool:
    """Whether the op's predicates (causal, segments) may mask any block."""
    return self.causal or self.has_segments

  @property
  def kv_is_ragged(self) -> bool:
    """True when the last kv block holds padding keys."""
    return self.kv_len != self.kv_len_padded


def logits(dot, spec: MaskSpec, bias=None):
  """Base-2 logits log2(e) * s from raw q.k products.

  The natural logit s scales q.k, soft-caps it, then adds the key bias;
  log2(e) rides on the scale (and on the cap and bias) so a logit costs one
  multiply.
  """
  dot = dot.astype(jnp.float32)
  if spec.softcap is None:
    s = dot * (spec.sm_scale * _LOG2E)
  else:
    s = (spec.softcap * _LOG2E) * jnp.tanh(
        dot * (spec.sm_scale / spec.softcap))
  if bias is not None:
    s = s + bias.astype(jnp.float32) * _LOG2E
  return s


def dot_cotangent(ds, dot, spec: MaskSpec):
  """d(loss)/d(q.k) from d(loss)/d(natural logits), recomputing the cap."""
  if spec.softcap is not None:
    t = jnp.tanh(dot.astype(jnp.float32) * spec.sm_scale / spec.softcap)
    ds = ds * (1.0 - t * t)
  return ds * spec.sm_scale


def _all(masks):
  """Conjunction of the non-None masks, or None when there are none."""
  mask = None
  for m in masks:
    if m is not None:
      mask = m if mask is None else mask & m
  return mask


def layout_mask(q_pos, kv_pos, spec: MaskSpec, *, tile=None):
  """The layout's element predicate inside a partial block, or None.

  Args:
    q_pos: int query positions, broadcastable to the tile.
    kv_pos: int key positions, broadcastable to the tile.
    spec: the static mask description.
    tile: bool tile from the pool (when spec.has_tiles).
  """
  return _all([layout_lib.band_mask(q_pos, kv_pos, spec.band),
               tile if spec.has_tiles else None])


def op_mask(q_pos, kv_pos, spec: MaskSpec, *, causal_offset=None, q_seg=None,
            kv_seg=None):
  """The op's element predicate (every block), or None when it has none.

  Args:
    q_pos: int query positions, broadcastable to the tile.
    kv_pos: int key positions, broadcastable to the tile.
    spec: the static mask description.
    causal_offset: int32 scalar shift of the causal diagonal (spec.causal).
    q_seg: query segment ids (when spec.has_segments).
    kv_seg: key segment ids (when spec.has_segments).
  """
  return _all([kv_pos - q_pos <= causal_offset if spec.causal else None,
               q_seg == kv_seg if spec.has_segments else None])


def padding_mask(kv_pos, spec: MaskSpec):
  """Masks the padding keys of the last kv block (any kind), or None."""
  return kv_pos < spec.kv_len if spec.kv_is_ragged else None


def element_mask(q_pos, kv_pos, spec: MaskSpec, *, full, causal_offset=None,
                 q_seg=None, kv_seg=None, tile=None):
  """Visibility of the elements of listed blocks, or None when all visible.

  An element is visible when the key is not padding, the op's predicates
  hold, and the block is FULL or the layout's predicate holds.

  Args:
    q_pos: int query positions, broadcastable to the tile.
    kv_pos: int key positions, broadcastable to the tile.
    spec: the static mask description.
    full: bool (scalar or broadcastable): the block is FULL.
    causal_offset: int32 scalar (when spec.causal).
    q_seg: query segment ids (when spec.has_segments).
    kv_seg: key segment ids (when spec.has_segments).
    tile: bool tile from the pool (when spec.has_tiles).
  """
  partial = layout_mask(q_pos, kv_pos, spec, tile=tile)
  return _all([
      padding_mask(kv_pos, spec),
      op_mask(q_pos, kv_pos, spec, causal_offset=causal_offset, q_seg=q_seg,
              kv_seg=kv_seg),
      None if partial is None else partial | full,
  ])


def causal_tile_test(q_first, q_last, kv_first, kv_last, causal_offset):
  """(any, all): does kv - q <= offset hold somewhere / everywhere in a tile.

  The tile spans query positions [q_first, q_last] and key positions
  [kv_first, kv_last]; a tile with `any` False can be skipped, one with
  `all` True needs no causal mask.
  """
  return (kv_first - q_last <= causal_offset,
          kv_last - q_first <= causal_offset)


@_common.numpy_broadcasting
def causal_block_test(idx, causal_offset, *, rows_are_q: bool, block_q: int,
                      block_kv: int):
  """(any, all) bool [..., R, W]: `causal_tile_test` of block-list entries.

  `idx` [..., R, W] lists, per row, kv blocks of query block `row` (forward
  lists) or, with `rows_are_q=False`, query blocks of kv block `row`
  (transposed lists).
  """
  row = jnp.arange(idx.shape[-2], dtype=jnp.int32)[:, None]
  q_block, kv_block = (row, idx) if rows_are_q else (idx, row)
  return causal_tile_test(
      q_block * block_q, q_block * block_q + block_q - 1,
      kv_block * block_kv, kv_block * block_kv + block_kv - 1, causal_offset)


def causal_hidden_blocks(idx, causal_offset, *, rows_are_q: bool,
                         block_q: int, block_kv: int):
  """bool [..., R, W]: entries of block lists wholly above the diagonal."""
  visible, _ = causal_block_test(idx, causal_offset, rows_are_q=rows_are_q,
                                 block_q=block_q, block_kv=block_kv)
  return jnp.logical_not(visible)


def needs_mask(spec: MaskSpec, *, is_partial, is_last_kv_block, causal_all):
  """Whether a listed tile takes the masked path: a Python or traced bool.

  Args:
    spec: the static mask description.
    is_partial: bool scalar: the layout marks the block PARTIAL.
    is_last_kv_block: bool scalar: the tile holds the last kv block.
    causal_all: bool scalar from `causal_tile_test` (when spec.causal).
  """
  if spec.has_segments:
    return True
  need = False
  if spec.has_layout_mask:
    need = need | is_partial
  if spec.kv_is_ragged:
    need = need | is_last_kv_block
  if spec.causal:
    need = need | jnp.logical_not(causal_all)
  return need


def softmax_stats(s, axes):
  """Masked-safe softmax over `axes` of base-2 logits `s` (-inf: masked).

  Returns:
    p: unnormalised probabilities exp2(s - m), 0 where masked.
    l: their sum (keepdims), 0 for rows with nothing visible.
    lse: natural log-sum-exp (keepdims), -inf for rows with nothing visible.
  """
  m = _shift(jnp.max(s, axis=axes, keepdims=True))
  p = jnp.exp2(s - m)
  l = jnp.sum(p, axis=axes, keepdims=True)
  return p, l, _log_sum_exp(m, l)


# Only "nothing visible" is guarded (max exactly -inf, sum exactly 0); NaN or
# +inf inputs are left to propagate into the row's output and lse.
def _shift(m):
  """The row max to subtract: 0 for rows with nothing visible (m = -inf)."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def _log_sum_exp(shift, l):
  """Natural log of 2**shift * l, -inf for rows with nothing visible (l = 0)."""
  empty = l == 0
  lse2 = shift + jnp.log2(jnp.where(empty, 1.0, l))
  return jnp.where(empty, -jnp.inf, lse2 * _LN2)


def normalise(acc, l):
  """acc / l, 0 for rows that saw no key (l = 0); NaN rows stay NaN."""
  empty = l == 0
  return jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, l))


def probabilities(s, lse):
  """Probabilities from base-2 logits and the saved natural log-sum-exp."""
  return jnp.exp2(s - _shift(lse * _LOG2E))


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
    l_prev: f32 [..., R, 1] running sum of exp2(logits - m_prev).
    s: f32 [..., R, K] base-2 logits of the new tile, -inf where masked.

  Returns:
    m: updated row max [..., R, 1] (-inf while a row has seen nothing).
    l: updated row sum [..., R, 1].
    p: exp2(s - m) [..., R, K], 0 where masked.
    alpha: [..., R, 1] factor rescaling accumulators built under `m_prev`.
  """
  m = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  # A row with nothing visible so far keeps m = -inf; shifting by 0 instead
  # makes alpha = p = 0 there rather than NaN from (-inf) - (-inf).
  shift = _shift(m)
  alpha = jnp.exp2(m_prev - shift)
  p = jnp.exp2(s - shift)
  l = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  return m, l, p, alpha


def online_softmax_finish(m, l, acc):
  """Output and natural log-sum-exp [..., R, 1] from the streaming state.

  Rows that saw no key (l = 0) give output 0 and log-sum-exp -inf; a NaN
  (or +inf logit) seen by a row gives NaN there.
  """
  return normalise(acc, l), _log_sum_exp(_shift(m), l)


def backward_tile(dot, s, lse, dp, delta, spec: MaskSpec):
  """Gradient pieces of one tile, recomputed from the saved statistics.

  Args:
    dot: f32 [..., R, K] raw q.k products.
    s: f32 [..., R, K] masked base-2 logits (-inf where masked).
    lse: f32 [..., R, 1] saved natural log-sum-exp (-inf for rows that saw
      nothing).
    dp: f32 [..., R, K] dO.V^T.
    delta: f32 [..., R, 1] rowsum(dO * O).
    spec: the static mask description.

  Returns:
    p: normalised probabilities [..., R, K] (for dV = P^T dO).
    ds: d(loss)/d(natural logits) [..., R, K] (column sums: d(bias_k)).
    ddot: d(loss)/d(q.k) [..., R, K] (dQ = ddot K, dK = ddot^T Q).
  """
  p = probabilities(s, lse)
  ds = logits_cotangent(p, dp, delta)
  return p, ds, dot_cotangent(ds, dot, spec)
