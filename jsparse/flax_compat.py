"""Drop-ins for `jax.nn.dot_product_attention` and nnx's `attention_fn`.

    # jax.nn users: same arguments, run on the block-sparse op.
    out = jsparse.dot_product_attention(q, k, v, mask=mask, is_causal=True)

    # Flax users: any nnx.MultiHeadAttention, one argument changed.
    nnx.MultiHeadAttention(..., attention_fn=jsparse.attention_fn(method))

Masks, causality, windows and sequence lengths become band layouts and
segment ids (see `jsparse.masking`). A query that sees no key returns
zeros, where jax.nn returns the mean of all values.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
from flax.nnx.nn import dtypes
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import masking
from jsparse.methods import base


def dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` on the block-sparse op.

  Same arguments and semantics, except for queries that see no key (their
  output is 0 here, the mean of all values in jax.nn), `implementation`,
  which names a backend of `block_sparse_attention`, and no
  `return_residual`.

  Args:
    query: [B, T, N, H] or [T, N, H].
    key: [B, S, K, H] or [S, K, H], N a multiple of K (GQA).
    value: like `key`, in key's dtype.
    bias: optional additive logit bias broadcastable to [B, N, T, S] whose
      T dim is 1 (one value per key); it has a gradient.
    mask: optional bool array broadcastable to [B, N, T, S]; False masks.
    scale: logit scale; default 1 / sqrt(H).
    is_causal: query i sees keys j <= i.
    query_seq_lengths: optional int32 [B]: later queries output 0.
    key_value_seq_lengths: optional int32 [B]: later keys are masked.
    local_window_size: (left, right), or one int for both: query i sees
      i - left <= j <= i + right.
    implementation: "xla", "triton", "mosaic_tpu", "reference" or None
      (the best available).

  Returns:
    An array of query's shape and dtype.

  Raises:
    ValueError: on bad shapes or dtypes (as jax.nn), or a bias that varies
      along T.
  """
  q, k, v = (jnp.asarray(x) for x in (query, key, value))
  shape = q.shape
  if q.ndim == 3:
    q, k, v = q[None], k[None], v[None]
  _check_jax_nn_inputs(q, k, v, query_seq_lengths, key_value_seq_lengths)
  window = _window(local_window_size)
  b, t, n, _ = q.shape
  s = k.shape[1]
  vis = masking.visibility(
      None if mask is None else masking.host_if_known(mask), batch=b, heads=n,
      q_len=t, kv_len=s, is_causal=is_causal, window=window,
      q_lengths=query_seq_lengths, kv_lengths=key_value_seq_lengths)
  bias_k = masking.key_bias(None if bias is None else jnp.asarray(bias),
                            batch=b, heads=n, q_len=t, kv_len=s)
  plan = masking.dense_plan(vis, block_q=masking.block_size(t),
                            block_kv=masking.block_size(s), bias_k=bias_k)
  out = plan.attend(q, k, v, sm_scale=scale, implementation=implementation)
  return out.reshape(shape)


def _window(size) -> tuple[int, int] | None:
  """(left, right) of jax.nn's `local_window_size`."""
  if size is None:
    return None
  pair = (size, size) if isinstance(size, int) else tuple(size)
  if len(pair) != 2 or not all(isinstance(x, int) for x in pair):
    raise ValueError(
        "local_window_size must be an int or a pair of ints (left, right), "
        f"got {size!r}")
  return pair


def _check_jax_nn_inputs(q, k, v, q_lengths, kv_lengths) -> None:
  """jax.nn's checks, with the expected shape in the message."""
  if k.ndim != 4 or q.ndim != 4:
    raise ValueError(
        "query, key and value must all be [B, T|S, N|K, H] or all [T|S, "
        f"N|K, H], got shapes {q.shape}, {k.shape}, {v.shape}")
  b, s, kh, h = k.shape
  if v.shape != k.shape or v.dtype != k.dtype:
    raise ValueError(
        f"value must be {k.dtype} {k.shape} like key, got {v.dtype} "
        f"{v.shape}")
  if q.shape[0] != b or q.shape[3] != h or q.dtype != k.dtype:
    raise ValueError(
        f"query must be {k.dtype} [B={b}, T, N, H={h}], got {q.dtype} "
        f"{q.shape}")
  if q.shape[2] % kh:
    raise ValueError(
        f"query heads (N={q.shape[2]}) must be a multiple of key/value "
        f"heads (K={kh})")
  for name, lengths in (("query_seq_lengths", q_lengths),
                        ("key_value_seq_lengths", kv_lengths)):
    if lengths is not None and (jnp.shape(lengths) != (b,)
                                or jnp.asarray(lengths).dtype != jnp.int32):
      raise ValueError(
          f"{name} must be int32 [B={b}], got {jnp.asarray(lengths).dtype} "
          f"{jnp.shape(lengths)}")


def attention_fn(method: base.SparseMethod | None = None, *,
                 implementation: str | None = None,
                 block_q: int | None = None,
                 block_kv: int | None = None) -> NnxAttention:
  """An `attention_fn` for `nnx.MultiHeadAttention` on the block-sparse op.

      layer = nnx.MultiHeadAttention(..., attention_fn=jsparse.attention_fn())

  Args:
    method: a parameter-free SparseMethod planning each call, or None for
      dense attention. Trainable methods hold nnx state that the closure
      would hide from nnx transforms: use `SparseAttention(method=...)`. In
      nnx's decode, `method.plan` sees one query and the whole cache;
      `SparseAttention` decodes through `method.decode_plan` instead.
    implementation: the op's backend (None: the best available).
    block_q: layout query block of dense plans; default from T.
    block_kv: layout kv block of dense plans; default from S.

  Returns:
    A callable with the signature of `flax.nnx.dot_product_attention`.

  Raises:
    ValueError: for a method with nnx variables.
  """
  if method is not None and jax.tree.leaves(nnx.state(method)):
    raise ValueError(
        f"{type(method).__name__} holds nnx variables, which an attention_fn "
        "would hide from nnx transforms; use SparseAttention(method=...)")
  return NnxAttention(method, implementation, block_q, block_kv)


@dataclasses.dataclass(frozen=True, eq=False)
class NnxAttention:
  """`flax.nnx.dot_product_attention` on the block-sparse op.

  Build it with `attention_fn`. Masks may have any dtype (nonzero attends,
  as nnx); padding masks become segment ids, other masks a tiled layout
  (exact on concrete masks, up to every kv block per row under jit). With a
  method, only padding masks and `is_causal` apply, on top of its plan.

  Attributes:
    method: the SparseMethod, or None for dense attention.
    implementation: the op's backend.
    block_q: layout query block of dense plans, or None (from T).
    block_kv: layout kv block of dense plans, or None (from S).
  """

  method: base.SparseMethod | None
  implementation: str | None
  block_q: int | None
  block_kv: int | None

  def __call__(self, query, key, value, bias=None, mask=None,
               broadcast_dropout: bool = True, dropout_rng=None,
               dropout_rate: float = 0.0, deterministic: bool = False,
               dtype=None, precision=None, module=None,
               promote_dtype=dtypes.promote_dtype, is_causal: bool = False):
    """Attention of [batch..., T, N, H] queries over [batch..., S, K, H].

    Arguments as `flax.nnx.dot_product_attention`; `broadcast_dropout`,
    `dropout_rng` and `precision` have no effect (the op accumulates in
    f32).

    Returns:
      [batch..., T, N, H].

    Raises:
      ValueError: on bad shapes or a bias that varies along T.
      NotImplementedError: for dropout when not deterministic, or `module`
        (nnx's `sow_weights`): attention weights are never materialised.
    """
    del broadcast_dropout, dropout_rng, precision
    if module is not None:
      raise NotImplementedError(
          "sow_weights: the block-sparse op never materialises attention "
          "weights")
    if not deterministic and dropout_rate > 0.0:
      raise NotImplementedError(
          "attention dropout is not implemented by the block-sparse op; "
          "use deterministic=True or dropout_rate=0")
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
      raise ValueError(
          f"query, key and value batch dims must match, got shapes "
          f"{query.shape}, {key.shape}, {value.shape}")
    q, k, v = (_flat_batch(x, lead, name) for x, name in
               ((query, "query"), (key, "key"), (value, "value")))
    b, t, n, _ = q.shape
    s = k.shape[1]
    if mask is not None:
      mask = _flat_batch(masking.host_if_known(mask), lead,
                         "mask").astype(bool)
    if bias is not None:
      bias = _flat_batch(jnp.asarray(bias), lead, "bias")
    vis = masking.visibility(mask, batch=b, heads=n, q_len=t, kv_len=s,
                             is_causal=is_causal)
    bias_k = masking.key_bias(bias, batch=b, heads=n, q_len=t, kv_len=s)
    if self.method is None:
      plan = masking.dense_plan(
          vis, block_q=self.block_q or masking.block_size(t),
          block_kv=self.block_kv or masking.block_size(s), bias_k=bias_k)
    else:
      plan = masking.restrict(self.method.plan(q, k, v), vis, bias_k)
    out = plan.attend(q, k, v, implementation=self.implementation)
    return out.reshape(*lead, *out.shape[1:])


def _flat_batch(x, lead: tuple[int, ...], name: str):
  """x [batch..., d1, d2, d3] with the batch dims `lead` merged into one.

  Missing leading dims broadcast, as in nnx; batch dims all of size 1 stay
  a batch of 1.
  """
  if x.ndim > len(lead) + 3:
    raise ValueError(
        f"{name} must have at most the query's batch dims {lead} + 3 dims, "
        f"got shape {tuple(x.shape)}")
  x = x.reshape((1,) * (len(lead) + 3 - x.ndim) + tuple(x.shape))
  batch, rest = x.shape[:len(lead)], x.shape[len(lead):]
  if all(d == 1 for d in batch):
    return x.reshape((1,) + rest)
  xp = np if isinstance(x, np.ndarray) else jnp
  x = xp.broadcast_to(x, lead + rest)
  return x.reshape((math.prod(lead),) + rest)
