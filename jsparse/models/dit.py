"""Pixel-space DiT with 2-D RoPE and pluggable (sparse) attention.

The "RopeDiT" of LLSA (arXiv 2512.16615, SingleZombie/LLSA): one token per
pixel (no patchify, no VAE), qk RMSNorm, interleaved 2-D RoPE on pixel
coordinates, adaLN-Zero blocks each with its own timestep embedder, and an
unconditional velocity head. With `token_permutation`, tokens are put in
quadtree Z-order after the input projection (and the RoPE table with them)
and restored before the output head, so consecutive tokens form square
patches, as LLSA's pooling needs.

Attention is dense (`jax.nn.dot_product_attention`) or any entry of
`jsparse.METHODS`, built from its name and config options.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import methods as methods_lib
from jsparse.methods import llsa


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Model hyperparameters (defaults: the paper's DiT-S/1).

  Attributes:
    image_size: image side R (a power of two with `token_permutation`).
    in_channels: image channels (3 for RGB).
    hidden_size: width F.
    depth: number of blocks.
    num_heads: attention heads; head_dim = F / num_heads, split in half
      between the row and column RoPE axes.
    mlp_ratio: MLP width / F.
    rope_theta: RoPE base.
    token_permutation: quadtree Z-order token order inside the blocks.
    attention: "dense" or a key of jsparse.METHODS.
    method_config: the method's frozen config (None: its defaults).
    implementation: block-sparse op backend (None: best available).
    dtype: computation dtype (parameters stay f32).
  """

  image_size: int = 32
  in_channels: int = 3
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  rope_theta: float = 10000.0
  token_permutation: bool = True
  attention: str = "dense"
  method_config: Any = None
  implementation: str | None = None
  dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def method_config_class(name: str) -> type:
  """The config dataclass of METHODS[name] (its `config` init argument)."""
  cls = methods_lib.METHODS[name]
  annotation = inspect.signature(cls.__init__).parameters["config"].annotation
  if isinstance(annotation, str):
    annotation = typing.get_type_hints(cls.__init__)["config"]
  return annotation


def make_method_config(name: str, options: Mapping[str, Any] | None = None):
  """A method config from its name and keyword options (None: dense).

  Args:
    name: "dense" or a key of jsparse.METHODS.
    options: field values of the method's config dataclass; lists become
      tuples so the config stays hashable.

  Raises:
    ValueError: for an unknown name.
  """
  if name == "dense":
    return None
  if name not in methods_lib.METHODS:
    raise ValueError(
        f"attention must be 'dense' or one of {sorted(methods_lib.METHODS)}, "
        f"got {name!r}")
  options = {key: tuple(val) if isinstance(val, list) else val
             for key, val in (options or {}).items()}
  return method_config_class(name)(**options)


def rope_angles(positions: np.ndarray, head_dim: int,
                theta: float) -> np.ndarray:
  """f32 [N, head_dim / 2] rotation angles of 2-D interleaved RoPE.

  The first half of the pairs rotates with the row, the second with the
  column; pair i of an axis of A dims has frequency theta^(-2i / A).

  Args:
    positions: [N, 2] (row, col) pixel coordinates of each token.
    head_dim: D, a multiple of 4.
    theta: RoPE base.
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs head_dim % 4 == 0, got {head_dim}")
  axis_dim = head_dim // 2
  omega = 1.0 / theta**(np.arange(0, axis_dim, 2, dtype=np.float64)
                        / axis_dim)
  angles = [positions[:, i, None].astype(np.float64) * omega
            for i in range(2)]
  return np.concatenate(angles, axis=-1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def token_tables(image_size: int, head_dim: int, theta: float,
                 token_permutation: bool):
  """Token order and RoPE table of an image (constants, built on host).

  Returns:
    perm, inverse: int [N] Z-order permutation and its inverse (None
      without `token_permutation`), and angles f32 [N, head_dim / 2] for the
      tokens in model order.
  """
  rows, cols = np.divmod(np.arange(image_size * image_size), image_size)
  positions = np.stack([rows, cols], -1)
  perm = inverse = None
  if token_permutation:
    perm, inverse = llsa.zorder_permutation(image_size)
    positions = positions[perm]
  return perm, inverse, rope_angles(positions, head_dim, theta)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates interleaved (even, odd) pairs of x [B, N, H, D] by [N, D/2]."""
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None]
  sin = jnp.sin(angles)[None, :, None]
  even, odd = x[..., 0], x[..., 1]
  out = jnp.stack([cos * even - sin * odd, sin * even + cos * odd], -1)
  return out.reshape(*out.shape[:-2], -1).astype(dtype)


def timestep_features(t: jax.Array, dim: int = 256) -> jax.Array:
  """Sinusoidal features [B, dim] of timesteps t [B] (cos first).

  Frequencies exp(-log(10^4) * i / (dim/2 - 1)), as diffusers' Timesteps
  with flip_sin_to_cos=True and downscale_freq_shift=1.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32)
                  / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """t [B] -> [B, F]: sinusoidal 256 -> Linear -> SiLU -> Linear."""

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs,
               freq_dim: int = 256):
    self.freq_dim = freq_dim
    self.linear_1 = nnx.Linear(freq_dim, hidden_size, rngs=rngs)
    self.linear_2 = nnx.Linear(hidden_size, hidden_size, rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    x = self.linear_1(timestep_features(t, self.freq_dim))
    return self.linear_2(jax.nn.silu(x))


class Attention(nnx.Module):
  """Self-attention with qk RMSNorm, 2-D RoPE and a pluggable core."""

  def __init__(self, config: DiTConfig, method, *, rngs: nnx.Rngs):
    f, h, d = config.hidden_size, config.num_heads, config.head_dim
    self.num_heads = h
    self.head_dim = d
    self.implementation = config.implementation
    self.qkv = nnx.Linear(f, 3 * f, dtype=config.dtype, rngs=rngs)
    self.norm_q = nnx.RMSNorm(d, epsilon=1e-6, rngs=rngs)
    self.norm_k = nnx.RMSNorm(d, epsilon=1e-6, rngs=rngs)
    self.out = nnx.Linear(f, f, dtype=config.dtype, rngs=rngs)
    self.method = method

  def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
    """x [B, N, F], angles [N, D/2] -> [B, N, F]."""
    b, n, _ = x.shape
    q, k, v = jnp.split(
        self.qkv(x).reshape(b, n, 3 * self.num_heads, self.head_dim), 3,
        axis=2)
    q = apply_rope(self.norm_q(q).astype(v.dtype), angles)
    k = apply_rope(self.norm_k(k).astype(v.dtype), angles)
    if self.method is None:
      o = jax.nn.dot_product_attention(q, k, v)
    else:
      o = self.method(q, k, v, implementation=self.implementation)
    return self.out(o.reshape(b, n, -1))


class DiTBlock(nnx.Module):
  """adaLN-Zero block: x += gate * f(norm(x) * (1 + scale) + shift)."""

  def __init__(self, config: DiTConfig, method, *, rngs: nnx.Rngs):
    f = config.hidden_size
    hidden = int(f * config.mlp_ratio)
    self.time_embed = TimestepEmbedder(f, rngs=rngs)
    self.modulation = nnx.Linear(f, 6 * f, kernel_init=nnx.initializers.zeros,
                                 rngs=rngs)
    self.norm_attn = nnx.LayerNorm(f, epsilon=1e-6, use_bias=False,
                                   use_scale=False, rngs=rngs)
    self.attn = Attention(config, method, rngs=rngs)
    self.norm_mlp = nnx.LayerNorm(f, epsilon=1e-5, use_bias=False,
                                  use_scale=False, rngs=rngs)
    self.mlp_in = nnx.Linear(f, hidden, dtype=config.dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, f, dtype=config.dtype, rngs=rngs)

  def __call__(self, x, temb, angles):
    """x [B, N, F], temb [B, F] (this block's embedding), angles [N, D/2]."""
    mod = self.modulation(jax.nn.silu(temb))[:, None].astype(jnp.float32)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6,
                                                                   -1)
    h = self.norm_attn(x) * (1 + scale_a) + shift_a
    x = x + gate_a * self.attn(h, angles)
    h = self.norm_mlp(x) * (1 + scale_m) + shift_m
    h = self.mlp_in(h)
    h = self.mlp_out(jax.nn.gelu(h, approximate=True))
    return x + gate_m * h


class DiT(nnx.Module):
  """Unconditional pixel-space DiT predicting the flow velocity."""

  def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      config: a DiTConfig; its `attention`/`method_config` pick the core.
      rngs: parameter RNGs.
    """
    self.config = config
    f = config.hidden_size
    if f % config.num_heads:
      raise ValueError(
          f"hidden_size {f} is not divisible by num_heads "
          f"{config.num_heads}")
    method = None
    if config.attention != "dense":
      method_config = config.method_config or make_method_config(
          config.attention)
      method = methods_lib.METHODS[config.attention](method_config)
    self.proj_in = nnx.Linear(config.in_channels, f, rngs=rngs)
    self.blocks = nnx.List([DiTBlock(config, method, rngs=rngs)
                            for _ in range(config.depth)])
    self.norm_out = nnx.LayerNorm(f, epsilon=1e-6, use_bias=False,
                                  use_scale=False, rngs=rngs)
    self.proj_out_1 = nnx.Linear(f, 2 * f, rngs=rngs)
    self.proj_out_2 = nnx.Linear(f, config.in_channels,
                                 kernel_init=nnx.initializers.zeros,
                                 rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """Predicts the velocity.

    Args:
      x: [B, R, R, C] noisy images.
      t: [B] timesteps in [0, 1000] (1000 * sigma).

    Returns:
      [B, R, R, C] f32 velocity.
    """
    b, r, _, c = x.shape
    if r != self.config.image_size:
      raise ValueError(
          f"model built for {self.config.image_size}^2 images, got {r}^2")
    perm, inverse, angles = token_tables(
        r, self.config.head_dim, self.config.rope_theta,
        self.config.token_permutation)
    h = self.proj_in(x.reshape(b, r * r, c).astype(jnp.float32))
    if perm is not None:
      h = h[:, perm]
    angles = jnp.asarray(angles)
    temb0 = None
    for block in self.blocks:
      temb = block.time_embed(t)
      temb0 = temb if temb0 is None else temb0
      h = block(h, temb, angles)
    if inverse is not None:
      h = h[:, inverse]
    shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(temb0))[:, None], 2,
                             -1)
    h = self.norm_out(h) * (1 + scale) + shift
    return self.proj_out_2(h).reshape(b, r, r, c)
