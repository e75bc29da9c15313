"""DMA: trainable dynamic mask attention.

Paper: "Trainable Dynamic Mask Sparse Attention", Shi et al.,
https://arxiv.org/abs/2508.02124 (official code: SmallDoges/flash-dmattn).

Each kv head learns one importance score per key from the values of all kv
heads: dt = reshape(v, [B, S, Hkv * D]) @ W_dt, beta = A * softplus(dt)
(or exp of it, the paper's original "ZOH" form), A initialised to 0. The score
is (1) added to the attention logits of every kept key, after the 1/sqrt(D)
scaling, as a per-key bias with gradient, and (2) ranked, without gradient,
to keep only the `window` best keys per query once the context is longer
than the window:

- "per_row" (original Doge code): row i keeps the top-w of keys 0..i, so it
  always holds min(i + 1, w) keys.
- "query_agnostic" (current integration): one top-w over all keys, shared by
  every query, then causality; early rows may keep no key at all (their
  output is 0, never NaN). The two variants are not interchangeable: a model
  is trained with one of them.

With `granularity="element"` the exact selection reaches the op as a
`RowLayout` (key lists, never an S x S mask). "per_row" lists, for each
group of `block_size` queries, the group's own keys plus the top-w of the
keys before it (Kmax = w + group; row ranges say which rows see which key);
neighbouring rows share almost all of their w keys, so one gathered list
serves the whole group. "query_agnostic" lists the same w keys for every
group (Kmax = w) and leaves causality to the op. With `granularity="block"`,
each key block is kept iff more than half of its keys were selected ("block
smoothing"): a `BlockLayout` whose op skips whole tiles and needs no element
mask beyond the causal diagonal.

Ablation, not the paper: `local_keys` = r > 0 splits the w keys of a row
into a sliding window and a learned part. Row i keeps its r most recent keys
max(0, i - r + 1)..i plus the top-(w - r) of the older keys 0..i - r by
beta (r = w is a sliding window with DMA's bias). It exists to measure how
much of the window's advantage is recency alone.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse.masks import selection
from jsparse.methods import base
from pallas_kernels import RowLayout
from pallas_kernels import layout as layout_lib

PER_ROW = "per_row"
QUERY_AGNOSTIC = "query_agnostic"
ELEMENT = "element"
BLOCK = "block"


@dataclasses.dataclass(frozen=True)
class DMAConfig:
  """DMA hyperparameters.

  Attributes:
    num_kv_heads: Hkv, the number of importance scores per key.
    head_dim: D of the values (W_dt is [Hkv * D, Hkv]).
    window: w, keys kept per query once the context is longer than w
      (2048 in DogeConfig).
    variant: "per_row" (causal top-w of each row's prefix) or
      "query_agnostic" (one top-w over all keys, then causal).
    granularity: "element" (exact selection, row-sparse lists) or "block"
      (block-smoothed mask, whole tiles skipped).
    exp_bias: beta = exp(A * softplus(dt)) (paper, Aug 2025) instead of
      A * softplus(dt) (current code, default).
    dt_bias: a bias in the dt projection (Doge's `attention_bias`).
    causal: causal attention (decoders). `per_row` requires it.
    block_size: layout block size, and the query group of the row lists
      (clipped to the sequence length).
    local_keys: r, an ablation (not in the paper): each row keeps its r most
      recent keys plus the top-(w - r) of the older ones; 0 (default) is the
      paper's method, w a sliding window. Needs per_row and element.
  """

  num_kv_heads: int = 2
  head_dim: int = 64
  window: int = 2048
  variant: str = PER_ROW
  granularity: str = ELEMENT
  exp_bias: bool = False
  dt_bias: bool = False
  causal: bool = True
  block_size: int = 128
  local_keys: int = 0


def _check_local_keys(config: DMAConfig) -> None:
  """Raises ValueError unless local_keys is 0 or a valid ablation setting."""
  r = config.local_keys
  if not 0 <= r <= config.window:
    raise ValueError(
        f"local_keys must lie in [0, window={config.window}], got {r}")
  if r and (config.variant, config.granularity) != (PER_ROW, ELEMENT):
    raise ValueError(
        f"local_keys > 0 needs variant={PER_ROW!r} and granularity="
        f"{ELEMENT!r}, got {config.variant!r} and {config.granularity!r}")


def _recent_slots(s: int, r: int, group: int):
  """The r-key sliding window of every query group, as slots.

  The group of rows a..a+R-1 lists the keys a - r + m, m = 0..R + r - 1;
  key j is seen by rows i with i - r < j <= i, i.e. the group's rows
  [m - r, m) clipped to [0, R). Keys outside [0, S) are padding (S).

  Returns:
    kv_idx, row_start, row_end int32 [Qg, R + r], Qg = ceil(S / R).
  """
  qg = layout_lib.cdiv(s, group)
  m = jnp.arange(group + r, dtype=jnp.int32)
  keys = (jnp.arange(qg, dtype=jnp.int32)[:, None] * group - r + m[None, :])
  kv_idx = jnp.where((keys >= 0) & (keys < s), keys, s)
  start = jnp.broadcast_to(jnp.clip(m - r, 0, group), kv_idx.shape)
  end = jnp.broadcast_to(jnp.clip(m, 0, group), kv_idx.shape)
  return kv_idx, start, end


def _shifted_scores(scores: jax.Array, r: int) -> jax.Array:
  """[..., S] scores moved r keys later; the r first are worse than any key.

  Real scores are clipped one step above the f32 minimum, which the r
  placeholders take, so a placeholder is only chosen when too few keys are.
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  low = jnp.finfo(jnp.float32).min
  scores = jnp.maximum(scores, jnp.nextafter(low, jnp.float32(0)))
  pad = jnp.full((*scores.shape[:-1], r), low)
  return jnp.concatenate([pad, scores[..., :scores.shape[-1] - r]], -1)


def local_topk_rows(scores: jax.Array, window: int, r: int, group: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The `local_keys` ablation as row-sparse lists, without an S x S array.

  Row i keeps keys max(0, i - r + 1)..i and the top-(w - r) of keys
  0..i - r: the per-row prefix top-(w - r) of the scores shifted r keys
  later (`selection.prefix_topk_rows`, key j + r standing for key j). Its
  list for the group a..a+R-1 holds keys a - r..a - r + R - 1 (the shifted
  group), seen from their first row in the window (m - r) to the row they
  leave the top (a key leaves the window exactly when it enters the top
  part), then the r keys a - r + R.. that are only in the window, then the
  shifted top(a - 1).

  Args:
    scores: [..., S] per-key scores (no gradient flows through the choice).
    window: w, keys kept per row.
    r: recent keys per row, 1 <= r <= w.
    group: R, query rows sharing one list.

  Returns:
    kv_idx int32 [..., Qg, R + r + min(w - r, S)] (S: padding), kv_cnt
    int32 [..., Qg], row_start, row_end int32 [..., Qg, Kmax]: as
    `selection.prefix_topk_rows`.
  """
  lead, s = scores.shape[:-1], scores.shape[-1]
  recent = _recent_slots(s, r, group)
  wide = lambda x: jnp.broadcast_to(x, (*lead, *x.shape))
  kv_idx, start, end = (wide(x) for x in recent)
  qg = kv_idx.shape[-2]
  if r == window:
    return (kv_idx, jnp.full((*lead, qg), kv_idx.shape[-1], jnp.int32), start,
            end)
  top_idx, top_cnt, _, top_end = selection.prefix_topk_rows(
      _shifted_scores(scores, r), window - r, group)
  old = top_idx[..., group:] - r
  kv_idx = jnp.concatenate([kv_idx, jnp.where(old >= 0, old, s)], -1)
  start = jnp.concatenate([start, jnp.zeros_like(old)], -1)
  end = jnp.concatenate([top_end[..., :group], end[..., group:],
                         top_end[..., group:]], -1)
  return kv_idx, top_cnt + r, start, end


class DMAMethod(base.SparseMethod):
  """Value-derived per-key bias plus top-w key selection.

  Attributes:
    dt_proj: nnx.Linear W_dt [Hkv * D, Hkv] (+ bias with `dt_bias`).
    a: nnx.Param A [Hkv], initialised to 0.
  """

  def __init__(self, config: DMAConfig = DMAConfig(), *, rngs: nnx.Rngs):
    if config.variant not in (PER_ROW, QUERY_AGNOSTIC):
      raise ValueError(
          f"variant must be {PER_ROW!r} or {QUERY_AGNOSTIC!r}, got "
          f"{config.variant!r}")
    if config.granularity not in (ELEMENT, BLOCK):
      raise ValueError(
          f"granularity must be {ELEMENT!r} or {BLOCK!r}, got "
          f"{config.granularity!r}")
    if config.variant == PER_ROW and not config.causal:
      raise ValueError("the per_row variant is defined for causal attention")
    if config.window < 1:
      raise ValueError(f"window must be positive, got {config.window}")
    _check_local_keys(config)
    self.config = config
    hkv = config.num_kv_heads
    self.dt_proj = nnx.Linear(hkv * config.head_dim, hkv,
                              use_bias=config.dt_bias, rngs=rngs)
    self.a = nnx.Param(jnp.zeros((hkv,), jnp.float32))

  def key_bias(self, v: jax.Array) -> jax.Array:
    """The per-key logit bias beta.

    Args:
      v: [B, S, Hkv, D] values.

    Returns:
      f32 [B, Hkv, S]; differentiable in v, W_dt and A.
    """
    b, s, hkv, d = v.shape
    if (hkv, d) != (self.config.num_kv_heads, self.config.head_dim):
      raise ValueError(
          f"v has Hkv={hkv}, D={d} but DMAConfig says num_kv_heads="
          f"{self.config.num_kv_heads}, head_dim={self.config.head_dim}")
    dt = self.dt_proj(v.reshape(b, s, hkv * d).astype(jnp.float32))
    beta = self.a[...][None, None, :] * jax.nn.softplus(dt)
    if self.config.exp_bias:
      beta = jnp.exp(beta)
    return jnp.transpose(beta, (0, 2, 1))

  def selection_layout(self, scores: jax.Array) -> RowLayout:
    """The exact ("element") top-w selection as row-sparse lists.

    Args:
      scores: [B, Hkv, S] key scores (the choice gets no gradient).

    Returns:
      A RowLayout [B, Hkv] with group_size = min(block_size, S): for
      "per_row" the group's keys and the top-w of the keys before it, with
      row ranges (causality included; with `local_keys`, see
      `local_topk_rows`); for "query_agnostic" the w best keys for every
      group, no row ranges (the op applies causality).
    """
    cfg = self.config
    s = scores.shape[-1]
    group = min(cfg.block_size, s)
    if cfg.variant == PER_ROW:
      if cfg.local_keys:
        rows = local_topk_rows(scores, cfg.window, cfg.local_keys, group)
      else:
        rows = selection.prefix_topk_rows(scores, cfg.window, group)
      kv_idx, kv_cnt, row_start, row_end = rows
      return RowLayout.from_indices(kv_idx, kv_cnt, num_keys=s,
                                    group_size=group, row_start=row_start,
                                    row_end=row_end)
    idx, cnt = selection.topk_keys(scores, cfg.window)
    groups = layout_lib.cdiv(s, group)
    return RowLayout.from_indices(
        jnp.broadcast_to(idx[:, :, None], (*idx.shape[:2], groups,
                                           idx.shape[-1])),
        jnp.broadcast_to(cnt[:, :, None], (*cnt.shape, groups)),
        num_keys=s, group_size=group)

  def plan(self, q, k, v, **kwargs) -> base.SparsePlan:
    """Plans self-attention over S = T tokens.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (after norms and RoPE).
      **kwargs: unused call-time context.

    Returns:
      A SparsePlan with bias_k [B, Hkv, T] and a layout that is the static
      (causal) dense one when T <= window, else the traced top-w layout
      (`selection_layout`, or the block-smoothed BlockLayout).
    """
    del kwargs
    cfg = self.config
    t, s = q.shape[1], k.shape[1]
    if t != s:
      raise ValueError(
          f"DMA plans self-attention (T == S), got T={t}, S={s}; use "
          "decode_plan against a cache")
    beta = self.key_bias(v)
    block = min(cfg.block_size, s)
    if s <= cfg.window:
      if cfg.causal:
        layout = layout_lib.BlockLayout.causal(s, block_q=block,
                                               block_kv=block)
      else:
        layout = layout_lib.BlockLayout.dense(s, s, block_q=block,
                                              block_kv=block)
      return base.SparsePlan(layout=layout, bias_k=beta)
    scores = jax.lax.stop_gradient(beta)
    if cfg.granularity == ELEMENT:
      return base.SparsePlan(layout=self.selection_layout(scores),
                             bias_k=beta, causal=cfg.causal)
    return base.SparsePlan(layout=self._block_layout(scores, block),
                           bias_k=beta)

  def _block_layout(self, scores, block):
    """Block-smoothed layout: per query block, majority vote per key block."""
    cfg = self.config
    s = scores.shape[-1]
    if cfg.variant == PER_ROW:
      # A query block uses the selection of its last row (its whole prefix).
      values, idx = selection.prefix_topk_states(scores, cfg.window, block)
      idx, valid = idx[..., 1:, :], values[..., 1:, :] > -jnp.inf
    else:
      idx, cnt = selection.topk_keys(scores, cfg.window)
      valid = jnp.arange(idx.shape[-1])[None, None, :] < cnt[..., None]
      idx, valid = idx[:, :, None], valid[:, :, None]
    kb = layout_lib.cdiv(s, block)
    keep = jnp.broadcast_to(selection.block_majority(idx, valid, s, block),
                            (*scores.shape[:2], kb, kb))
    # A kept block holds block // 2 + 1 of the w keys (+1: a ragged block).
    kmax = min(kb, cfg.window // (block // 2 + 1) + 1)
    if not cfg.causal:
      return layout_lib.BlockLayout.from_block_mask(
          keep, block, block, full_block_mask=jnp.ones_like(keep),
          max_kv_blocks=kmax)
    kind = layout_lib.BlockLayout.causal(s, block_q=block,
                                         block_kv=block).to_block_mask()
    allowed = jnp.asarray(kind != layout_lib.EMPTY)
    full = jnp.asarray(kind == layout_lib.FULL)
    return layout_lib.BlockLayout.from_block_mask(
        keep & allowed, block, block, full_block_mask=full,
        max_kv_blocks=kmax, band=(None, 0))

  def decode_plan(self, q, k, v, *, index) -> base.SparsePlan:
    """One query at position `index` over the cache: top-w of keys <= index.

    Both variants coincide here (no key lies after the query). With
    `local_keys` = r: keys index - r + 1..index and the top-(w - r) of the
    keys <= index - r.

    Args:
      q: [B, 1, Hq, D]; k, v: [B, S_max, Hkv, D] caches.
      index: int32 scalar (may be traced), the query's position.

    Returns:
      A SparsePlan with a traced RowLayout (one row, Kmax = w) and bias_k
      [B, Hkv, S_max].
    """
    del q, k
    cfg = self.config
    beta = self.key_bias(v)
    b, hkv, s = beta.shape
    r = cfg.local_keys
    recent = index - r + 1 + jnp.arange(r, dtype=jnp.int32)
    idx = jnp.broadcast_to(jnp.where(recent >= 0, recent, s), (b, hkv, r))
    cnt = jnp.full((b, hkv), r, jnp.int32)
    if r < cfg.window:
      top, top_cnt = selection.topk_keys(
          jax.lax.stop_gradient(beta), cfg.window - r,
          valid=(jnp.arange(s) <= index - r)[None, None, :])
      idx, cnt = jnp.concatenate([idx, top], -1), cnt + top_cnt
    layout = RowLayout.from_indices(idx[:, :, None], cnt[:, :, None],
                                    num_keys=s)
    return base.SparsePlan(layout=layout, bias_k=beta)
