"""SparseAttention: multi-head attention whose core is one block-sparse op.

The module mirrors `flax.nnx.MultiHeadAttention` (same projections, parameter
names and shapes, GQA through `num_kv_heads`, `init_cache` + `decode=True`
for autoregressive decoding), and delegates the choice of visible blocks to a
`SparseMethod`. With `method=None` it is dense attention through the same op.
"""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse.masks import static
from jsparse.methods import base
from pallas_kernels import layout as layout_lib


def dense_plan(q_len: int, kv_len: int, *, causal: bool = False,
               block: int = 128) -> base.SparsePlan:
  """The plan of plain (optionally causal) dense attention."""
  block_q, block_kv = min(block, q_len), min(block, kv_len)
  if causal:
    layout = layout_lib.BlockLayout.causal(q_len, kv_len, block_q=block_q,
                                           block_kv=block_kv)
  else:
    layout = layout_lib.BlockLayout.dense(q_len, kv_len, block_q=block_q,
                                          block_kv=block_kv)
  return base.SparsePlan(layout=layout)


def dense_decode_plan(batch: int, max_len: int, index: jax.Array, *,
                      block: int = 128) -> base.SparsePlan:
  """One query at position `index` sees the cache entries 0..index.

  The index may be traced, so validity is a segment predicate over every
  (partial) block rather than a static band.
  """
  layout = static.partial_dense_layout(1, max_len, 1, min(block, max_len))
  kv_seg = (jnp.arange(max_len) <= index).astype(jnp.int32)
  return base.SparsePlan(
      layout=layout, q_segment_ids=jnp.ones((batch, 1), jnp.int32),
      kv_segment_ids=jnp.broadcast_to(kv_seg, (batch, max_len)))


class SparseAttention(nnx.Module):
  """Multi-head attention with a pluggable sparse method.

  Attributes:
    num_heads: query heads Hq.
    num_kv_heads: key/value heads Hkv (GQA when < num_heads).
    head_dim: D = qkv_features // num_heads.
    method: the SparseMethod planning each call, or None for dense.
  """

  def __init__(self, num_heads: int, in_features: int,
               qkv_features: int | None = None,
               out_features: int | None = None,
               num_kv_heads: int | None = None,
               in_kv_features: int | None = None, *,
               method: base.SparseMethod | None = None,
               implementation: str | None = None,
               interpret: bool = False,
               rope_theta: float | None = None,
               sm_scale: float | None = None,
               use_bias: bool = True,
               normalize_qk: bool = False,
               decode: bool | None = None,
               dtype=None, param_dtype=jnp.float32,
               kernel_init=nnx.initializers.lecun_normal(),
               bias_init=nnx.initializers.zeros_init(),
               rngs: nnx.Rngs):
    """Builds the projections.

    Args:
      num_heads: query heads Hq.
      in_features: input feature size F of the queries.
      qkv_features: Hq * D; default `in_features`.
      out_features: output size; default `in_features`.
      num_kv_heads: Hkv dividing Hq; default Hq.
      in_kv_features: input size of keys/values; default `in_features`.
      method: a SparseMethod instance, or None for dense attention.
      implementation: op backend ("xla", "reference", ...; None: best).
      interpret: run Pallas backends in interpret mode.
      rope_theta: apply rotary embeddings (rotate-half convention, as
        `nnx.RoPE`) with this base to q and k; None: no RoPE.
      sm_scale: logit scale; default 1 / sqrt(D).
      use_bias: biases in the q/k/v/out projections.
      normalize_qk: LayerNorm on q and k per head (as nnx).
      decode: default for the call's `decode` flag.
      dtype: computation dtype; param_dtype: parameter dtype.
      kernel_init: projection kernel initialiser.
      bias_init: projection bias initialiser.
      rngs: parameter RNGs.
    """
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = qkv_features or in_features
    self.out_features = out_features or in_features
    self.in_kv_features = in_kv_features or in_features
    self.num_kv_heads = num_kv_heads or num_heads
    if num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({num_heads}) must be divisible by num_kv_heads "
          f"({self.num_kv_heads})")
    if self.qkv_features % num_heads:
      raise ValueError(
          f"qkv_features ({self.qkv_features}) must be divisible by "
          f"num_heads ({num_heads})")
    self.head_dim = self.qkv_features // num_heads
    self.method = method
    self.implementation = implementation
    self.interpret = interpret
    self.sm_scale = sm_scale
    self.decode = decode
    self.rope = None if rope_theta is None else nnx.RoPE(theta=rope_theta)
    linear = functools.partial(nnx.LinearGeneral, use_bias=use_bias,
                               dtype=dtype, param_dtype=param_dtype,
                               kernel_init=kernel_init, bias_init=bias_init,
                               rngs=rngs)
    self.query = linear(in_features, (num_heads, self.head_dim))
    self.key = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim))
    self.value = linear(self.in_kv_features,
                        (self.num_kv_heads, self.head_dim))
    if normalize_qk:
      norm = functools.partial(nnx.LayerNorm, self.head_dim, use_bias=False,
                               dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
      self.query_ln, self.key_ln = norm(), norm()
    else:
      self.query_ln = self.key_ln = nnx.data(None)
    self.out = linear((num_heads, self.head_dim), self.out_features,
                      axis=(-2, -1))
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)

  def init_cache(self, input_shape, dtype=jnp.float32) -> None:
    """Allocates the decode cache for inputs of shape [B, S_max, F]."""
    shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

  def _rotate(self, x, positions):
    if self.rope is None:
      return x
    apply = jax.vmap(self.rope, in_axes=(-2, None), out_axes=-2)
    return apply(x, positions.astype(jnp.float32))

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *, causal: bool = False,
               positions: jax.Array | None = None,
               decode: bool | None = None, return_plan: bool = False,
               **method_kwargs):
    """Attention of `inputs_q` over `inputs_k`/`inputs_v` (default: self).

    Args:
      inputs_q: [B, T, F].
      inputs_k: [B, S, F_kv]; default `inputs_q`.
      inputs_v: [B, S, F_kv]; default `inputs_k`.
      causal: dense causal attention when `method` is None (methods decide
        causality themselves).
      positions: [T] RoPE positions (also of the keys when S == T); default
        arange. Ignored in decode, where the cache index is the position.
      decode: one-token decoding against the cache (`init_cache` first).
      return_plan: also return the SparsePlan used.
      **method_kwargs: call-time context for `method.plan` (step, layer...).

    Returns:
      [B, T, out_features] (and the plan with `return_plan`).
    """
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    q = self.query(inputs_q)
    k = self.key(inputs_k)
    v = self.value(inputs_v)
    if self.query_ln is not None:
      q, k = self.query_ln(q), self.key_ln(k)
    decode = self.decode if decode is None else decode
    if decode:
      q, k, v, plan = self._decode_step(q, k, v)
    else:
      t, s = q.shape[1], k.shape[1]
      if self.rope is not None:
        q_pos = jnp.arange(t) if positions is None else positions
        k_pos = q_pos if s == t else jnp.arange(s)
        q, k = self._rotate(q, q_pos), self._rotate(k, k_pos)
      if self.method is None:
        plan = dense_plan(t, s, causal=causal)
      else:
        plan = self.method.plan(q, k, v, **method_kwargs)
    x = plan.attend(q, k, v, sm_scale=self.sm_scale,
                    implementation=self.implementation,
                    interpret=self.interpret)
    out = self.out(x)
    return (out, plan) if return_plan else out

  def _decode_step(self, q, k, v):
    if self.cache_index is None:
      raise ValueError(
          "autoregressive cache not initialised: call init_cache first")
    batch, max_len = self.cached_key.shape[:2]
    if q.shape[1] != 1:
      raise ValueError(f"decode takes one token, got T={q.shape[1]}")
    index = self.cache_index[...]
    position = index[None]
    q, k = self._rotate(q, position), self._rotate(k, position)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, index, zero, zero)
    keys = jax.lax.dynamic_update_slice(self.cached_key[...],
                                        k.astype(self.cached_key.dtype), start)
    values = jax.lax.dynamic_update_slice(
        self.cached_value[...], v.astype(self.cached_value.dtype), start)
    self.cached_key[...] = keys
    self.cached_value[...] = values
    self.cache_index[...] = index + 1
    if self.method is None:
      plan = dense_decode_plan(batch, max_len, index)
    else:
      plan = self.method.decode_plan(q, keys, values, index=index)
    return q, keys.astype(q.dtype), values.astype(q.dtype), plan
