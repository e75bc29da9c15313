"""SEA: sparse linear attention with an estimated attention mask.

Paper: "SEA: Sparse Linear Attention with Estimated Attention Mask",
https://arxiv.org/abs/2310.01777 (ICLR 2024; code: gmlwns2000/sea-attention).

A kernel (Performer) linear attention whose values carry a positional code
feeds a small encoder and a CNN decoder that predict a compressed attention
map of fixed width T_M per query (logits S_hat [B, H, T, T_M]). A top-k over
the compressed cells, with the budget shared across heads, is stretched
back to the key axis: key j of a row with visible length L owns cell
floor((j + 0.5) T_M / L - 1e-4), so each kept cell is a run of about L / T_M
consecutive keys, and the row's keys are the union of its runs. Exact
softmax attention runs on those keys. Two gates scale the sparse output and
mix it with an average of the values. The compressed map is returned in
`plan.aux["estimate"]` for interpretability, and the distillation losses are
functions of it (the training loop lives elsewhere).

Execution format: a per-row `RowLayout` (one key list per batch, query head
and row, group_size 1). The cells are picked per row from a
content-dependent estimate and their runs move with the row length, so
neighbouring rows share neither cells nor run boundaries in general: a
shared group list would be the union of unrelated picks, and a block layout
would need an element mask in every tile.

Capacity: each list holds Kmax = `SEAConfig.key_capacity(S)` keys (default
2k, twice a head's average share of the grouped budget). Row t spends them
as C_t = floor(Kmax / R_t) slots of R_t keys, R_t the longest run of the
row; a slot past the end of a shorter run is padding (index S, not listed).
The budget is shared across heads, so a head can win more than C_t cells:
it keeps its C_t highest-scoring ones and the budget of the rest is lost
(as the budget of cells that own no key already is).

Cost: the estimator is O(T (T_M H s + F D)) (chunked causal linear
attention, convolutions over the T x T_M/d image), the selection O(T H T_M)
(exact per-row thresholds by bisection on the float bits, no sort), the
lists O(T H Kmax) and the attention O(T H Kmax D). Nothing on the attention
path is T x S; `element_mask` and `stretched_logits` build T x S views for
inspection and for the distillation losses only.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse.masks import top_n
from jsparse.methods import base
from pallas_kernels import row_layout as row_layout_lib

_BIG = 1e9
# Query rows per step of the chunked causal linear attention.
_LINEAR_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class SEAConfig:
  """SEA hyperparameters (defaults: the OPT causal setting).

  Attributes:
    causal: OPT-style causal LM (True) or BERT-style encoder (False).
    predictor_len: T_M, the compressed key width.
    topk: k, average kept keys per query per head.
    feature_divisor: nbf; the Performer has floor(D ln D / nbf) features.
    max_positions: rows of the learned positional table (causal).
    width_divisor: d, the CNN works at width T_M / d (4 causal, 2 not).
    channels_per_head: s, CNN channels per head (2 causal, 4 not).
    output: "mix" (gated sparse output mixed with the value average) or
      "sparse" (the plain sparse attention output).
    max_keys: optional static cap Kmax of listed keys per head and row
      (default: see `key_capacity`).
  """

  causal: bool = True
  predictor_len: int = 256
  topk: int = 64
  feature_divisor: int = 8
  max_positions: int = 2048
  width_divisor: int = 4
  channels_per_head: int = 2
  output: str = "mix"
  max_keys: int | None = None

  def key_capacity(self, kv_len: int) -> int:
    """Kmax, the static length of every key list, for S = `kv_len` keys.

    `max_keys` if given, else max(2 k, longest run), never more than S. The
    longest run of one cell is at most ceil(S / T_M) + 1 keys (+1 for the
    float rounding of the stretch rule), so every row fits a cell.

    Raises:
      ValueError: if `max_keys` cannot hold the longest run.
    """
    longest = min(kv_len, -(-kv_len // self.predictor_len) + 1)
    if self.max_keys is None:
      return min(kv_len, max(2 * self.topk, longest))
    if self.max_keys < longest:
      raise ValueError(
          f"max_keys must be >= {longest} (the longest run of keys one cell "
          f"covers at S={kv_len}, T_M={self.predictor_len}), got "
          f"{self.max_keys}")
    return min(kv_len, self.max_keys)


def owner_cell(key_pos: jax.Array, visible_len, predictor_len: int
               ) -> jax.Array:
  """Cell of the compressed map owning each key (the stretch rule).

  Args:
    key_pos: int key positions, broadcastable against `visible_len`.
    visible_len: L of each row (causal: query position + 1).
    predictor_len: T_M.

  Returns:
    int32 cell ids floor((j + 0.5) T_M / L - 1e-4), clipped to [0, T_M)
    (meaningful for keys j < L).
  """
  length = jnp.maximum(jnp.asarray(visible_len, jnp.float32), 1.0)
  cell = jnp.floor((key_pos + 0.5) * predictor_len / length - 1e-4)
  return jnp.clip(cell, 0, predictor_len - 1).astype(jnp.int32)


def row_lengths(q_len: int, kv_len: int, causal: bool) -> jax.Array:
  """int32 [T]: visible length L of each row (t + 1 causal, else S)."""
  if causal:
    return jnp.arange(1, q_len + 1, dtype=jnp.int32)
  return jnp.full((q_len,), kv_len, jnp.int32)


def run_start(cell: jax.Array, visible_len, predictor_len: int
              ) -> jax.Array:
  """First key of cell `cell`'s run: #{j < L: owner_cell(j) < cell}.

  Elementwise; cell = T_M gives L. The float guess from inverting the
  stretch rule is off by at most one key and is corrected with the rule
  itself, so runs agree with `owner_cell` exactly.

  Args:
    cell: int cell ids in [0, T_M], broadcastable against `visible_len`.
    visible_len: int L of each row.
    predictor_len: T_M.
  """
  length = jnp.asarray(visible_len, jnp.int32)
  guess = jnp.ceil((cell + 1e-4) * length.astype(jnp.float32)
                   / predictor_len - 0.5)
  # Cell 0 also owns the keys the rule clips up from negative cells.
  start = jnp.where(cell == 0, 0, jnp.clip(guess, 0, length)).astype(
      jnp.int32)
  owner = lambda j: owner_cell(j, length, predictor_len)
  start = start - ((start > 0) & (owner(start - 1) >= cell))
  return start + ((start < length) & (owner(start) < cell))


def cell_runs(visible_len: jax.Array, predictor_len: int
              ) -> tuple[jax.Array, jax.Array]:
  """The run of keys each cell owns under the stretch rule.

  Args:
    visible_len: int [...] L of each row.
    predictor_len: T_M.

  Returns:
    (start, length) int32 [..., T_M]: cell c of a row owns keys
    start[c] .. start[c] + length[c] - 1 (length 0: no key).
  """
  length = jnp.asarray(visible_len)[..., None]
  cells = jnp.arange(predictor_len + 1, dtype=jnp.int32).reshape(
      (1,) * (length.ndim - 1) + (-1,))
  start = run_start(cells, length, predictor_len)
  return start[..., :-1], jnp.diff(start, axis=-1)


def _row_geometry(q_len: int, kv_len: int, causal: bool, predictor_len: int):
  """(cell [1, 1, T, S], visible [1, 1, T, S]) of the stretch rule."""
  qp = jnp.arange(q_len).reshape(1, 1, q_len, 1)
  kp = jnp.arange(kv_len).reshape(1, 1, 1, kv_len)
  length = qp + 1 if causal else kv_len
  visible = kp < length
  return owner_cell(kp, length, predictor_len), visible


def stretch(cells: jax.Array, kv_len: int, causal: bool) -> jax.Array:
  """Maps per-cell values [B, H, T, T_M] to keys [B, H, T, S] (no fill)."""
  t, tm = cells.shape[-2], cells.shape[-1]
  cell, _ = _row_geometry(t, kv_len, causal, tm)
  return jnp.take_along_axis(cells, jnp.broadcast_to(
      cell, cells.shape[:-1] + (kv_len,)), axis=-1)


def _cuts(key, count, owns, group_count):
  """`top_n.threshold` over rows of int32 keys [R, G, C] and their groups.

  Each row's `count` best entries are searched over its flat index
  (g C + c), and each group's `group_count[g]` best entries among those
  where `owns` holds as well. Rows go in cache-sized chunks, so the passes
  of both searches read the chunk from cache.

  Args:
    key: int32 [R, G, C].
    count: int32 [R] in [0, G C].
    owns: bool [R, 1|G, C] entries that compete within their group.
    group_count: int32 [R, G] in [0, C].

  Returns:
    (thr [R], cut [R], thr [R, G], cut [R, G]).
  """

  def row(args):
    key, n, own, n_g = args
    return top_n.threshold(key.reshape(-1), n) + top_n.threshold(
        jnp.where(own, key, top_n.MIN_KEY), n_g)

  return top_n.in_chunks(row, (key, count, owns, group_count), key[0].size)


def _budget(num_heads: int, topk: int, predictor_len: int, q_len: int
            ) -> jax.Array:
  """int32 [T]: causal K_t = clip(round(H k T_M / (t + 1)), 1, H T_M)."""
  budget = jnp.round(num_heads * topk * predictor_len
                     / (jnp.arange(q_len) + 1.0))
  return jnp.clip(budget, 1, num_heads * predictor_len).astype(jnp.int32)


def grouped_topk(estimate: jax.Array, topk: int, causal: bool) -> jax.Array:
  """Selected cells with the budget shared across heads (no gradient).

  Causal: per (batch, row) keep the best K_t = clip(round(H k T_M / L_t), 1,
  H T_M) cells of (H, T_M), L_t = t + 1. Non-causal: per sample keep the
  best H k T_M cells of (H, T, T_M). Ties go to the lower flat index.
  O(B T H T_M) time and memory.

  Args:
    estimate: [B, H, T, T_M] scores (probabilities or logits).
    topk: k.
    causal: the grouping mode.

  Returns:
    bool [B, H, T, T_M].
  """
  b, h, t, tm = estimate.shape
  if causal:
    flat = jnp.moveaxis(estimate, 1, 2).reshape(b, t, h * tm)
    keep = top_n.top_n_mask(flat, _budget(h, topk, tm, t))
    return jnp.moveaxis(keep.reshape(b, t, h, tm), 2, 1)
  keep = top_n.top_n_mask(estimate.reshape(b, h * t * tm),
                          min(h * topk * tm, h * t * tm))
  return keep.reshape(b, h, t, tm)


def select_cells(estimate: jax.Array, topk: int, causal: bool,
                 visible_len: jax.Array, capacity: int, *,
                 head_axis: int = 1) -> jax.Array:
  """The cells each key list keeps: grouped top-k under a per-head cap.

  The grouped top-k of `grouped_topk`, of which row t of each head keeps
  its C_t = floor(capacity / R_t) best selected cells that own a key (R_t:
  the row's longest run; cells owning no key are dropped). Both thresholds
  come from one search pass (`_cuts`): the kept cells of a head are a prefix
  of its cells in score order, so the cap is the head's C_t best owning
  cells, intersected with the grouped selection.

  Args:
    estimate: [B, H, T, T_M] scores, or [B, T, H, T_M] with head_axis=2
      (the causal search reads rows (b, t) and needs no transpose then).
    topk: k.
    causal: the grouping mode.
    visible_len: int [T] L of each row.
    capacity: Kmax.
    head_axis: 1 or 2, where the heads are.

  Returns:
    bool, in the layout of `estimate`.
  """
  if head_axis not in (1, 2):
    raise ValueError(f"head_axis must be 1 ([B, H, T, T_M]) or 2 "
                     f"([B, T, H, T_M]), got {head_axis!r}")
  b, tm = estimate.shape[0], estimate.shape[3]
  h, t = estimate.shape[head_axis], estimate.shape[3 - head_axis]
  with jax.ensure_compile_time_eval():  # constants for static row lengths
    _, length = cell_runs(visible_len, tm)  # [T, T_M]
    owns = length > 0
    per_head = jnp.minimum(capacity // length.max(-1), tm)  # C_t [T]
  key = top_n.order_keys(estimate)
  if causal:  # rows (b, t), groups: heads
    rows = jnp.moveaxis(key, head_axis, 2).reshape(b * t, h, tm)
    count = jnp.broadcast_to(_budget(h, topk, tm, t), (b, t))
    owns = jnp.broadcast_to(owns[None, :, None], (b, t, 1, tm))
    group_count = jnp.broadcast_to(per_head[None, :, None], (b, t, h))
  else:  # rows: samples, groups: (head, query)
    rows = jnp.moveaxis(key, head_axis, 1).reshape(b, h * t, tm)
    count = jnp.full((b,), min(h * topk * tm, h * t * tm), jnp.int32)
    owns = jnp.broadcast_to(owns[:1], (b, 1, tm))
    group_count = jnp.broadcast_to(per_head, (b, h, t))
  r = rows.shape[0]
  owns = owns.reshape(r, 1, tm)
  thr, cut, thr_g, cut_g = _cuts(rows, count.reshape(r), owns,
                                 group_count.reshape(r, -1))
  selected = top_n.chosen(rows.reshape(r, -1), thr, cut).reshape(rows.shape)
  best = top_n.chosen(jnp.where(owns, rows, top_n.MIN_KEY), thr_g, cut_g)
  kept = selected & best & owns
  if causal:
    return jnp.moveaxis(kept.reshape(b, t, h, tm), 2, head_axis)
  return jnp.moveaxis(kept.reshape(b, h, t, tm), 1, head_axis)


def key_lists(kept: jax.Array, visible_len: jax.Array, capacity: int,
              num_keys: int) -> tuple[jax.Array, jax.Array]:
  """The runs of the kept cells as padded key lists.

  Row t lists its kept cells in key order, one slot of R_t keys each (R_t:
  the row's longest run); slots past the end of a shorter run hold the
  padding index `num_keys` (not listed).

  Args:
    kept: bool [B, H, T, T_M] with at most floor(capacity / R_t) cells per
      row (`select_cells`).
    visible_len: int [T] L of each row.
    capacity: Kmax.
    num_keys: S.

  Returns:
    kv_idx int32 [B, H, T, Kmax] and kv_cnt int32 [B, H, T].
  """
  tm = kept.shape[-1]
  with jax.ensure_compile_time_eval():  # a constant for static row lengths
    length = jnp.asarray(visible_len, jnp.int32)
    longest = cell_runs(length, tm)[1].max(-1)  # R_t [T]
  length, longest = (x.reshape(1, 1, -1, 1) for x in (length, longest))
  slot = jnp.arange(capacity, dtype=jnp.int32).reshape(1, 1, 1, -1)
  # slot // R_t as a float division, which vectorises (int division does
  # not); exact while Kmax < 2^23, as slot + 0.5 is 0.5 from any multiple.
  if capacity < 1 << 23:
    which = jnp.floor((slot + 0.5) / longest).astype(jnp.int32)
  else:
    which = slot // longest
  offset = slot - which * longest  # [1, 1, T, Kmax]
  cell, count = top_n.nth_set(kept, which)
  first = run_start(cell, length, tm)
  run = run_start(cell + 1, length, tm) - first
  valid = (which < count[..., None]) & (offset < run)
  kv_idx = jnp.where(valid, first + offset, num_keys)
  kv_cnt = jnp.minimum(count * longest[..., 0], capacity)
  return kv_idx.astype(jnp.int32), kv_cnt.astype(jnp.int32)


def element_mask(selected: jax.Array, kv_len: int, causal: bool
                 ) -> jax.Array:
  """bool [B, H, T, S]: key j kept iff it is visible and its cell is kept.

  A T x S view of a selection, for inspection and tests only.
  """
  t, tm = selected.shape[-2:]
  _, visible = _row_geometry(t, kv_len, causal, tm)
  return stretch(selected, kv_len, causal) & visible


def _prefix_sum(x: jax.Array, axis: int) -> jax.Array:
  """Inclusive prefix sum along `axis` as a parallel scan (O(n log n)).

  XLA:CPU lowers `jnp.cumsum` to a reduce-window over the whole axis, about
  2x the time of this scan for SEA's chunk states and running means.
  """
  return jax.lax.associative_scan(jnp.add, x, axis=axis)


def _causal_linear(fq: jax.Array, fk: jax.Array, v: jax.Array):
  """sum_{j <= t} (fq_t . fk_j) [v_j, 1], chunk by chunk.

  Inside a chunk of C rows the products are a masked C x C matrix; across
  chunks an exclusive prefix sum of per-chunk fk^T v states carries the
  past: O(T (C + F) E) work and O(T F E / C) memory instead of a [T, F, E]
  prefix sum.

  Args:
    fq, fk: [B, H, T, F] non-negative features; v: [B, H, T, E].

  Returns:
    (num [B, H, T, E], den [B, H, T]).
  """
  b, h, t, f = fq.shape
  c = min(_LINEAR_CHUNK, t)
  n = -(-t // c)
  pad = ((0, 0), (0, 0), (0, n * c - t), (0, 0))
  fq, fk, v = (jnp.pad(x, pad).reshape(b, h, n, c, x.shape[-1])
               for x in (fq, fk, v))
  shift = lambda x: _prefix_sum(
      jnp.concatenate([jnp.zeros_like(x[:, :, :1]), x[:, :, :-1]], 2), 2)
  state = shift(jnp.einsum("bhncf,bhnce->bhnfe", fk, v))
  norm = shift(fk.sum(-2))  # [B, H, N, F]
  inner = jnp.einsum("bhncf,bhndf->bhncd", fq, fk) * jnp.tril(
      jnp.ones((1, 1, 1, c, c), fq.dtype))
  num = (jnp.einsum("bhncd,bhnde->bhnce", inner, v)
         + jnp.einsum("bhncf,bhnfe->bhnce", fq, state))
  den = inner.sum(-1) + jnp.einsum("bhncf,bhnf->bhnc", fq, norm)
  return (num.reshape(b, h, n * c, -1)[:, :, :t],
          den.reshape(b, h, n * c)[:, :, :t])


def _performer(q, k, v, omega, causal: bool):
  """Linear-attention estimate [B, H, T, E] of softmax(q k^T) v (fp32).

  Causal: ReLU random features with prefix sums; non-causal: FAVOR+
  positive softmax features.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  num_features = omega.shape[0]
  if causal:
    fq = jax.nn.relu(q @ omega.T) + 1e-3
    fk = jax.nn.relu(k @ omega.T) + 1e-3
    num, den = _causal_linear(fq, fk, v)
  else:
    scale = q.shape[-1] ** -0.25

    def features(x):
      x = x * scale
      proj = x @ omega.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)
      return jnp.exp(proj - jax.lax.stop_gradient(
          proj.max(-1, keepdims=True))) / math.sqrt(num_features)

    fq, fk = features(q), features(k)
    num = jnp.einsum("bhtf,bhfe->bhte", fq, jnp.einsum("bhsf,bhse->bhfe",
                                                        fk, v))
    den = jnp.einsum("bhtf,bhf->bht", fq, fk.sum(-2))
  return num / jnp.maximum(den, 1e-6)[..., None]


class _CausalConv(nnx.Module):
  """3x3 conv over (query, cell) whose taps see only current/earlier rows."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), kernel_dilation=(2, 2),
                         padding="VALID", rngs=rngs)

  def __call__(self, x):  # [B, T, W, C]
    x = jnp.pad(x, ((0, 0), (4, 0), (2, 2), (0, 0)))
    return self.conv(x)


class SEAMethod(base.SparseMethod):
  """SEA's estimator (trainable) + grouped top-k mask + sparse attention."""

  def __init__(self, config: SEAConfig, num_heads: int, head_dim: int, *,
               rngs: nnx.Rngs):
    """Builds the estimator.

    Args:
      config: the SEA config.
      num_heads: H (query heads; kv heads are repeated for the estimator).
      head_dim: D.
      rngs: parameter and random-feature RNGs.
    """
    if config.output not in ("mix", "sparse"):
      raise ValueError(f"output must be 'mix' or 'sparse', got "
                       f"{config.output!r}")
    if config.predictor_len % config.width_divisor:
      raise ValueError("predictor_len must be a multiple of width_divisor")
    if config.max_keys is not None and (
        not isinstance(config.max_keys, int) or config.max_keys < 1):
      raise ValueError(f"max_keys must be None or an int >= 1, got "
                       f"{config.max_keys!r}")
    self.config = config
    self.num_heads = num_heads
    d, h, s = head_dim, num_heads, config.channels_per_head
    features = max(int(d * math.log(d) / config.feature_divisor), 1)
    self.omega = nnx.Variable(jax.random.normal(rngs.params(),
                                                (features, d)))
    if config.causal:
      self.positions = nnx.Param(jax.random.normal(
          rngs.params(), (config.max_positions, d)))
    else:
      self.positions = nnx.data(None)
    self.encoder = nnx.Linear(3 * d, 2 * d, rngs=rngs)
    self.encoder_norm = nnx.LayerNorm(2 * d, rngs=rngs)
    width = config.predictor_len // config.width_divisor
    self.row_decoder = nnx.Linear(2 * d, s * width, rngs=rngs)
    self.gates = nnx.Linear(2 * d, 2, rngs=rngs)
    if config.causal:
      self.width_norm = nnx.LayerNorm(width, rngs=rngs)
      self.convs = nnx.List([_CausalConv(h * s, rngs=rngs),
                             _CausalConv(h * s, rngs=rngs)])
      self.head_mix = nnx.Conv(h * s, h, (1, 1), rngs=rngs)
    else:
      self.convs = nnx.List([
          nnx.Conv(h * s, h * s, (3, 3), strides=(2, 1), rngs=rngs),
          nnx.Conv(h * s, h * s, (3, 3), rngs=rngs)])
      self.head_mix = nnx.Conv(h * s, h, (3, 3), rngs=rngs)
    self.out_norm = nnx.LayerNorm(config.predictor_len, use_bias=False,
                                  rngs=rngs)

  def redraw(self, rngs: nnx.Rngs) -> None:
    """Redraws the Performer's random projection (every 1000 steps)."""
    self.omega.value = jax.random.normal(rngs.params(),
                                         self.omega.value.shape)

  def _positional_code(self, t: int, d: int) -> jax.Array:
    if self.config.causal:
      return self.positions[...][:t]
    # Bilinear sample of the identity rows at u = i / (T - 1).
    u = jnp.arange(t) / max(t - 1, 1) * (d - 1)
    lo = jnp.floor(u).astype(jnp.int32)
    frac = (u - lo)[:, None]
    eye = jnp.eye(d)
    return (1 - frac) * eye[lo] + frac * eye[jnp.minimum(lo + 1, d - 1)]

  def estimate(self, q: jax.Array, k: jax.Array, v: jax.Array):
    """The compressed attention logits and the gate logits.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] (self-attention: S = T).

    Returns:
      (logits f32 [B, H, T, T_M], gates f32 [B, H, T, 2]).
    """
    logits, gates = self._estimate(q, k, v)
    return jnp.moveaxis(logits, 2, 1), gates

  def _estimate(self, q: jax.Array, k: jax.Array, v: jax.Array):
    """`estimate` with the logits token-major, [B, T, H, T_M]."""
    cfg = self.config
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    q, k, v = (jnp.moveaxis(x, 2, 1) for x in (q, k, v))
    k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
    code = jnp.broadcast_to(self._positional_code(k.shape[2], d),
                            v.shape).astype(jnp.float32)
    value = jnp.concatenate([code, v.astype(jnp.float32)], -1)
    ctx = _performer(q, k, value, self.omega[...], cfg.causal)
    z = self.encoder(jnp.concatenate([ctx, v.astype(jnp.float32)], -1))
    z = jax.nn.gelu(self.encoder_norm(z))  # [B, H, T, 2D]
    width = cfg.predictor_len // cfg.width_divisor
    s = cfg.channels_per_head
    rows = self.row_decoder(z).reshape(b, h, t, s, width)
    if cfg.causal:  # the width norm acts on the contiguous last axis
      rows = self.width_norm(rows)
    x = rows.transpose(0, 2, 4, 1, 3).reshape(b, t, width, h * s)
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    if cfg.causal:
      # The 1x1 head mix commutes with the nearest upsampling, which runs
      # last, on the token-major map.
      x = jnp.moveaxis(self.head_mix(x), 3, 2)  # [B, T, H, T_M / d]
      x = jnp.repeat(x, cfg.width_divisor, axis=3)
    else:
      x = self.head_mix(jnp.repeat(x, 2, axis=1)[:, :t])
      if x.shape[2] != cfg.predictor_len:
        x = jax.image.resize(x, (b, t, cfg.predictor_len, h), "bilinear")
      x = jnp.moveaxis(x, 3, 2)
    # Materialised before the norm: XLA:CPU otherwise fuses the transpose
    # and the upsampling into the norm's reductions, at 5x the norm's cost.
    x = jax.lax.optimization_barrier(x)
    return self.out_norm(x), self.gates(z)

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array,
           **kwargs) -> base.SparsePlan:
    """Estimates the map, selects cells, lists their keys per row.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] with S = T.
      **kwargs: unused.

    Returns:
      A SparsePlan with a RowLayout [B, H, T, Kmax] (Kmax =
      `config.key_capacity(S)`) and aux {"estimate": softmax of the logits
      over T_M [B, H, T, T_M], "logits", "gates" [B, H, T, 2], "selected":
      bool [B, H, T, T_M], the cells whose keys are listed (the grouped
      top-k after the capacity cap)}.
    """
    del kwargs
    cfg = self.config
    t, s = q.shape[1], k.shape[1]
    if s != t:
      raise ValueError(f"SEA is self-attention: T={t} but S={s}")
    capacity = cfg.key_capacity(s)
    logits, gates = self._estimate(q, k, v)  # token-major [B, T, H, T_M]
    estimate = jax.nn.softmax(logits, -1)
    with jax.ensure_compile_time_eval():
      visible_len = row_lengths(t, s, cfg.causal)
    kept = jnp.moveaxis(select_cells(estimate, cfg.topk, cfg.causal,
                                     visible_len, capacity, head_axis=2),
                        2, 1)
    kv_idx, kv_cnt = key_lists(kept, visible_len, capacity, s)
    layout = row_layout_lib.RowLayout.from_indices(kv_idx, kv_cnt,
                                                   num_keys=s)
    head_major = lambda x: jnp.moveaxis(x, 2, 1)
    return base.SparsePlan(layout=layout, aux={
        "estimate": head_major(estimate), "logits": head_major(logits),
        "gates": gates, "selected": kept})

  def mix(self, plan: base.SparsePlan, out: jax.Array,
          v: jax.Array) -> jax.Array:
    """The gated output O = s(g1) s(g0) O_sp + (1 - s(g1)) O_avg.

    O_avg is the causal running mean of v, or (non-causal) the values
    averaged with the column mean of the estimated map stretched to keys.

    Args:
      plan: this method's plan (gates and estimate in aux).
      out: [B, T, H, D] sparse attention output.
      v: [B, S, Hkv, D].
    """
    if self.config.output == "sparse":
      return out
    b, t, h, _ = out.shape
    gates = jax.nn.sigmoid(jnp.moveaxis(plan.aux["gates"], 1, 2))
    vh = jnp.repeat(v, h // v.shape[2], axis=2).astype(jnp.float32)
    if self.config.causal:
      avg = _prefix_sum(vh, 1) / jnp.arange(1, t + 1)[None, :, None, None]
    else:
      col = plan.aux["estimate"].mean(2, keepdims=True)  # [B, H, 1, T_M]
      weights = stretch(col, vh.shape[1], False)[:, :, 0]  # [B, H, S]
      weights = weights / weights.sum(-1, keepdims=True)
      avg = jnp.einsum("bhs,bshd->bhd", weights, vh)[:, None]
    mixed = (gates[..., 1:] * gates[..., :1] * out.astype(jnp.float32)
             + (1 - gates[..., 1:]) * avg)
    return mixed.astype(out.dtype)

  def __call__(self, q, k, v, *, sm_scale=None, implementation=None,
               interpret=False, **kwargs):
    """plan + attend + the gated output mix: [B, T, H, D]."""
    plan = self.plan(q, k, v, **kwargs)
    out = plan.attend(q, k, v, sm_scale=sm_scale,
                      implementation=implementation, interpret=interpret)
    return self.mix(plan, out, v)


def stretched_logits(logits: jax.Array, causal: bool) -> jax.Array:
  """Compressed logits [B, H, T, T_M] -> [B, H, T, T], -big where hidden."""
  t, tm = logits.shape[-2:]
  _, visible = _row_geometry(t, t, causal, tm)
  return jnp.where(visible, stretch(logits, t, causal), -_BIG)


def kl_mse(student_logits: jax.Array, teacher_probs: jax.Array,
           causal: bool, *, kl_weight: float = 0.1) -> jax.Array:
  """kl_weight * KL(teacher || softmax(student)) + MSE, over rows [.., T, T].

  KL is summed over keys and averaged over rows; MSE is averaged over the
  visible entries.
  """
  t = student_logits.shape[-1]
  _, visible = _row_geometry(t, t, causal, 1)
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
  teacher = teacher_probs.astype(jnp.float32)
  kl = jnp.sum(jnp.where(visible & (teacher > 0), teacher * (
      jnp.log(jnp.where(teacher > 0, teacher, 1.0)) - log_p), 0.0), -1)
  err = jnp.where(visible, jnp.exp(log_p) - teacher, 0.0)
  mse = jnp.sum(err**2) / (jnp.sum(visible) * err.size / visible.size)
  return kl_weight * kl.mean() + mse


def estimator_loss(logits: jax.Array, teacher_probs: jax.Array,
                   causal: bool) -> jax.Array:
  """L_est: the compressed logits stretched to T vs the teacher map.

  Args:
    logits: [B, H, T, T_M] (aux["logits"]).
    teacher_probs: [B, H, T, T] teacher attention probabilities.
    causal: the stretch and visibility rule.
  """
  return kl_mse(stretched_logits(logits, causal), teacher_probs, causal)


def attention_loss(q: jax.Array, k: jax.Array, teacher_probs: jax.Array,
                   causal: bool) -> jax.Array:
  """L_att: the student's dense softmax(q k^T / sqrt(D)) vs the teacher.

  Args:
    q, k: [B, T, H, D] student projections.
    teacher_probs: [B, H, T, T].
    causal: mask future keys.
  """
  t, d = q.shape[1], q.shape[-1]
  scores = jnp.einsum("bthd,bshd->bhts", q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  _, visible = _row_geometry(t, t, causal, 1)
  return kl_mse(jnp.where(visible, scores, -_BIG), teacher_probs, causal)


def context_loss(out: jax.Array, teacher_out: jax.Array) -> jax.Array:
  """L_ctx: MSE between merged-head contexts."""
  diff = out.astype(jnp.float32) - teacher_out.astype(jnp.float32)
  return jnp.mean(diff**2)
