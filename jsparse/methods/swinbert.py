"""SwinBERT: a learnable sparse attention mask over video tokens.

Paper: "SwinBERT: End-to-End Transformers with Sparse Attention for Video
Captioning", https://arxiv.org/abs/2111.13196 (CVPR 2022).

The encoder reads [caption (N_c) ; video (M)]. Caption queries see the real
caption causally and every video token; video queries see video tokens only,
gated by one input-independent soft mask A_vv = I + (1 - I) * sigmoid(W)
shared by all samples, heads and layers and pushed to zero by
lambda * mean((1 - I) * sigmoid(W)). Training adds the bias -10000 * (1 - A)
(official form) or log A (a labelled variant that lets the task loss shape
the mask); inference may threshold A >= 0.5 into a static hard layout.

The op takes only per-key biases, so the M x M bias enters as a pairwise
logit term of rank M (one-hot video query features, bias columns as key
features; see `SparsePlan.logit_q`). Its gradient is the op's gradient,
summed over batch and heads by the broadcast.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import static
from jsparse.methods import base
from pallas_kernels import layout as layout_lib

OFFICIAL = "official"
LOG_MASK = "log_mask"


@dataclasses.dataclass(frozen=True)
class SwinBERTConfig:
  """SwinBERT sequence structure and mask options.

  Attributes:
    num_caption: N_c caption slots (text first).
    num_video: M video tokens, M = F/2 * (R/32)**2 (784 for 32 x 224**2).
    bias_form: "official" (-10000 * (1 - A)) or "log_mask" (log A).
    sparsity_weight: lambda of the sparsity loss (0.5; 0.1 for TVC).
    threshold: hard-mode threshold on A_vv.
    block_size: layout block size.
  """

  num_caption: int = 50
  num_video: int = 784
  bias_form: str = OFFICIAL
  sparsity_weight: float = 0.5
  threshold: float = 0.5
  block_size: int = 128

  @property
  def seq_len(self) -> int:
    return self.num_caption + self.num_video


def structure_mask(config: SwinBERTConfig) -> np.ndarray:
  """bool [N, N] permission outside the learned part (rows are queries).

  Caption rows: causal over captions, all video; video rows: all video.
  """
  n, c = config.seq_len, config.num_caption
  i = np.arange(n)
  caption_q = i[:, None] < c
  caption_k = i[None, :] < c
  return np.where(caption_q, ~caption_k | (i[None, :] <= i[:, None]),
                  ~caption_k)


@functools.lru_cache(maxsize=16)
def structure_layout(config: SwinBERTConfig, padded: bool
                     ) -> layout_lib.BlockLayout:
  """Tile-pool layout of `structure_mask`; all blocks partial if `padded`."""
  layout = layout_lib.BlockLayout.from_element_mask(
      structure_mask(config)[None, None], config.block_size,
      config.block_size)
  return static.demote_full(layout) if padded else layout


def expand_diagonal(w0: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Length transfer: copy an M0 x M0 mask into each diagonal block of w.

  Entries outside the diagonal blocks keep their values in `w`.
  """
  w = np.array(w, copy=True)
  m0 = w0.shape[0]
  for start in range(0, w.shape[0] - m0 + 1, m0):
    w[start:start + m0, start:start + m0] = w0
  return w


class SwinBERTMethod(base.SparseMethod):
  """The learnable video mask and the plans it implies.

  Attributes:
    logits: nnx.Param W [M, M] ~ N(0, 1).
  """

  def __init__(self, config: SwinBERTConfig = SwinBERTConfig(), *,
               rngs: nnx.Rngs):
    if config.bias_form not in (OFFICIAL, LOG_MASK):
      raise ValueError(
          f"bias_form must be {OFFICIAL!r} or {LOG_MASK!r}, got "
          f"{config.bias_form!r}")
    self.config = config
    m = config.num_video
    self.logits = nnx.Param(jax.random.normal(rngs.params(), (m, m)))

  def soft_mask(self) -> jax.Array:
    """f32 [M, M] A_vv = I + (1 - I) * sigmoid(W)."""
    eye = jnp.eye(self.config.num_video, dtype=bool)
    return jnp.where(eye, 1.0, jax.nn.sigmoid(self.logits[...]))

  def video_bias(self) -> jax.Array:
    """f32 [M, M] additive logit bias of the video block (rows: queries)."""
    if self.config.bias_form == OFFICIAL:
      return -10000.0 * (1.0 - self.soft_mask())
    eye = jnp.eye(self.config.num_video, dtype=bool)
    return jnp.where(eye, 0.0, jax.nn.log_sigmoid(self.logits[...]))

  def sparsity_loss(self) -> jax.Array:
    """lambda * mean over all M**2 entries of the off-diagonal mask."""
    eye = jnp.eye(self.config.num_video, dtype=bool)
    off = jnp.where(eye, 0.0, jax.nn.sigmoid(self.logits[...]))
    return self.config.sparsity_weight * jnp.mean(off)

  def hard_video_mask(self) -> jax.Array:
    """bool [M, M] A_vv >= threshold (no gradient)."""
    return jax.lax.stop_gradient(self.soft_mask()) >= self.config.threshold

  def element_mask(self, *, hard: bool) -> jax.Array:
    """bool [N, N] logical mask; the soft video block counts as all-on."""
    mask = jnp.asarray(structure_mask(self.config))
    if hard:
      c = self.config.num_caption
      mask = mask.at[c:, c:].set(self.hard_video_mask())
    return mask

  def plan(self, q, k, v, *, caption_len: jax.Array | None = None,
           hard: bool = False, **kwargs) -> base.SparsePlan:
    """Plan over the N = N_c + M tokens [caption ; video].

    Args:
      q: [B, N, Hq, D]; k, v: [B, N, Hkv, D].
      caption_len: optional int [B] real caption lengths; caption keys past
        it are masked (their rows see nothing but are never read).
      hard: use the thresholded static layout instead of the soft bias.

    Returns:
      A SparsePlan: structure layout + pairwise video bias (soft), or the
      hard layout (host when W is concrete, traced under jit).
    """
    del v, kwargs
    cfg = self.config
    n, c = cfg.seq_len, cfg.num_caption
    if q.shape[1] != n or k.shape[1] != n:
      raise ValueError(
          f"SwinBERT expects T = S = N_c + M = {n}, got T={q.shape[1]}, "
          f"S={k.shape[1]}")
    segments = {}
    if caption_len is not None:
      kv_seg = (jnp.arange(n)[None] >= c) | (
          jnp.arange(n)[None] < caption_len[:, None])
      kv_seg = kv_seg.astype(jnp.int32)
      segments = dict(q_segment_ids=jnp.ones_like(kv_seg),
                      kv_segment_ids=kv_seg)
    if hard:
      return base.SparsePlan(layout=self._hard_layout(caption_len is not None),
                             **segments)
    # Video query i gets one-hot features e_i; video key j gets column j of
    # the bias, so q_i . k_j = bias[i, j]; caption rows and keys get zeros.
    eye = jnp.eye(cfg.num_video, dtype=jnp.float32)
    bias = self.video_bias()
    zeros = jnp.zeros((c, cfg.num_video), jnp.float32)
    logit_q = jnp.concatenate([zeros, eye], 0)[None, :, None]
    logit_k = jnp.concatenate([zeros, bias.T], 0)[None, :, None]
    return base.SparsePlan(layout=structure_layout(cfg, bool(segments)),
                           logit_q=logit_q, logit_k=logit_k, **segments)

  def _hard_layout(self, padded: bool) -> layout_lib.BlockLayout:
    """Host layout when W is concrete (exact Kmax); under jit a traced one
    with Kmax = Kb: the learned mask has no budget, so any kv block may be
    on."""
    mask = self.element_mask(hard=True)
    beta = self.config.block_size
    capacity = layout_lib.cdiv(self.config.seq_len, beta)
    if not isinstance(mask, jax.core.Tracer):
      mask, capacity = np.asarray(mask), None
    layout = layout_lib.BlockLayout.from_element_mask(
        mask[None, None], beta, beta, max_kv_blocks=capacity)
    return static.demote_full(layout) if padded else layout
