"""A small decoder-only language model with pluggable attention.

Llama/Doge-style blocks: RMSNorm pre-norm, grouped-query attention with
per-head q/k RMSNorm and rotary embeddings (rotate-half), SwiGLU MLP, tied
input/output embeddings. The attention core is the one block-sparse op of
jsparse, planned as causal dense, causal sliding window, or by any entry of
`jsparse.METHODS` (e.g. DMA, https://arxiv.org/abs/2508.02124).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse import methods as methods_lib
from jsparse.methods import base
from pallas_kernels import layout as layout_lib

DENSE = "dense"
WINDOW = "window"


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Model hyperparameters.

  Attributes:
    vocab_size: V (256 for bytes).
    num_layers: decoder blocks.
    d_model: width F.
    num_heads: query heads Hq.
    num_kv_heads: key/value heads Hkv (GQA), dividing Hq.
    mlp_hidden: SwiGLU hidden width.
    rope_theta: RoPE base.
    attention: "dense" (causal), "window" (causal sliding window of
      `window` keys, the query's own included) or a key of jsparse.METHODS.
    window: keys per query of the "window" attention.
    method_config: the method's frozen config; its `num_kv_heads` and
      `head_dim` fields, if any, are set from this config.
    block_size: layout block size of dense/window (clipped to T).
    implementation: block-sparse op backend (None: best available).
  """

  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_hidden: int = 352
  rope_theta: float = 10000.0
  attention: str = DENSE
  window: int = 64
  method_config: Any = None
  block_size: int = 64
  implementation: str | None = None

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def rope(x: jax.Array, theta: float) -> jax.Array:
  """Rotate-half rotary embedding at positions 0..T-1.

  Args:
    x: [B, T, H, D] with even D.
    theta: base.

  Returns:
    [B, T, H, D] in x's dtype.
  """
  t, d = x.shape[1], x.shape[-1]
  freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
  cos = jnp.cos(angle)[None, :, None, :]
  sin = jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return out.astype(x.dtype)


def _method_config(config: LMConfig):
  """The method config with the model's head geometry filled in."""
  method_config = config.method_config
  if method_config is None:
    return None
  names = {f.name for f in dataclasses.fields(method_config)}
  geometry = {"num_kv_heads": config.num_kv_heads,
              "head_dim": config.head_dim}
  return dataclasses.replace(
      method_config, **{k: v for k, v in geometry.items() if k in names})


class Attention(nnx.Module):
  """Causal GQA self-attention with q/k RMSNorm, RoPE and a planner."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    f, d = config.d_model, config.head_dim
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.q_proj = linear(f, config.num_heads * d)
    self.k_proj = linear(f, config.num_kv_heads * d)
    self.v_proj = linear(f, config.num_kv_heads * d)
    self.o_proj = linear(config.num_heads * d, f)
    self.q_norm = nnx.RMSNorm(d, rngs=rngs)
    self.k_norm = nnx.RMSNorm(d, rngs=rngs)
    if config.attention in (DENSE, WINDOW):
      self.method = nnx.data(None)
    elif config.attention in methods_lib.METHODS:
      cls = methods_lib.METHODS[config.attention]
      method_config = _method_config(config)
      self.method = (cls(rngs=rngs) if method_config is None
                     else cls(method_config, rngs=rngs))
    else:
      raise ValueError(
          f"attention must be {DENSE!r}, {WINDOW!r} or one of "
          f"{sorted(methods_lib.METHODS)}, got {config.attention!r}")

  def plan(self, q, k, v) -> base.SparsePlan:
    """The SparsePlan of this call (static layouts for dense/window)."""
    cfg = self.config
    if self.method is not None:
      return self.method.plan(q, k, v)
    t = q.shape[1]
    block = min(cfg.block_size, t)
    if cfg.attention == DENSE:
      layout = layout_lib.BlockLayout.causal(t, block_q=block, block_kv=block)
    else:
      layout = layout_lib.BlockLayout.local(
          t, window=(cfg.window - 1, 0), block_q=block, block_kv=block)
    return base.SparsePlan(layout=layout)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, F] -> [B, T, F]."""
    cfg = self.config
    b, t, _ = x.shape
    d = cfg.head_dim
    q = self.q_norm(self.q_proj(x).reshape(b, t, cfg.num_heads, d))
    k = self.k_norm(self.k_proj(x).reshape(b, t, cfg.num_kv_heads, d))
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, d)
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    out = self.plan(q, k, v).attend(q, k, v,
                                    implementation=cfg.implementation)
    return self.o_proj(out.reshape(b, t, cfg.num_heads * d))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    f, h = config.d_model, config.mlp_hidden
    self.gate = nnx.Linear(f, h, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(f, h, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(h, f, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(config.d_model, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(config.d_model, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class LM(nnx.Module):
  """Decoder-only LM: tokens [B, T] -> next-token logits [B, T, V]."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.d_model,
                           embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm = nnx.RMSNorm(config.d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Args: tokens int [B, T]. Returns: f32 logits [B, T, V]."""
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x)).astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy in nats.

  Args:
    logits: f32 [B, T, V].
    targets: int [B, T].
    weights: optional f32 [B, T] (e.g. 1 on answer positions only).

  Returns:
    f32 scalar.
  """
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  if weights is None:
    return nll.mean()
  return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)
