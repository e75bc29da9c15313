"""HMAR: Markovian next-scale attention (block-diagonal over scales).

Paper: "HMAR: Efficient Hierarchical Masked Auto-Regressive Image
Generation", https://arxiv.org/abs/2506.04421 (CVPR 2025).

A token of scale k only sees tokens of scale k (the Markov mask); VAR's
block-causal baseline lets it see every scale <= k. Scales (1, 4, 9, ...
tokens) do not align with kernel tiles, so the Markov mask is expressed with
segment ids (the op's equality predicate inside boundary blocks) and the
block-causal baseline with the layout's tile pool. The layout is built once
on the host (exact Kmax), never under jit.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import static
from jsparse.methods import base
from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class HMARConfig:
  """HMAR attention pattern.

  Attributes:
    patch_nums: side of each scale's token map; scale k has pn_k**2 tokens,
      L = sum(pn**2) (680 for the 256 px default).
    rule: "markov" (HMAR, block-diagonal) or "causal" (VAR baseline).
    block_q: query block size of the layout.
    block_kv: kv block size of the layout.
  """

  patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  rule: str = "markov"
  block_q: int = 128
  block_kv: int = 128

  @property
  def seq_len(self) -> int:
    return sum(p * p for p in self.patch_nums)


def scale_ids(patch_nums) -> np.ndarray:
  """int32 [L]: the scale index of every token."""
  return static.segment_ids([p * p for p in patch_nums])


def element_mask(config: HMARConfig) -> np.ndarray:
  """bool [L, L] logical mask of `config.rule` (rows are queries)."""
  seg = scale_ids(config.patch_nums)
  return static.segment_mask(seg, seg, rule=(
      "equal" if config.rule == "markov" else "causal"))


@functools.lru_cache(maxsize=32)
def host_layout(config: HMARConfig) -> layout_lib.BlockLayout:
  """The static layout of `config`, shared by all batches and heads."""
  mask = element_mask(config)[None, None]
  if config.rule == "markov":
    # Equal segment ids reproduce the mask inside boundary blocks.
    return static.predicate_layout(mask, config.block_q, config.block_kv)
  return layout_lib.BlockLayout.from_element_mask(mask, config.block_q,
                                                  config.block_kv)


def lognorm_scale_weights(patch_nums) -> np.ndarray:
  """f32 [L] per-token loss weights of HMAR's "lognorm" reweighting.

  Scale i gets pdf_N(z_i) / sum(pdf) / pn_i**2 per token, with
  z_i = (pn_{K-1-i} / pn_K - mean) / std over pn / pn_K (sample std).
  """
  # SciPy is slow to import and only the loss weights need it.
  from scipy import stats  # pylint: disable=g-import-not-at-top

  pn = np.asarray(patch_nums, np.float64)
  ratio = pn / pn[-1]
  z = (ratio[::-1] - ratio.mean()) / ratio.std(ddof=1)
  pdf = stats.norm.pdf(z)
  per_scale = pdf / pdf.sum() / pn**2
  return np.repeat(per_scale, (pn**2).astype(int)).astype(np.float32)


class HMARMethod(base.SparseMethod):
  """Static scale-Markov (or block-causal) layout; parameter-free."""

  def __init__(self, config: HMARConfig = HMARConfig()):
    if config.rule not in ("markov", "causal"):
      raise ValueError(
          f"rule must be 'markov' or 'causal', got {config.rule!r}")
    self.config = config

  def plan(self, q, k, v, **kwargs) -> base.SparsePlan:
    """Plan over the L = sum(pn**2) tokens of all scales.

    Args:
      q: [B, L, Hq, D]; k, v: [B, L, Hkv, D].

    Returns:
      A SparsePlan with the shared host layout (and segment ids for the
      Markov rule).
    """
    del v, kwargs
    length = self.config.seq_len
    if q.shape[1] != length or k.shape[1] != length:
      raise ValueError(
          f"HMAR expects T = S = sum(pn**2) = {length}, got T={q.shape[1]}, "
          f"S={k.shape[1]}")
    layout = host_layout(self.config)
    if self.config.rule == "causal":
      return base.SparsePlan(layout=layout)
    seg = jnp.broadcast_to(jnp.asarray(scale_ids(self.config.patch_nums)),
                           (q.shape[0], length))
    return base.SparsePlan(layout=layout, q_segment_ids=seg,
                           kv_segment_ids=seg)


class HMARAttention(nnx.Module):
  """VAR/HMAR self-attention: L2-normalised q, k and a learnable scale.

  q and k are L2-normalised per head, q is multiplied by
  exp(min(s_h, ln 100)) with a learnable per-head log-scale s_h (init ln 4),
  and the softmax scale is 1. Projections have q and v biases, no k bias.
  """

  def __init__(self, dim: int, num_heads: int, config: HMARConfig, *,
               rngs: nnx.Rngs):
    """Builds the block.

    Args:
      dim: model width C (num_heads * head_dim).
      num_heads: H.
      config: the scale pattern.
      rngs: parameter RNGs.
    """
    head_dim = dim // num_heads
    self.num_heads = num_heads
    self.method = HMARMethod(config)
    self.query = nnx.LinearGeneral(dim, (num_heads, head_dim), rngs=rngs)
    self.key = nnx.LinearGeneral(dim, (num_heads, head_dim), use_bias=False,
                                 rngs=rngs)
    self.value = nnx.LinearGeneral(dim, (num_heads, head_dim), rngs=rngs)
    self.out = nnx.LinearGeneral((num_heads, head_dim), dim, axis=(-2, -1),
                                 rngs=rngs)
    self.log_scale = nnx.Param(jnp.full((num_heads,), math.log(4.0)))

  def __call__(self, x: jax.Array, *, implementation=None) -> jax.Array:
    """[B, L, C] -> [B, L, C]."""
    q, k, v = self.query(x), self.key(x), self.value(x)
    normalise = lambda t: t * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(t * t, -1, keepdims=True), 1e-24))
    scale = jnp.exp(jnp.minimum(self.log_scale[...], math.log(100.0)))
    q = normalise(q) * scale.reshape(1, 1, -1, 1)
    k = normalise(k)
    out = self.method(q, k, v, sm_scale=1.0, implementation=implementation)
    return self.out(out)
