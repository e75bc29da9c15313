"""SparseMethod: the one extension point of jsparse.

A method decides WHICH kv blocks each query block sees, or which keys each
query row sees (and may append pooled keys or add a per-key bias); it never
computes attention itself. The op call lives once, in `SparsePlan.attend`.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp

from pallas_kernels import BlockLayout
from pallas_kernels import RowLayout
from pallas_kernels import block_sparse_attention


@flax.struct.dataclass
class SparsePlan:
  """What one attention call attends to.

  Attributes:
    layout: the layout over the combined kv axis [k ; extra_k]: a
      `BlockLayout` (kv blocks per query block) or a `RowLayout` (key
      indices per query row or group, for per-row selections).
    extra_k: optional [B, S_extra, Hkv, D] keys appended after `k` (pooled
      levels, global tokens); with a `BlockLayout`, `k`'s length must be a
      multiple of layout.block_kv when extras are present.
    extra_v: optional [B, S_extra, Hkv, D] values matching `extra_k`.
    bias_k: optional [B|1, Hq|Hkv|1, S + S_extra] additive per-key logit bias
      (log P of pooled keys, learned key biases); it has a gradient.
    q_segment_ids: optional int [B, T].
    kv_segment_ids: optional int [B, S + S_extra].
    causal: apply the causal predicate inside partial blocks.
    logit_q: optional [B|1, T, Hq|1, R] query features of a pairwise logit
      term: `logit_q[i] . logit_k[j]` is added to the (scaled) logit of
      (i, j). It is realised exactly by appending the features to the head
      dim of q and k (and zeros to v), so the op's gradients reach it. Use it
      for learned (query, key) biases of small rank R (SwinBERT's mask).
    logit_k: optional [B|1, S + S_extra, Hkv|1, R] key features matching
      `logit_q`.
    aux: method-specific outputs for inspection (e.g. an estimated map).
  """

  layout: BlockLayout | RowLayout
  extra_k: jax.Array | None = None
  extra_v: jax.Array | None = None
  bias_k: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  logit_q: jax.Array | None = None
  logit_k: jax.Array | None = None
  aux: dict[str, Any] = flax.struct.field(default_factory=dict)

  def attend(self, q, k, v, *, sm_scale=None, return_lse=False,
             implementation=None, interpret=False):
    """Runs block_sparse_attention on this plan.

    Args:
      q: [B, T, Hq, D]; k, v: [B, S, Hkv, D].

    Returns:
      out [B, T, Hq, D] (and lse [B, Hq, T] with `return_lse`).
    """
    if self.extra_k is not None:
      if (isinstance(self.layout, BlockLayout)
          and k.shape[1] % self.layout.block_kv):
        raise ValueError(
            f"with extra keys, k's length ({k.shape[1]}) must be a multiple "
            f"of layout.block_kv ({self.layout.block_kv})")
      k = jnp.concatenate([k, self.extra_k.astype(k.dtype)], axis=1)
      v = jnp.concatenate([v, self.extra_v.astype(v.dtype)], axis=1)
    head_dim = q.shape[-1]
    if sm_scale is None:
      sm_scale = 1.0 / math.sqrt(head_dim)
    if self.logit_q is not None:
      q, k, v = _append_logit_features(q, k, v, self.logit_q, self.logit_k,
                                       sm_scale)
    result = block_sparse_attention(
        q, k, v, self.layout, bias_k=self.bias_k,
        q_segment_ids=self.q_segment_ids,
        kv_segment_ids=self.kv_segment_ids, causal=self.causal,
        sm_scale=sm_scale, return_lse=return_lse,
        implementation=implementation, interpret=interpret)
    if self.logit_q is None:
      return result
    if return_lse:
      return result[0][..., :head_dim], result[1]
    return result[..., :head_dim]


def _append_logit_features(q, k, v, logit_q, logit_k, sm_scale):
  """Concatenates pairwise logit features onto the head dim of q, k, v.

  The op multiplies q.k by `sm_scale`, so the query features are divided by
  it; v gets zero columns, which the caller slices off the output.
  """
  b, t, hq, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  rank = logit_q.shape[-1]
  fq = jnp.broadcast_to(logit_q / sm_scale, (b, t, hq, rank)).astype(q.dtype)
  fk = jnp.broadcast_to(logit_k, (b, s, hkv, rank)).astype(k.dtype)
  q = jnp.concatenate([q, fq], axis=-1)
  k = jnp.concatenate([k, fk], axis=-1)
  v = jnp.concatenate([v, jnp.zeros((b, s, hkv, rank), v.dtype)], axis=-1)
  return q, k, v


class SparseMethod(nnx.Module, abc.ABC):
  """Plans block-sparse attention; subclasses hold a frozen `config`.

  Parameter-free for static or training-free methods, trainable (nnx.Param)
  for learned estimators. `plan` must not let gradients reach the selection:
  wrap index computations in `jax.lax.stop_gradient`.
  """

  config: Any

  @abc.abstractmethod
  def plan(self, q: jax.Array, k: jax.Array, v: jax.Array,
           **kwargs) -> SparsePlan:
    """Decides what each query block attends to.

    Args:
      q: [B, T, Hq, D] queries (after projections, norms and RoPE).
      k: [B, S, Hkv, D] keys.
      v: [B, S, Hkv, D] values.
      **kwargs: method-specific call-time context (step, positions, ...).
    """

  def decode_plan(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
                  index: jax.Array) -> SparsePlan:
    """The plan of one decode step against a KV cache.

    Args:
      q: [B, 1, Hq, D] the new query, at position `index`.
      k: [B, S_max, Hkv, D] the key cache; entries past `index` are unset.
      v: [B, S_max, Hkv, D] the value cache.
      index: int32 scalar (may be traced), the query's position.

    Raises:
      NotImplementedError: methods without a decode rule.
    """
    raise NotImplementedError(
        f"{type(self).__name__} has no decode rule; decode densely or "
        "implement decode_plan")

  def __call__(self, q, k, v, *, sm_scale=None, implementation=None,
               interpret=False, **kwargs):
    """plan + attend: [B, T, Hq, D] outputs."""
    plan = self.plan(q, k, v, **kwargs)
    return plan.attend(q, k, v, sm_scale=sm_scale,
                       implementation=implementation, interpret=interpret)
