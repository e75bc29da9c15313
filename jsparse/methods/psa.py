"""PSA: Pyramid Sparse Attention, multi-level pooled KV per block.

Paper: "PSA: Pyramid Sparse Attention for Efficient Video Understanding and
Generation", https://arxiv.org/abs/2512.04025 (code:
ziplab/Pyramid-Sparse-Attention).

Each query block gives each kv block a level P in `levels` (1, 2, 4, 8) or
skips it; at level P it attends to that block's keys and values mean-pooled
by P. A pooled key stands for P identical keys, so log P is added to its
logit: the result is exactly a softmax over the "repeat-P" expanded key set.
Levels come from the sampled block-importance map (shared with BLADE) as
bands of the sorted cumulative mass ("thresholdbound") or fixed fractions of
the ranked blocks ("topk"), each band's length aligned to hardware tiles.

On the op (`plan`): the pyramid [K_1 ; K_2 ; K_4 ; K_8] is one kv axis
(K_1 = k, the rest `extra_k`) with log P in `bias_k`; the layout's kv block
is block_kv / max(levels), so block j at level P is the P_max / P
consecutive layout blocks covering its pooled rows. No element mask is
needed. Calling the method runs, where it pays, the same softmax as one op
call per level merged by log-sum-exp (`branches`): level P's layout lists
whole blocks of K_P (kv block block_kv / P), so a level-1 block is one
gathered block rather than P_max small ones. Bidirectional by default
(video generation; tokens should be in the curve order of
`jsparse.masks.curves`). `causal=True` is the causal variant for language
models (raster order, never a curve): the same estimator and levels over
the causal past, see `blade.causal_scores` and `causal_levels`.

Capacity: a row of `plan` lists at most `PSAMethod.capacity(...)` layout
blocks, a level call at most `level_capacities(...)` blocks. In "topk" mode
every row has exactly the rule's count; in "thresholdbound" mode the bound
is the worst case over all score rows (the top r of n sorted blocks hold at
least r / n of the mass, so level P's band ends by rank tau_P * n + 1, plus
its alignment), about 60% of Kb * P_max at the Wan preset, and calls use
`plan`. `PSAConfig.max_kv_blocks` caps `plan` lower; rows over a cap keep
their lowest layout ids (finest levels first).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import selection
from jsparse.methods import base
from jsparse.methods import blade
from pallas_kernels import layout as layout_lib

# Tolerance of the thresholdbound comparison E_r <= tau.
_TAU_SLACK = 1e-6


@dataclasses.dataclass(frozen=True)
class PSAConfig:
  """PSA hyperparameters (defaults: the Wan2.1-1.3B thresholdbound preset).

  Attributes:
    block_q: b_m, query block.
    block_kv: b_n, kv block (128, 64 or 32).
    levels: pooling factors, ascending powers of two starting at 1.
    mode: "thresholdbound" (cumulative-mass bands) or "topk" (fractions).
    thresholds: per level, the cumulative mass ending its band.
    fractions: per level, the fraction of kv blocks in its band ("topk";
      CogVideoX-5B: 0.10, 0.05, 0.0, 0.20).
    min_level1_fraction: thresholdbound keeps at least
      int(fraction * Kb) + 1 blocks at level 1.
    tile_kv: t_n, the hardware tile; level P's band length is a multiple of
      ceil(P / (block_kv / tile_kv)). None: no alignment.
    num_text_blocks: trailing kv blocks (text) forced to level 1.
    q_samples, kv_samples: sampled tokens per block; default a quarter.
    warmup_steps: the first denoising steps attend densely.
    max_kv_blocks: optional static cap on layout entries per row (rows with
      more keep their lowest layout ids); default the worst case of the rule.
    causal: causal self-attention (T = S, raster token order): future blocks
      are skipped and blocks crossing the diagonal are kept at level 1.
    merge: how calling the method attends: "lse" (one op call per level,
      merged by log-sum-exp, whenever the per-level capacities hold no more
      keys than the single layout: always in "topk" mode without
      `max_kv_blocks`) or "single" (one call on `plan`); same values and
      gradients.
    seed: PRNG seed of the sampling offsets when `plan` gets no key.
  """

  block_q: int = 128
  block_kv: int = 128
  levels: tuple[int, ...] = (1, 2, 4, 8)
  mode: str = "thresholdbound"
  thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)
  fractions: tuple[float, ...] = (0.10, 0.05, 0.0, 0.20)
  min_level1_fraction: float = 0.06
  tile_kv: int | None = 32
  num_text_blocks: int = 0
  q_samples: int | None = None
  kv_samples: int | None = None
  warmup_steps: int = 0
  max_kv_blocks: int | None = None
  causal: bool = False
  merge: str = "lse"
  seed: int = 0

  @property
  def layout_block(self) -> int:
    """The layout's kv block: one block of the coarsest level."""
    return self.block_kv // self.levels[-1]

  def alignment(self, level: int) -> int:
    if self.tile_kv is None:
      return 1
    return math.ceil(level / max(self.block_kv // self.tile_kv, 1))


def _band_ends(initial, floor_level1, num_kv_blocks: int, config: PSAConfig,
               xp):
  """Rank where each level's band ends, tile-aligned (official rule).

  Bands are consecutive: level i covers sorted ranks [end_{i-1}, end_i).
  A band longer than 0 is rounded up to its alignment, then down again
  when it would run past the row.

  Args:
    initial: int [..., L] unaligned ends (numpy or jax).
    floor_level1: minimum end of level 1, or None.
    num_kv_blocks: Kb.
    config: the PSA config.
    xp: numpy or jax.numpy.

  Returns:
    int [..., L] ends.
  """
  n = num_kv_blocks
  start = xp.zeros(initial.shape[:-1], np.int32)
  ends = []
  for i, level in enumerate(config.levels):
    m = config.alignment(level)
    end = xp.clip(initial[..., i], 0, n)
    if i == 0 and floor_level1 is not None:
      end = xp.maximum(end, floor_level1)
    length = xp.maximum(end - start, 0)
    end = xp.minimum(start + -(-length // m) * m, n)
    end = xp.where(end == n, start + (n - start) // m * m, end)
    ends.append(end)
    start = end
  return xp.stack(ends, -1).astype(np.int32)


def _worst_band_ends(num_kv_blocks: int, config: PSAConfig) -> np.ndarray:
  """Upper bounds of the thresholdbound band ends over every score row.

  The r best of n blocks hold at least r / n of a row's mass, so at most
  floor(tau * n) ranks have E_r <= tau (up to float32 rounding of the
  cumulative sum) and level i's unaligned end is at most that + 1 (or the
  level-1 floor); alignment then adds at most m_i - 1.
  """
  n = num_kv_blocks
  slack = _TAU_SLACK + n * np.finfo(np.float32).eps
  floor = min(n, int(n * config.min_level1_fraction) + 1)
  end, ends = 0, []
  for i, (tau, level) in enumerate(zip(config.thresholds, config.levels)):
    reach = min(n, math.floor((tau + slack) * n) + 1)
    if i == 0:
      reach = max(reach, floor)
    end = min(n, max(end, reach + config.alignment(level) - 1))
    ends.append(end)
  return np.asarray(ends)


def causal_levels(levels: jax.Array, past: np.ndarray,
                  crossing: np.ndarray) -> jax.Array:
  """Levels over the causal past: future blocks skipped, crossing blocks at
  level 1 (a pooled key there would mix in future tokens)."""
  shape = jnp.shape(levels)
  return jnp.where(np.broadcast_to(crossing, shape), 1,
                   jnp.where(np.broadcast_to(past, shape), levels, 0))


def _final_levels(levels: jax.Array, config: PSAConfig) -> jax.Array:
  """`levels` made causal when `config.causal`."""
  if not config.causal:
    return levels
  qb, kb = levels.shape[-2:]
  return causal_levels(levels, *blade.causal_blocks(
      qb, kb, config.block_q, config.block_kv))


def level_map(scores: jax.Array, config: PSAConfig) -> jax.Array:
  """Pooling level of every (query block, kv block), 0 = skipped.

  Args:
    scores: f32 [..., Qb, Kb] non-negative block importance.
    config: the PSA config.

  Returns:
    int32 [..., Qb, Kb] with values in `config.levels` or 0.
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  n = scores.shape[-1]
  order = jnp.argsort(-scores, axis=-1, stable=True)
  if config.mode == "topk":
    cum = np.cumsum(config.fractions)
    initial = np.minimum(n, (n * cum).astype(np.int32))
    ends = jnp.broadcast_to(_band_ends(initial, None, n, config, np),
                            scores.shape[:-1] + (len(config.levels),))
  else:
    ranked = jnp.take_along_axis(scores, order, axis=-1)
    energy = jnp.cumsum(ranked, -1) / jnp.maximum(
        ranked.sum(-1, keepdims=True), 1e-30)
    tau = jnp.asarray(config.thresholds, jnp.float32) + _TAU_SLACK
    tau = tau.reshape((1,) * (energy.ndim - 1) + (-1, 1))
    below = energy[..., None, :] <= tau  # [..., L, Kb]
    # No rank under the threshold: an empty band (end = previous end).
    initial = jnp.where(below.any(-1), below.sum(-1) + 1, 0)
    floor = min(n, int(n * config.min_level1_fraction) + 1)
    ends = _band_ends(initial, floor, n, config, jnp)
  ranks = jnp.argsort(order, axis=-1)
  band = jnp.sum(ranks[..., None] >= ends[..., None, :], axis=-1)
  table = jnp.asarray(list(config.levels) + [0], jnp.int32)
  levels = table[band]
  if config.num_text_blocks:
    text = jnp.arange(n) >= n - config.num_text_blocks
    levels = jnp.where(jnp.broadcast_to(text, levels.shape), 1, levels)
  return levels


def effective_density(levels: jax.Array) -> jax.Array:
  """Sum of 1/P over visited blocks over Kb, averaged: f32 scalar."""
  inv = jnp.where(levels > 0, 1.0 / jnp.maximum(levels, 1), 0.0)
  return inv.sum(-1).mean() / levels.shape[-1]


def pyramid_plan(k: jax.Array, v: jax.Array, levels: jax.Array,
                 config: PSAConfig, *,
                 max_kv_blocks: int | None = None) -> base.SparsePlan:
  """The plan of a given level map.

  With `config.causal`, the levels are first made causal (`causal_levels`),
  key blocks past the diagonal are dropped and the layout's causal band
  applies inside the level-1 blocks crossing it.

  Args:
    k, v: [B, S, Hkv, D], S a multiple of block_kv.
    levels: int [Bl, Hl, Qb, Kb] level per block (0: skipped).
    config: the PSA config (block sizes, levels, causal).
    max_kv_blocks: static layout capacity; default the worst case S / g.

  Returns:
    A SparsePlan over [K_1 ; K_2 ; ... ] with log P biases and aux
    {"levels": the (causal) level map}.
  """
  s = k.shape[1]
  top, g = config.levels[-1], config.layout_block
  qb = levels.shape[-2]
  levels = _final_levels(levels, config)
  masks, extra_k, extra_v, bias = [], [], [], []
  for level in config.levels:
    masks.append(jnp.repeat(levels == level, top // level, axis=-1))
    bias.append(np.full(s // level, math.log(level), np.float32))
    if level > 1:
      extra_k.append(selection.mean_pool(k, level))
      extra_v.append(selection.mean_pool(v, level))
  visible = jnp.concatenate(masks, -1)
  full, band = visible, None
  if config.causal:
    # Only level-1 layout blocks (the first s // g) can reach the diagonal.
    past, crossing = blade.causal_blocks(qb, s // g, config.block_q, g)
    coarse = np.ones((qb, visible.shape[-1] - s // g), bool)
    allowed = np.concatenate([past | crossing, coarse], -1)
    visible &= np.broadcast_to(allowed, visible.shape)
    full = visible & np.broadcast_to(np.concatenate([past, coarse], -1),
                                     visible.shape)
    band = (None, 0)
  layout = layout_lib.BlockLayout.from_block_mask(
      visible, config.block_q, g, full_block_mask=full,
      max_kv_blocks=max_kv_blocks or min(s // g, visible.shape[-1]),
      band=band)
  return base.SparsePlan(
      layout=layout,
      extra_k=jnp.concatenate(extra_k, 1) if extra_k else None,
      extra_v=jnp.concatenate(extra_v, 1) if extra_v else None,
      bias_k=jnp.asarray(np.concatenate(bias)[None, None]),
      aux={"levels": levels})


def level_plans(k: jax.Array, v: jax.Array, levels: jax.Array,
                config: PSAConfig, capacities: tuple[int, ...]):
  """The per-level form of `pyramid_plan`: one op call per level.

  Level P's plan lists the blocks at level P over K_P (layout kv block
  block_kv / P) with the bias log P; merged by LSE (`blade.attend_merged`)
  the calls are `pyramid_plan`'s softmax. Same causal handling.

  Args:
    k, v: [B, S, Hkv, D], S a multiple of block_kv.
    levels: int [Bl, Hl, Qb, Kb] level per block (0: skipped).
    config: the PSA config.
    capacities: static Kmax per level; levels with 0 are left out.

  Returns:
    A list of (plan, K_P, V_P).
  """
  s = k.shape[1]
  levels = _final_levels(levels, config)
  past = None
  if config.causal:
    past = blade.causal_blocks(*levels.shape[-2:], config.block_q,
                               config.block_kv)[0]
  branches = []
  for level, capacity in zip(config.levels, capacities):
    if not capacity:
      continue
    mask = levels == level
    full, band, bias = mask, None, None
    if level > 1:
      k_p, v_p = selection.mean_pool(k, level), selection.mean_pool(v, level)
      bias = jnp.full((1, 1, s // level), math.log(level), jnp.float32)
    else:
      k_p, v_p = k, v
      if past is not None:  # crossing blocks hold level 1 only
        full, band = mask & np.broadcast_to(past, mask.shape), (None, 0)
    layout = layout_lib.BlockLayout.from_block_mask(
        mask, config.block_q, config.block_kv // level, full_block_mask=full,
        max_kv_blocks=capacity, band=band)
    branches.append((base.SparsePlan(layout=layout, bias_k=bias), k_p, v_p))
  return branches


class PSAMethod(base.SparseMethod):
  """Pyramid sparse attention: per-block pooling levels; no parameters."""

  def __init__(self, config: PSAConfig = PSAConfig()):
    lv = config.levels
    if lv[0] != 1 or any(b != 2 * a for a, b in zip(lv, lv[1:])):
      raise ValueError(f"levels must be 1, 2, 4, ... got {lv}")
    if config.block_kv % lv[-1]:
      raise ValueError(
          f"block_kv ({config.block_kv}) must be a multiple of the coarsest "
          f"level ({lv[-1]})")
    if config.mode not in ("thresholdbound", "topk"):
      raise ValueError(f"unknown mode {config.mode!r}")
    if config.merge not in ("lse", "single"):
      raise ValueError(
          f"merge must be 'lse' or 'single', got {config.merge!r}")
    per_level = (config.thresholds if config.mode == "thresholdbound"
                 else config.fractions)
    if len(per_level) != len(lv):
      raise ValueError(
          f"{config.mode} needs one value per level ({len(lv)}), got "
          f"{len(per_level)}")
    self.config = config

  def _band_bounds(self, num_q_blocks: int, num_kv_blocks: int):
    """(upper, lower) bounds of every row's band ends (exact in "topk")."""
    cfg = self.config
    n = num_kv_blocks
    if cfg.mode == "topk":
      initial = np.minimum(n, (n * np.cumsum(cfg.fractions)).astype(np.int32))
      upper = lower = _band_ends(initial, None, n, cfg, np)
    else:
      upper = _worst_band_ends(n, cfg)
      # Level 1 is never aligned (m = 1), so it always reaches the floor.
      lower = np.full(len(cfg.levels),
                      min(n, int(n * cfg.min_level1_fraction) + 1))
    if cfg.causal:
      # Crossing blocks rank first (`causal_scores`), so forcing them to
      # level 1 extends the level-1 band to at least their count.
      _, crossing = blade.causal_blocks(num_q_blocks, n, cfg.block_q,
                                        cfg.block_kv)
      upper = np.maximum(upper, crossing.sum(-1).max())
      lower = np.maximum(lower, crossing.sum(-1).min())
    return upper, lower

  def capacity(self, num_q_blocks: int, num_kv_blocks: int) -> int:
    """Static Kmax of `plan`: layout blocks (of block_kv / P_max keys) any
    row can list, for Qb x Kb PSA blocks.

    The rule's worst case (exact in "topk" mode) plus P_max per text block
    (forced to level 1), at most Kb * P_max; or `config.max_kv_blocks` when
    set.
    """
    cfg = self.config
    if cfg.max_kv_blocks is not None:
      return cfg.max_kv_blocks
    n, top = num_kv_blocks, cfg.levels[-1]
    upper, _ = self._band_bounds(num_q_blocks, n)
    # Entries grow with every band end (finer levels weigh more), so the
    # upper ends bound them.
    lengths = np.diff(np.concatenate([[0], upper]))
    per_block = np.asarray([top // p for p in cfg.levels])
    entries = int((lengths * per_block).sum()) + cfg.num_text_blocks * top
    return max(min(entries, n * top), 1)

  def level_capacities(self, num_q_blocks: int,
                       num_kv_blocks: int) -> tuple[int, ...]:
    """Static Kmax of each level's call in `branches` (PSA blocks)."""
    upper, lower = self._band_bounds(num_q_blocks, num_kv_blocks)
    starts = np.concatenate([[0], lower[:-1]])
    caps = np.maximum(upper - starts, 0)
    caps[0] += self.config.num_text_blocks
    return tuple(int(c) for c in np.minimum(caps, num_kv_blocks))

  def _per_level(self, num_q_blocks: int, num_kv_blocks: int) -> bool:
    """Whether calling the method runs `branches`: merge="lse", no cap, and
    the level capacities hold no more keys than `capacity`'s layout."""
    cfg = self.config
    if cfg.merge != "lse" or cfg.max_kv_blocks is not None:
      return False
    caps = self.level_capacities(num_q_blocks, num_kv_blocks)
    keys = sum(c * cfg.block_kv // p for c, p in zip(caps, cfg.levels))
    single = self.capacity(num_q_blocks, num_kv_blocks) * cfg.layout_block
    # No level lists a block (short sequences): the single call gives the
    # empty rows.
    return 0 < keys <= single

  def _levels(self, q, k, key):
    """(scores, levels) of the estimator and the level rule (the plans make
    the levels causal)."""
    cfg = self.config
    scores, _ = blade.sampled_scores(
        q, k, cfg.block_q, cfg.block_kv,
        q_samples=cfg.q_samples or max(cfg.block_q // 4, 1),
        kv_samples=cfg.kv_samples or max(cfg.block_kv // 4, 1),
        causal=cfg.causal, key=key, seed=cfg.seed, method="PSA")
    return scores, level_map(scores, cfg)

  def _warming_up(self, step) -> bool:
    return step is not None and step < self.config.warmup_steps

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
           step: int | None = None, key: jax.Array | None = None,
           **kwargs) -> base.SparsePlan:
    """Estimates block importance, assigns levels, builds the pyramid.

    Args:
      q: [B, T, Hq, D], T a multiple of block_q (curve order for video).
      k, v: [B, S, Hkv, D], S a multiple of block_kv (S = T when causal).
      step: denoising step (static int) for the dense warm-up.
      key: PRNG key of the sampling offsets; default from `config.seed`.
      **kwargs: unused.

    Returns:
      A SparsePlan over [K_1 ; K_2 ; K_4 ; K_8] (Kmax = `capacity`) with
      aux {"levels" int32 [B, Hq, Qb, Kb], "scores", "density" (effective,
      sum of 1/P / Kb)}.

    Raises:
      ValueError: if causal and T != S.
    """
    del kwargs
    cfg = self.config
    t, s = q.shape[1], k.shape[1]
    if self._warming_up(step):
      dense = (layout_lib.BlockLayout.causal if cfg.causal else
               layout_lib.BlockLayout.dense)
      return base.SparsePlan(layout=dense(t, s, block_q=cfg.block_q,
                                          block_kv=cfg.block_kv))
    scores, levels = self._levels(q, k, key)
    plan = pyramid_plan(k, v, levels, cfg,
                        max_kv_blocks=self.capacity(*levels.shape[-2:]))
    levels = plan.aux["levels"]
    return plan.replace(aux={"levels": levels, "scores": scores,
                             "density": effective_density(levels)})

  def branches(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
               key: jax.Array | None = None):
    """The per-level form (`level_plans`, Kmax `level_capacities`).

    Args:
      q, k, v, key: as `plan`.

    Returns:
      (plan, K_P, V_P) triples for `blade.attend_merged`.
    """
    _, levels = self._levels(q, k, key)
    return level_plans(k, v, levels, self.config,
                       self.level_capacities(*levels.shape[-2:]))

  def __call__(self, q, k, v, *, sm_scale=None, implementation=None,
               interpret=False, step=None, key=None, **kwargs):
    """plan + attend; with merge="lse", one call per level where it pays
    (see `PSAConfig.merge`)."""
    cfg = self.config
    blocks = (q.shape[1] // cfg.block_q, k.shape[1] // cfg.block_kv)
    if self._warming_up(step) or not self._per_level(*blocks):
      return super().__call__(q, k, v, sm_scale=sm_scale,
                              implementation=implementation,
                              interpret=interpret, step=step, key=key,
                              **kwargs)
    return blade.attend_merged(q, self.branches(q, k, v, key=key),
                               sm_scale=sm_scale,
                               implementation=implementation,
                               interpret=interpret)
