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

On the op: the pyramid [K_1 ; K_2 ; K_4 ; K_8] is one kv axis (K_1 = k,
the rest `extra_k`) with log P in `bias_k`; the layout's kv block is
block_kv / max(levels), so block j at level P is the P_max / P consecutive
layout blocks covering its pooled rows. No element mask is needed.
Non-causal (video generation); tokens should be in the curve order of
`jsparse.masks.curves`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import selection
from jsparse.methods import base
from pallas_kernels import layout as layout_lib


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
      more are truncated); default the worst case of the rule.
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
    tau = jnp.asarray(config.thresholds, jnp.float32) + 1e-6
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

  Args:
    k, v: [B, S, Hkv, D], S a multiple of block_kv.
    levels: int [Bl, Hl, Qb, Kb] level per block (0: skipped).
    config: the PSA config (block sizes and levels).
    max_kv_blocks: static layout capacity; default the worst case S / g.

  Returns:
    A SparsePlan over [K_1 ; K_2 ; ... ] with log P biases.
  """
  s = k.shape[1]
  top, g = config.levels[-1], config.layout_block
  masks, extra_k, extra_v, bias = [], [], [], []
  for level in config.levels:
    masks.append(jnp.repeat(levels == level, top // level, axis=-1))
    bias.append(np.full(s // level, math.log(level), np.float32))
    if level > 1:
      extra_k.append(selection.mean_pool(k, level))
      extra_v.append(selection.mean_pool(v, level))
  visible = jnp.concatenate(masks, -1)
  layout = layout_lib.BlockLayout.from_block_mask(
      visible, config.block_q, g, full_block_mask=visible,
      max_kv_blocks=max_kv_blocks or min(s // g, visible.shape[-1]))
  return base.SparsePlan(
      layout=layout,
      extra_k=jnp.concatenate(extra_k, 1) if extra_k else None,
      extra_v=jnp.concatenate(extra_v, 1) if extra_v else None,
      bias_k=jnp.asarray(np.concatenate(bias)[None, None]))


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
    per_level = (config.thresholds if config.mode == "thresholdbound"
                 else config.fractions)
    if len(per_level) != len(lv):
      raise ValueError(
          f"{config.mode} needs one value per level ({len(lv)}), got "
          f"{len(per_level)}")
    self.config = config

  def _capacity(self, num_kv_blocks: int) -> int:
    """Static bound on layout entries per row for this rule."""
    cfg = self.config
    if cfg.max_kv_blocks is not None:
      return cfg.max_kv_blocks
    top = cfg.levels[-1]
    if cfg.mode != "topk":
      return num_kv_blocks * top
    cum = np.cumsum(cfg.fractions)
    ends = _band_ends(np.minimum(num_kv_blocks,
                                 (num_kv_blocks * cum).astype(np.int32)),
                      None, num_kv_blocks, cfg, np)
    lengths = np.diff(np.concatenate([[0], ends]))
    per_block = np.asarray([top // p for p in cfg.levels])
    return max(int((lengths * per_block).sum())
               + cfg.num_text_blocks * top, 1)

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
           step: int | None = None, key: jax.Array | None = None,
           **kwargs) -> base.SparsePlan:
    """Estimates block importance, assigns levels, builds the pyramid.

    Args:
      q: [B, T, Hq, D], T a multiple of block_q (curve order for video).
      k, v: [B, S, Hkv, D], S a multiple of block_kv.
      step: denoising step (static int) for the dense warm-up.
      key: PRNG key of the sampling offsets; default from `config.seed`.
      **kwargs: unused.

    Returns:
      A SparsePlan over [K_1 ; K_2 ; K_4 ; K_8] with aux {"levels" int32
      [B, Hq, Qb, Kb], "scores", "density" (effective, sum of 1/P / Kb)}.
    """
    del kwargs
    cfg = self.config
    t, s = q.shape[1], k.shape[1]
    if step is not None and step < cfg.warmup_steps:
      return base.SparsePlan(layout=layout_lib.BlockLayout.dense(
          t, s, block_q=cfg.block_q, block_kv=cfg.block_kv))
    if key is None:
      key = jax.random.key(cfg.seed)
    scores = selection.sampled_block_scores(
        q, k, cfg.block_q, cfg.block_kv,
        q_samples=cfg.q_samples or max(cfg.block_q // 4, 1),
        kv_samples=cfg.kv_samples or max(cfg.block_kv // 4, 1), key=key)
    levels = level_map(scores, cfg)
    plan = pyramid_plan(k, v, levels, cfg,
                        max_kv_blocks=self._capacity(scores.shape[-1]))
    return plan.replace(aux={"levels": levels, "scores": scores,
                             "density": effective_density(levels)})
