"""A small Vision Transformer classifier with pluggable (sparse) attention.

ViT ("An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929) with
a CLS token, learned position embeddings and pre-norm blocks, as in DeiT.
The attention core is dense softmax attention or any entry of
`jsparse.METHODS` (e.g. Sparsifiner, https://arxiv.org/abs/2303.13755);
`__call__(..., dense=True)` runs every layer densely whatever the method and
returns the attention maps, as distillation from a dense teacher needs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse import methods as methods_lib


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Model hyperparameters.

  Attributes:
    image_size: input side R.
    patch_size: patch side p (R / p patches per side).
    in_channels: image channels C.
    hidden_size: width F.
    depth: number of blocks.
    num_heads: attention heads H; head_dim = F / H.
    mlp_ratio: MLP width / F.
    num_classes: classifier outputs.
    attention: "dense" or a key of jsparse.METHODS.
    method_config: the method's frozen config; a `num_tokens` field, if any,
      is set to this model's token count.
    implementation: block-sparse op backend (None: best available).
  """

  image_size: int = 16
  patch_size: int = 2
  in_channels: int = 1
  hidden_size: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_classes: int = 10
  attention: str = "dense"
  method_config: Any = None
  implementation: str | None = None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_tokens(self) -> int:
    """N: patches plus the CLS token."""
    return (self.image_size // self.patch_size) ** 2 + 1


def _make_method(config: ViTConfig, rngs: nnx.Rngs):
  """The attention method of `config` (None: dense)."""
  if config.attention == "dense":
    return None
  if config.attention not in methods_lib.METHODS:
    raise ValueError(
        f"attention must be 'dense' or one of {sorted(methods_lib.METHODS)}, "
        f"got {config.attention!r}")
  cls = methods_lib.METHODS[config.attention]
  method_config = config.method_config
  if method_config is not None and "num_tokens" in {
      f.name for f in dataclasses.fields(method_config)}:
    method_config = dataclasses.replace(method_config,
                                        num_tokens=config.num_tokens)
  params = inspect.signature(cls.__init__).parameters
  if "num_heads" in params:
    return cls(method_config, config.num_heads, config.head_dim, rngs=rngs)
  return cls(method_config) if method_config is not None else cls()


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array):
  """Softmax attention with its probabilities.

  Args:
    q, k, v: [B, N, H, D].

  Returns:
    (out [B, N, H, D], f32 probs [B, H, N, N]).
  """
  scores = jnp.einsum("bnhd,bmhd->bhnm", q, k,
                      preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), -1)
  out = jnp.einsum("bhnm,bmhd->bnhd", probs, v.astype(jnp.float32))
  return out.astype(v.dtype), probs


class Attention(nnx.Module):
  """Multi-head self-attention with a pluggable core."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    f = config.hidden_size
    self.config = config
    self.qkv = nnx.Linear(f, 3 * f, rngs=rngs)
    self.out = nnx.Linear(f, f, rngs=rngs)
    self.method = nnx.data(_make_method(config, rngs))

  def __call__(self, x: jax.Array, *, dense: bool = False):
    """x [B, N, F] -> (out [B, N, F], aux {"q", "k": [B, N, H, D], "probs":
    [B, H, N, N] or None}); dense=True ignores the method."""
    cfg = self.config
    b, n, _ = x.shape
    q, k, v = jnp.split(
        self.qkv(x).reshape(b, n, 3 * cfg.num_heads, cfg.head_dim), 3, 2)
    probs = None
    if dense or self.method is None:
      o, probs = dense_attention(q, k, v)
    else:
      o = self.method(q, k, v, implementation=cfg.implementation)
    return self.out(o.reshape(b, n, -1)), {"q": q, "k": k, "probs": probs}


class Block(nnx.Module):
  """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    f = config.hidden_size
    hidden = int(f * config.mlp_ratio)
    self.norm_attn = nnx.LayerNorm(f, epsilon=1e-6, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.norm_mlp = nnx.LayerNorm(f, epsilon=1e-6, rngs=rngs)
    self.mlp_in = nnx.Linear(f, hidden, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, f, rngs=rngs)

  def __call__(self, x, *, dense: bool = False):
    h, aux = self.attn(self.norm_attn(x), dense=dense)
    x = x + h
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm_mlp(x))))
    return x, aux


class ViT(nnx.Module):
  """Images [B, R, R, C] -> class logits [B, num_classes]."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      config: a ViTConfig; `attention`/`method_config` pick the core.
      rngs: parameter RNGs.
    """
    if config.image_size % config.patch_size:
      raise ValueError(f"image_size {config.image_size} is not a multiple "
                       f"of patch_size {config.patch_size}")
    if config.hidden_size % config.num_heads:
      raise ValueError(f"hidden_size {config.hidden_size} is not divisible "
                       f"by num_heads {config.num_heads}")
    self.config = config
    f, p = config.hidden_size, config.patch_size
    init = nnx.initializers.truncated_normal(0.02)
    self.patch_embed = nnx.Linear(p * p * config.in_channels, f, rngs=rngs)
    self.cls = nnx.Param(init(rngs.params(), (1, 1, f)))
    self.pos = nnx.Param(init(rngs.params(), (1, config.num_tokens, f)))
    self.blocks = nnx.List([Block(config, rngs=rngs)
                            for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(f, epsilon=1e-6, rngs=rngs)
    self.head = nnx.Linear(f, config.num_classes, rngs=rngs)

  def __call__(self, images: jax.Array, *, dense: bool = False,
               with_aux: bool = False):
    """Classifies images.

    Args:
      images: [B, R, R, C].
      dense: run every layer densely (the method is ignored).
      with_aux: also return the per-layer tensors.

    Returns:
      f32 logits [B, num_classes]; with `with_aux`, (logits, aux) where aux
      has "tokens" (final normed tokens [B, N, F]) and per-layer lists "q",
      "k" ([B, N, H, D]) and "probs" ([B, H, N, N], None for sparse layers).
    """
    cfg = self.config
    b, r, _, c = images.shape
    p, g = cfg.patch_size, r // cfg.patch_size
    patches = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch_embed(patches.reshape(b, g * g, p * p * c))
    x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])),
                         x], 1) + self.pos[...]
    aux = {"q": [], "k": [], "probs": []}
    for block in self.blocks:
      x, layer = block(x, dense=dense)
      for name in aux:
        aux[name].append(layer[name])
    x = self.norm(x)
    logits = self.head(x[:, 0]).astype(jnp.float32)
    if not with_aux:
      return logits
    return logits, {"tokens": x, **aux}
