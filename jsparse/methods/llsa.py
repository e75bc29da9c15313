"""LLSA: trainable log-linear sparse attention.

Paper: "Trainable Log-linear Sparse Attention for Efficient Diffusion
Transformers", https://arxiv.org/abs/2512.16615 (official code:
SingleZombie/LLSA).

Q/K/V are mean-pooled into a pyramid (factor `block_size` per level). A dense
top-k runs only at the coarsest level L; every finer level picks its top-k
among the children of its parent's picks, down to the raw key blocks. Each
16-token query block then attends, in ONE softmax, to

  (a) the raw keys of its level-1 picks (weight 1),
  (b) for 1 <= l < L: the pooled level-l keys that are children of the
      level-(l+1) picks of its level-(l+1) ancestor (weight Bs^l),
  (c) every pooled level-L key (weight Bs^L).

The weights multiply softmax mass, i.e. log(Bs^l) is added to the logits of
pooled level-l keys (`bias_k`). Overlap between the sets is kept, as in the
official model. On the block-sparse op, the pooled levels are appended to the
kv axis ([k ; k_1 ; ... ; k_L]) and addressed by the same layout with block
size Bs: block j of level l holds the Bs children of level-(l+1) token j, so
(b) is exactly "kv block (offset_l + pick)". The layout is built directly
from the index lists, O(N * K) memory: no dense block mask is ever formed.
Every row lists exactly K_1 + K_2 + ... + K_L + ceil(N_L / Bs) blocks, the
layout's static Kmax (nothing is ever cut).

Calling the method (`merge="lse"`, the default) runs two op calls merged by
log-sum-exp, the same softmax: (a) + (b) on the Bs-row layout, and (c), the
N_L keys every query sees, as a dense call over large query blocks, which
gathers them once per 256 queries instead of once per Bs (at N = 8192 they
are 32 of the 40 blocks of a row). `plan` returns the single-call form.

Images must be in quadtree Z-order (`zorder_permutation`) so that Bs^l
consecutive tokens form a square patch; the RoPE table is permuted with them
(see jsparse.models.dit).
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

# Sequence length from which the official README switches from l1 to l2.
_L2_FROM_TOKENS = 16384


@dataclasses.dataclass(frozen=True)
class LLSAConfig:
  """LLSA hyperparameters.

  Attributes:
    num_levels: pooled levels L >= 1 (official kernels: 1 and 2); None picks
      1 below 16384 tokens and 2 from there (the official README rule).
    block_size: Bs, the pooling factor per level and the query/key block
      size of the layout (16 in the paper).
    topk: picks per level, an int for every level or a tuple indexed from the
      finest (topk[0]: raw key blocks per query block) to the coarsest
      (topk[L-1]: dense top-k at level L). 8 in the paper.
    merge: how calling the method attends: "lse" (two op calls merged by
      log-sum-exp, see the module) or "single" (one call on `plan`); same
      values and gradients.
  """

  num_levels: int | None = None
  block_size: int = 16
  topk: int | tuple[int, ...] = 8
  merge: str = "lse"

  def levels(self, seq_len: int) -> int:
    """L for a sequence of `seq_len` tokens."""
    if self.num_levels is not None:
      return self.num_levels
    return 1 if seq_len < _L2_FROM_TOKENS else 2

  def topk_per_level(self, num_levels: int) -> tuple[int, ...]:
    """(K_1, ..., K_L), finest first."""
    if isinstance(self.topk, int):
      return (self.topk,) * num_levels
    if len(self.topk) != num_levels:
      raise ValueError(
          f"topk has {len(self.topk)} entries but there are {num_levels} "
          "levels")
    return tuple(self.topk)


def zorder_permutation(side: int) -> tuple[np.ndarray, np.ndarray]:
  """Quadtree (Morton) order of a `side` x `side` image, rows major.

  Token z of the permuted sequence is pixel (r, c) whose bits interleave as
  z = ... r_1 c_1 r_0 c_0, so 4^j consecutive tokens form a 2^j x 2^j patch.

  Args:
    side: image side, a power of two.

  Returns:
    perm int [side**2]: raster index of each Z-order token
      (`tokens_z = tokens_raster[perm]`), and its inverse
      (`tokens_raster = tokens_z[inverse]`).
  """
  if side < 1 or side & (side - 1):
    raise ValueError(f"Z-order needs a power-of-two side, got {side}")
  z = np.arange(side * side)
  row = np.zeros_like(z)
  col = np.zeros_like(z)
  for bit in range(max(side.bit_length() - 1, 0)):
    col |= ((z >> (2 * bit)) & 1) << bit
    row |= ((z >> (2 * bit + 1)) & 1) << bit
  perm = row * side + col
  inverse = np.empty_like(perm)
  inverse[perm] = z
  return perm, inverse


def pyramid(x: jax.Array, block_size: int, num_levels: int
            ) -> list[jax.Array]:
  """[x_1, ..., x_L]: x_l = mean of Bs^l consecutive tokens of x [B, N, H, D].

  Differentiable: gradients of pooled tokens flow back to x.
  """
  levels = []
  for _ in range(num_levels):
    x = selection.mean_pool(x, block_size)
    levels.append(x)
  return levels


def hierarchical_topk(q_levels: list[jax.Array], k_levels: list[jax.Array],
                      topk: tuple[int, ...], block_size: int
                      ) -> list[jax.Array]:
  """Coarse-to-fine top-k selection (no gradient).

  Args:
    q_levels: [q_1, ..., q_L], q_l [B, N / Bs^l, Hq, D] pooled queries.
    k_levels: [k_1, ..., k_L], k_l [B, N / Bs^l, Hkv, D] pooled keys.
    topk: (K_1, ..., K_L).
    block_size: Bs.

  Returns:
    [P_1, ..., P_L]: P_l int32 [B, Hq, N / Bs^l, K_l] global level-l key ids
    picked by each level-l query (P_1 are raw key block ids), in descending
    score order.
  """
  q_top, k_top = jax.lax.stop_gradient((q_levels[-1], k_levels[-1]))
  kh = jnp.repeat(k_top, q_top.shape[2] // k_top.shape[2], axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q_top, kh,
                      preferred_element_type=jnp.float32)
  picks = [selection.topk_indices(scores, topk[-1])]
  for level in range(len(q_levels) - 2, -1, -1):
    picks.insert(0, selection.child_topk_indices(
        q_levels[level], k_levels[level], picks[0], block_size,
        topk[level]))
  return picks


def build_layout(picks: list[jax.Array], seq_len: int, block_size: int, *,
                 with_last_level: bool = True) -> layout_lib.BlockLayout:
  """The layout over [k ; k_1 ; ... ; k_L] from the per-level picks.

  Args:
    picks: [P_1, ..., P_L] from `hierarchical_topk`.
    seq_len: N, the raw sequence length.
    block_size: Bs (= block_q = block_kv of the layout).
    with_last_level: list every level-L block in every row; without it the
      layout covers [k ; k_1 ; ... ; k_{L-1}] only.

  Returns:
    A traced BlockLayout [B, Hq, N / Bs, K_1 + K_2 + ... + K_L (+ ceil(N_L /
    Bs))] with every listed block FULL and rows strictly ascending.
  """
  num_q_blocks = seq_len // block_size
  b, h = picks[0].shape[:2]
  rows = [jnp.sort(picks[0], axis=-1)]
  offset = num_q_blocks  # kv blocks of the raw keys
  for level in range(1, len(picks)):
    # Level-(level+1) picks of each query block's ancestor select blocks of
    # pooled level-`level` keys (their children).
    ancestor = jnp.arange(num_q_blocks) // block_size**level
    parent = jnp.sort(picks[level], axis=-1)[:, :, ancestor]
    rows.append(parent + offset)
    offset += seq_len // block_size**(level + 1)
  if with_last_level:
    last_tokens = seq_len // block_size**len(picks)
    last_blocks = layout_lib.cdiv(last_tokens, block_size)
    rows.append(jnp.broadcast_to(
        offset + jnp.arange(last_blocks, dtype=jnp.int32),
        (b, h, num_q_blocks, last_blocks)))
    offset += last_blocks
  kv_idx = jnp.concatenate(rows, axis=-1).astype(jnp.int32)
  width = kv_idx.shape[-1]
  return layout_lib.BlockLayout(
      kv_idx=kv_idx,
      kv_cnt=jnp.full((b, h, num_q_blocks), width, jnp.int32),
      kv_kind=jnp.full(kv_idx.shape, layout_lib.FULL, jnp.int8),
      block_q=block_size,
      block_kv=block_size,
      num_kv_blocks=offset)


def level_bias(seq_len: int, block_size: int, num_levels: int) -> np.ndarray:
  """f32 [1, 1, N + N_1 + ... + N_L]: 0 on raw keys, log(Bs^l) on level l."""
  parts = [np.zeros(seq_len, np.float32)]
  for level in range(1, num_levels + 1):
    parts.append(np.full(seq_len // block_size**level,
                         level * math.log(block_size), np.float32))
  return np.concatenate(parts)[None, None]


# Block sizes of the dense call over the level-L keys.
_GLOBAL_BLOCK_Q = 256
_GLOBAL_BLOCK_KV = 128


class LLSAMethod(base.SparseMethod):
  """Log-linear hierarchical top-k with pooled KV enrichment; no params.

  Trained end to end: gradients reach q, k, v (and k, v again through the
  pooled levels); the selection is a hard choice with no gradient.
  """

  def __init__(self, config: LLSAConfig = LLSAConfig()):
    if config.block_size < 2:
      raise ValueError(f"block_size must be >= 2, got {config.block_size}")
    if config.num_levels is not None and config.num_levels < 1:
      raise ValueError(f"num_levels must be >= 1, got {config.num_levels}")
    if config.merge not in ("lse", "single"):
      raise ValueError(
          f"merge must be 'lse' or 'single', got {config.merge!r}")
    self.config = config

  def _select(self, q, k, v):
    """(L, pooled k levels, pooled v levels, picks) of `plan`'s inputs."""
    n = q.shape[1]
    bs = self.config.block_size
    levels = self.config.levels(n)
    if k.shape[1] != n:
      raise ValueError(
          f"LLSA is self-attention: q has {n} tokens, k has {k.shape[1]}")
    if n % bs**levels:
      raise ValueError(
          f"LLSA with {levels} level(s) needs N divisible by block_size^L = "
          f"{bs**levels}, got N={n}; pad the sequence")
    q_levels = pyramid(jax.lax.stop_gradient(q), bs, levels)
    k_levels = pyramid(k, bs, levels)
    v_levels = pyramid(v, bs, levels)
    picks = hierarchical_topk(q_levels, k_levels,
                              self.config.topk_per_level(levels), bs)
    return levels, k_levels, v_levels, picks

  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array,
           **kwargs) -> base.SparsePlan:
    """Selects blocks and builds the pooled levels (the single-call form).

    Args:
      q: [B, N, Hq, D] queries after qk-norm and RoPE, in Z-order for images.
      k: [B, N, Hkv, D] keys (self-attention: same length as q).
      v: [B, N, Hkv, D] values.
      **kwargs: unused.

    Returns:
      A SparsePlan whose extra_k/extra_v are [B, N_1 + ... + N_L, Hkv, D]
      (pooled levels, finest first), bias_k the log(Bs^l) level weights, and
      aux["picks"] the per-level index lists [P_1, ..., P_L].

    Raises:
      ValueError: if N differs between q and k or is not a multiple of
        Bs^L.
    """
    del kwargs
    n, bs = q.shape[1], self.config.block_size
    levels, k_levels, v_levels, picks = self._select(q, k, v)
    return base.SparsePlan(
        layout=build_layout(picks, n, bs),
        extra_k=jnp.concatenate(k_levels, axis=1),
        extra_v=jnp.concatenate(v_levels, axis=1),
        bias_k=jnp.asarray(level_bias(n, bs, levels)),
        aux={"picks": picks})

  def branches(self, q: jax.Array, k: jax.Array, v: jax.Array):
    """The two-call form: [(local plan, k, v), (global plan, k_L, v_L)].

    The local plan lists (a) and (b) over [k ; k_1 ; ... ; k_{L-1}]; the
    global plan is every query against the level-L keys (c), dense, in
    blocks of 256 queries. Merged by LSE they equal `plan`'s softmax.

    Args:
      q, k, v: as `plan`.
    """
    n, bs = q.shape[1], self.config.block_size
    levels, k_levels, v_levels, picks = self._select(q, k, v)
    local = base.SparsePlan(
        layout=build_layout(picks, n, bs, with_last_level=False),
        aux={"picks": picks})
    if levels > 1:
      local = local.replace(
          extra_k=jnp.concatenate(k_levels[:-1], axis=1),
          extra_v=jnp.concatenate(v_levels[:-1], axis=1),
          bias_k=jnp.asarray(level_bias(n, bs, levels - 1)))
    k_top, v_top = k_levels[-1], v_levels[-1]
    size = k_top.shape[1]
    global_ = base.SparsePlan(
        layout=layout_lib.BlockLayout.dense(
            n, size, block_q=min(n, _GLOBAL_BLOCK_Q),
            block_kv=min(size, _GLOBAL_BLOCK_KV)),
        bias_k=jnp.full((1, 1, size), levels * math.log(bs), jnp.float32))
    return [(local, k, v), (global_, k_top, v_top)]

  def __call__(self, q, k, v, *, sm_scale=None, implementation=None,
               interpret=False, **kwargs):
    """plan + attend; with merge="lse", the two-call form (see `branches`)."""
    if self.config.merge == "single":
      return super().__call__(q, k, v, sm_scale=sm_scale,
                              implementation=implementation,
                              interpret=interpret, **kwargs)
    return blade.attend_merged(q, self.branches(q, k, v), sm_scale=sm_scale,
                               implementation=implementation,
                               interpret=interpret)
