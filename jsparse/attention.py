"""SparseAttention: multi-head attention whose core is one block-sparse op.

The module mirrors `flax.nnx.MultiHeadAttention`: the same constructor and
call keywords with their meaning, parameter names and shapes, GQA through
`num_kv_heads`, and `init_cache` + `decode=True` for autoregressive
decoding. It delegates the choice of visible blocks to a `SparseMethod`;
with `method=None` it is dense attention through the same op.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from types import MappingProxyType
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes
import jax
import jax.numpy as jnp

from jsparse import masking
from jsparse.methods import base

_NO_METADATA = MappingProxyType({})


def dense_plan(q_len: int, kv_len: int, *, causal: bool = False,
               block: int = 128) -> base.SparsePlan:
  """The plan of plain (optionally causal) dense attention."""
  vis = masking.visibility(batch=1, heads=1, q_len=q_len, kv_len=kv_len,
                           is_causal=causal)
  return masking.dense_plan(vis, block_q=masking.block_size(q_len, block),
                            block_kv=masking.block_size(kv_len, block))


class SparseAttention(nnx.Module):
  """Multi-head attention with a pluggable sparse method.

  Attention-weight dropout is not implemented by the op: a module with
  `dropout_rate > 0` runs only when deterministic (as nnx's own evaluation
  mode), and raises otherwise.

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
               dtype=None, param_dtype=jnp.float32,
               broadcast_dropout: bool = True,
               dropout_rate: float = 0.0,
               deterministic: bool | None = None,
               precision=None,
               kernel_init=nnx.initializers.lecun_normal(),
               out_kernel_init=None,
               bias_init=nnx.initializers.zeros_init(),
               out_bias_init=None,
               use_bias: bool = True,
               decode: bool | None = None,
               normalize_qk: bool = False,
               qkv_promote_dtype=dtypes.promote_dtype,
               out_promote_dtype=dtypes.promote_dtype,
               ln_promote_dtype=dtypes.promote_dtype,
               rngs: nnx.Rngs,
               keep_rngs: bool = True,
               kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               out_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
               bias_metadata: Mapping[str, Any] = _NO_METADATA,
               out_bias_metadata: Mapping[str, Any] = _NO_METADATA,
               query_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
               key_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA):
    """Builds the projections; keywords as `nnx.MultiHeadAttention`.

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
      dtype: computation dtype; param_dtype: parameter dtype.
      broadcast_dropout: as nnx; only meaningful with dropout (see above).
      dropout_rate: attention dropout rate in [0, 1); > 0 needs a
        deterministic call (see above).
      deterministic: default for the call's `deterministic`.
      precision: precision of the projections (the op accumulates in f32).
      kernel_init: projection kernel initialiser.
      out_kernel_init: output kernel initialiser; default `kernel_init`.
      bias_init: projection bias initialiser.
      out_bias_init: output bias initialiser; default `bias_init`.
      use_bias: biases in the q/k/v/out projections.
      decode: default for the call's `decode` flag.
      normalize_qk: LayerNorm on q and k per head (as nnx).
      qkv_promote_dtype: dtype promotion of the q/k/v projections.
      out_promote_dtype: dtype promotion of the output projection.
      ln_promote_dtype: dtype promotion of the q/k LayerNorms.
      rngs: parameter RNGs.
      keep_rngs: accepted for nnx compatibility; no RNG stream is stored,
        since attention dropout never runs.
      kernel_metadata: metadata (e.g. sharding) of the q/k/v kernels.
      out_kernel_metadata: of the output kernel; default `kernel_metadata`.
      bias_metadata: metadata of the q/k/v biases.
      out_bias_metadata: of the output bias; default `bias_metadata`.
      query_ln_scale_metadata: metadata of the query LayerNorm scale.
      key_ln_scale_metadata: metadata of the key LayerNorm scale.

    Raises:
      ValueError: on head counts that do not divide, or a dropout rate
        outside [0, 1).
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
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    del keep_rngs
    self.head_dim = self.qkv_features // num_heads
    self.method = method
    self.implementation = implementation
    self.interpret = interpret
    self.sm_scale = sm_scale
    self.decode = decode
    self.dropout_rate = dropout_rate
    self.broadcast_dropout = broadcast_dropout
    self.deterministic = deterministic
    self.rope = None if rope_theta is None else nnx.RoPE(theta=rope_theta)
    linear = functools.partial(
        nnx.LinearGeneral, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype, precision=precision, rngs=rngs)
    qkv = functools.partial(
        linear, kernel_init=kernel_init, bias_init=bias_init,
        promote_dtype=qkv_promote_dtype, kernel_metadata=kernel_metadata,
        bias_metadata=bias_metadata)
    self.query = qkv(in_features, (num_heads, self.head_dim))
    self.key = qkv(self.in_kv_features, (self.num_kv_heads, self.head_dim))
    self.value = qkv(self.in_kv_features,
                     (self.num_kv_heads, self.head_dim))
    if normalize_qk:
      norm = functools.partial(
          nnx.LayerNorm, self.head_dim, use_bias=False, dtype=dtype,
          param_dtype=param_dtype, promote_dtype=ln_promote_dtype,
          rngs=rngs)
      self.query_ln = norm(scale_metadata=query_ln_scale_metadata)
      self.key_ln = norm(scale_metadata=key_ln_scale_metadata)
    else:
      self.query_ln = self.key_ln = nnx.data(None)
    self.out = linear(
        (num_heads, self.head_dim), self.out_features, axis=(-2, -1),
        kernel_init=out_kernel_init or kernel_init,
        bias_init=out_bias_init or bias_init,
        promote_dtype=out_promote_dtype,
        kernel_metadata=out_kernel_metadata or kernel_metadata,
        bias_metadata=out_bias_metadata or bias_metadata)
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)

  def init_cache(self, input_shape, dtype=jnp.float32) -> None:
    """Allocates the decode cache for inputs of shape [B, S_max, F]."""
    shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

  def prefill_cache(self, k: jax.Array, v: jax.Array) -> None:
    """Writes a prompt's keys and values into the first T cache slots.

    Args:
      k: [B, T, Hkv, D] keys, already rotated at positions 0..T-1 (as
        `probed` returns them); v: [B, T, Hkv, D] values.
    """
    if self.cache_index is None:
      raise ValueError(
          "autoregressive cache not initialised: call init_cache first")
    t = k.shape[1]
    self.cached_key[...] = self.cached_key[...].at[:, :t].set(k)
    self.cached_value[...] = self.cached_value[...].at[:, :t].set(v)
    self.cache_index[...] = jnp.asarray(t, jnp.int32)

  def _rotate(self, x, positions):
    """RoPE of x [B, T, H, D] at positions [T] or [B, T]."""
    if self.rope is None:
      return x
    b, t = x.shape[:2]
    if positions.shape not in ((t,), (b, t)):
      raise ValueError(
          f"input_positions must be [T] = [{t}] or [B, T] = [{b}, {t}], "
          f"got shape {tuple(positions.shape)}")
    apply = jax.vmap(self.rope, in_axes=(-2, None), out_axes=-2)
    if positions.ndim == 2:
      apply = jax.vmap(apply)
    return apply(x, positions.astype(jnp.float32))

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *,
               mask: jax.Array | None = None,
               deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | None = None,
               sow_weights: bool = False,
               decode: bool | None = None,
               is_causal: bool = False,
               out_sharding=None, qkv_sharding=None,
               input_positions: jax.Array | None = None,
               method_context: Mapping[str, Any] | None = None,
               return_plan: bool = False):
    """Attention of `inputs_q` over `inputs_k`/`inputs_v` (default: self).

    Args:
      inputs_q: [B, T, F].
      inputs_k: [B, S, F_kv]; default `inputs_q`.
      inputs_v: [B, S, F_kv]; default `inputs_k`.
      mask: optional mask broadcastable to [B, Hq, T, S] (S_max in decode);
        attention is masked where it is False (any dtype, as nnx). Padding
        masks become segment ids; with a method, only padding masks apply.
      deterministic: overrides the constructor's; must be True (or given
        there) when `dropout_rate > 0`.
      rngs: accepted for nnx compatibility (dropout never runs).
      sow_weights: must be False: attention weights are never materialised.
      decode: one-token decoding against the cache (`init_cache` first);
        default the constructor's, else False.
      is_causal: query i sees keys j <= i; with a method, the causal
        predicate restricts the method's blocks. Ignored in decode, where
        the cache index already limits the keys (as nnx).
      out_sharding: sharding of the output projection's result.
      qkv_sharding: sharding of the q/k/v projections' results.
      input_positions: RoPE positions [T] or [B, T] (also of the keys when
        S == T); default arange, or the cache index in decode.
      method_context: keyword arguments of `method.plan` (step, layer...).
      return_plan: also return the SparsePlan used.

    Returns:
      [B, T, out_features] (and the plan with `return_plan`).

    Raises:
      ValueError: on bad shapes, an uninitialised or full decode cache, or a
        batch that does not match the cache.
      NotImplementedError: for `sow_weights` or non-deterministic dropout.
    """
    del rngs
    self._check_call(inputs_q, inputs_k, inputs_v, deterministic,
                     sow_weights)
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    q = self.query(inputs_q, out_sharding=qkv_sharding)
    k = self.key(inputs_k, out_sharding=qkv_sharding)
    v = self.value(inputs_v, out_sharding=qkv_sharding)
    if self.query_ln is not None:
      q, k = self.query_ln(q), self.key_ln(k)
    decode = self.decode if decode is None else decode
    if decode:
      q, k, v, plan = self._decode_step(q, k, v, mask, input_positions)
    else:
      q, k = self._rotate_prefill(q, k, input_positions)
      plan = self._plan(q, k, v, mask, is_causal, method_context)
    x = plan.attend(q, k, v, sm_scale=self.sm_scale,
                    implementation=self.implementation,
                    interpret=self.interpret)
    out = self.out(x, out_sharding=out_sharding)
    return (out, plan) if return_plan else out

  def probed(self, x: jax.Array, probe: jax.Array | None = None):
    """Dense causal self-attention with an additive probe on its output.

    The probe is added to the per-head output before the output projection,
    so d loss / d probe is dO, the gradient at the attention output, and
    d loss / d A = dO V^T for the attention map A (MoA's profile). No
    method runs here.

    Args:
      x: [B, T, F] inputs.
      probe: [B, T, Hq, D], or None for the plain dense layer.

    Returns:
      ([B, T, out_features], (q [B, T, Hq, D], k [B, T, Hkv, D], v)): the
      output, with the rotated queries and keys and the values.
    """
    q, k, v = self.query(x), self.key(x), self.value(x)
    if self.query_ln is not None:
      q, k = self.query_ln(q), self.key_ln(k)
    q, k = self._rotate_prefill(q, k, None)
    # Rematerialised: a backward pass keeps q, k, v per layer, not T x S.
    attend = jax.checkpoint(functools.partial(
        jax.nn.dot_product_attention, is_causal=True, scale=self.sm_scale))
    o = attend(q, k, v)
    return self.out(o if probe is None else o + probe), (q, k, v)

  def _check_call(self, inputs_q, inputs_k, inputs_v, deterministic,
                  sow_weights):
    if inputs_q.ndim != 3 or inputs_q.shape[-1] != self.in_features:
      raise ValueError(
          f"inputs_q must be [B, T, F={self.in_features}], got shape "
          f"{tuple(inputs_q.shape)}")
    if inputs_k is None and inputs_v is not None:
      raise ValueError("inputs_k cannot be None when inputs_v is given")
    if sow_weights:
      raise NotImplementedError(
          "sow_weights: SparseAttention never materialises the attention "
          "weights")
    if self.dropout_rate > 0.0:
      deterministic = (self.deterministic if deterministic is None
                       else deterministic)
      if deterministic is None:
        raise ValueError(
            "dropout_rate > 0 needs `deterministic`, in the constructor or "
            "the call")
      if not deterministic:
        raise NotImplementedError(
            "attention dropout is not implemented by the block-sparse op; "
            "call with deterministic=True or use dropout_rate=0")

  def _rotate_prefill(self, q, k, input_positions):
    if self.rope is None:
      return q, k
    t, s = q.shape[1], k.shape[1]
    q_pos = jnp.arange(t) if input_positions is None else input_positions
    k_pos = q_pos if s == t else jnp.arange(s)
    return self._rotate(q, q_pos), self._rotate(k, k_pos)

  def _visibility(self, q, k, mask, is_causal, kv_lengths=None):
    if mask is not None:
      mask = masking.host_if_known(mask).astype(bool)
    return masking.visibility(
        mask, batch=q.shape[0], heads=q.shape[2], q_len=q.shape[1],
        kv_len=k.shape[1], is_causal=is_causal, kv_lengths=kv_lengths)

  def _plan(self, q, k, v, mask, is_causal, method_context):
    vis = self._visibility(q, k, mask, is_causal)
    if self.method is None:
      return masking.dense_plan(vis, block_q=masking.block_size(q.shape[1]),
                                block_kv=masking.block_size(k.shape[1]))
    plan = self.method.plan(q, k, v, **(method_context or {}))
    return masking.restrict(plan, vis)

  def _decode_step(self, q, k, v, mask, input_positions):
    if self.cache_index is None:
      raise ValueError(
          "autoregressive cache not initialised: call init_cache first")
    batch, max_len = self.cached_key.shape[:2]
    if q.shape[0] != batch:
      raise ValueError(
          f"decode batch {q.shape[0]} does not match the cache's batch "
          f"{batch}: init_cache with the batch you decode")
    if q.shape[1] != 1:
      raise ValueError(f"decode takes one token, got T={q.shape[1]}")
    index = self.cache_index[...]
    _check_room(index, max_len)
    position = index[None] if input_positions is None else input_positions
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
      occupied = jnp.full((batch,), index + 1)
      vis = self._visibility(q, keys, mask, False, kv_lengths=occupied)
      plan = masking.dense_plan(vis, block_q=masking.block_size(1),
                                block_kv=masking.block_size(max_len))
    else:
      vis = self._visibility(q, keys, mask, False)
      plan = masking.restrict(
          self.method.decode_plan(q, keys, values, index=index), vis)
    return q, keys.astype(q.dtype), values.astype(q.dtype), plan


def _check_room(index: jax.Array, max_len: int) -> None:
  """Raises when the cache is full, before the step writes anything.

  Under jit the index is traced: a host callback raises at run time, which
  fails the whole step, so no state update is committed.
  """
  if isinstance(index, jax.core.Tracer):
    jax.debug.callback(functools.partial(_raise_if_full, max_len=max_len),
                       index)
  else:
    _raise_if_full(index, max_len=max_len)


def _raise_if_full(index, *, max_len: int) -> None:
  if int(index) >= max_len:
    raise ValueError(
        f"decode past the cache: position {int(index)} but the cache holds "
        f"{max_len} tokens; init_cache with a longer input_shape")
