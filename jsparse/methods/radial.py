"""Radial Attention: a static O(n log n) mask from spatiotemporal decay.

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
Long Video Generation", https://arxiv.org/abs/2506.19852 (NeurIPS 2025).

Video tokens are frame-major (f frames x s tokens). For a query in frame a
at in-frame index x and a key in frame b at index y, d = |a - b|: frames with
d <= 1 see each other fully; for d >= 2 the band g = bit_length(d) allows
|x - y| <= max(decay * S / 2**g, block) with S = 2**bit_length(s), and once
S / 2**g drops below one block only every (block / (S / 2**g))-th frame
distance is kept. Frame 0 is an attention sink (Wan), and text tokens
appended after the video are dense. The token mask is reduced per frame pair
to a block layout by the official majority rule; the op then runs exact
block-sparse attention with no element mask. The layout is built once on the
host (exact Kmax), never under jit.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jsparse.methods import base
from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class RadialConfig:
  """Radial attention pattern and dense warm-up policy.

  Attributes:
    num_frames: f, latent frames.
    tokens_per_frame: s, tokens per frame (row-major h x w).
    num_text_tokens: text tokens after the video (HunyuanVideo), dense.
    block_size: beta, the layout block (128 on GPU in the paper).
    decay_factor: scales the spatial window (0.2 Wan, 0.95 Hunyuan).
    sink_frame: frame 0 is visible to every query (Wan).
    dense_timesteps: the first denoising steps run dense attention.
    dense_layers: the first transformer blocks run dense attention.
    keep_threshold: a block is kept when more than this fraction of its
      non-empty columns are dense (0.6 in the official code).
    column_threshold: a column counts as dense above this fraction of the
      block's rows (1/3 in the official code).
  """

  num_frames: int = 8
  tokens_per_frame: int = 256
  num_text_tokens: int = 0
  block_size: int = 128
  decay_factor: float = 1.0
  sink_frame: bool = True
  dense_timesteps: int = 0
  dense_layers: int = 0
  keep_threshold: float = 0.6
  column_threshold: float = 1.0 / 3.0

  @property
  def video_len(self) -> int:
    return self.num_frames * self.tokens_per_frame

  @property
  def seq_len(self) -> int:
    return self.video_len + self.num_text_tokens


def _window_and_keep(config: RadialConfig, d: int) -> tuple[float, bool]:
  """Spatial half-width and whether frame distance d >= 2 is kept."""
  s_pow2 = 2 ** int(config.tokens_per_frame).bit_length()
  base_len = s_pow2 / 2 ** int(d).bit_length()
  width = max(base_len * config.decay_factor, config.block_size)
  if base_len >= config.block_size:
    return width, True
  return width, d % int(config.block_size / base_len) == 0


def frame_pair_mask(config: RadialConfig, a: int, b: int) -> np.ndarray:
  """bool [s, s]: tokens of query frame a that see tokens of key frame b."""
  s = config.tokens_per_frame
  d = abs(a - b)
  if d <= 1 or (config.sink_frame and b == 0):
    return np.ones((s, s), bool)
  width, keep = _window_and_keep(config, d)
  if not keep:
    return np.zeros((s, s), bool)
  x = np.arange(s)
  return np.abs(x[:, None] - x[None, :]) <= width


def token_mask(config: RadialConfig) -> np.ndarray:
  """bool [n, n] token-level radial mask (rules 1-4 of the paper's code)."""
  f, s, n = config.num_frames, config.tokens_per_frame, config.seq_len
  mask = np.ones((n, n), bool)
  for a in range(f):
    for b in range(f):
      mask[a * s:(a + 1) * s, b * s:(b + 1) * s] = frame_pair_mask(config, a,
                                                                   b)
  return mask


def _reduce(mask: np.ndarray, block: int, keep_threshold: float,
            column_threshold: float) -> np.ndarray:
  """Majority rule: [R*block, C*block] bool -> [R, C] kept blocks."""
  r, c = mask.shape[0] // block, mask.shape[1] // block
  col_density = mask.reshape(r, block, c, block).mean(1)  # [R, C, block]
  nonzero = (col_density > 0).sum(-1)
  dense = (col_density > column_threshold).sum(-1)
  return dense > keep_threshold * np.maximum(nonzero, 1)


@functools.lru_cache(maxsize=16)
def block_mask(config: RadialConfig) -> np.ndarray:
  """bool [nb, nb] kept blocks, nb = ceil(n / block_size).

  Each frame pair's token mask is placed at its true offset inside the
  blocks it touches and reduced there; the per-pair results are OR-ed. Text
  rows and columns are dense.
  """
  f, s, beta = config.num_frames, config.tokens_per_frame, config.block_size
  nb = layout_lib.cdiv(config.seq_len, beta)
  out = np.zeros((nb, nb), bool)
  video_end = config.video_len // beta
  out[video_end:] = True
  out[:, video_end:] = True
  reduced = {}
  for a in range(f):
    for b in range(f):
      row0, col0 = a * s, b * s
      key = (abs(a - b), config.sink_frame and b == 0, row0 % beta,
             col0 % beta)
      if key not in reduced:
        rows = layout_lib.cdiv(row0 % beta + s, beta)
        cols = layout_lib.cdiv(col0 % beta + s, beta)
        canvas = np.zeros((rows * beta, cols * beta), bool)
        canvas[row0 % beta:row0 % beta + s,
               col0 % beta:col0 % beta + s] = frame_pair_mask(config, a, b)
        reduced[key] = _reduce(canvas, beta, config.keep_threshold,
                               config.column_threshold)
      part = reduced[key]
      r0, c0 = row0 // beta, col0 // beta
      view = out[r0:r0 + part.shape[0], c0:c0 + part.shape[1]]
      view |= part[:view.shape[0], :view.shape[1]]
  return out


@functools.lru_cache(maxsize=16)
def host_layout(config: RadialConfig) -> layout_lib.BlockLayout:
  """The shared static layout: every kept block full (no element mask)."""
  kept = block_mask(config)[None, None]
  return layout_lib.BlockLayout.from_block_mask(
      kept, config.block_size, config.block_size, full_block_mask=kept)


class RadialMethod(base.SparseMethod):
  """Static radial layout, with dense warm-up steps and layers."""

  def __init__(self, config: RadialConfig = RadialConfig()):
    self.config = config

  def is_dense(self, step: int | None = None,
               layer: int | None = None) -> bool:
    """Whether the dense warm-up policy applies at (step, layer)."""
    return ((step is not None and step < self.config.dense_timesteps) or
            (layer is not None and layer < self.config.dense_layers))

  def plan(self, q, k, v, *, step: int | None = None,
           layer: int | None = None, **kwargs) -> base.SparsePlan:
    """Plan over the n = f*s (+ text) tokens.

    Args:
      q: [B, n, Hq, D]; k, v: [B, n, Hkv, D].
      step: denoising step (static int), for the dense warm-up.
      layer: transformer block index (static int), for the dense warm-up.

    Returns:
      A SparsePlan with the shared host layout (dense during warm-up).
    """
    del v, kwargs
    n, beta = self.config.seq_len, self.config.block_size
    if q.shape[1] != n or k.shape[1] != n:
      raise ValueError(
          f"Radial expects T = S = f*s + text = {n}, got T={q.shape[1]}, "
          f"S={k.shape[1]}")
    if self.is_dense(step, layer):
      return base.SparsePlan(layout=layout_lib.BlockLayout.dense(
          n, n, block_q=beta, block_kv=beta))
    return base.SparsePlan(layout=host_layout(self.config))
