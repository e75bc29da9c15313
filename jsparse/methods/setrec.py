"""SETRec: order-agnostic set identifiers with simultaneous generation.

Paper: "Order-agnostic Identifier for Large Language Model-based Generative
Recommendation", https://arxiv.org/abs/2502.10833 (SIGIR 2025).

Every item is a set of n_q tokens (one CF token, n_sem semantic tokens). The
sequence is [instruction (I)] [L items x n_q tokens] [response (R)]
[n_q query tokens]. Each token has a group id (its item for history tokens,
a unique id otherwise, one shared id for the queries) and token i sees key j
iff j == i, or j < i and g(j) != g(i): no attention inside an item,
item-level causality, and queries that see the context and only themselves.
Tokens of one item share a position id. The "not equal" rule has no op
predicate, so boundary blocks use the layout's tile pool; left-padded items
are masked as keys by segment ids. The layout is built once on the host
(exact Kmax), never under jit.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jsparse.masks import static
from jsparse.methods import base
from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class SETRecConfig:
  """SETRec sequence structure.

  Attributes:
    num_instruction: I, prompt tokens before the history.
    num_items: L, history items (left-padded to this count).
    tokens_per_item: n_q = 1 + n_sem.
    num_response: R, response tokens after the history.
    block_q: query block size of the layout.
    block_kv: kv block size of the layout.
  """

  num_instruction: int = 8
  num_items: int = 10
  tokens_per_item: int = 5
  num_response: int = 2
  block_q: int = 16
  block_kv: int = 16

  @property
  def history_start(self) -> int:
    return self.num_instruction

  @property
  def history_end(self) -> int:
    return self.num_instruction + self.num_items * self.tokens_per_item

  @property
  def seq_len(self) -> int:
    return self.history_end + self.num_response + self.tokens_per_item


def group_ids(config: SETRecConfig) -> np.ndarray:
  """int32 [T]: group of every token.

  History tokens: their item index; the n_q query tokens: one shared group
  (so they do not see each other); every other token: a unique id.
  """
  t = np.arange(config.seq_len)
  history = (t >= config.history_start) & (t < config.history_end)
  query = t >= config.seq_len - config.tokens_per_item
  item = (t - config.history_start) // config.tokens_per_item
  groups = np.where(history, item, config.num_items + t)
  return np.where(query, config.num_items + config.seq_len,
                  groups).astype(np.int32)


def position_ids(config: SETRecConfig) -> np.ndarray:
  """int32 [T]: arange, except tokens of one item share I + item index."""
  t = np.arange(config.seq_len)
  history = (t >= config.history_start) & (t < config.history_end)
  item = config.history_start + (t - config.history_start) // (
      config.tokens_per_item)
  return np.where(history, item, t).astype(np.int32)


def element_mask(config: SETRecConfig) -> np.ndarray:
  """bool [T, T] set-identifier mask (rows are queries), without padding."""
  g = group_ids(config)
  i = np.arange(config.seq_len)
  return (i[None, :] == i[:, None]) | (
      (i[None, :] < i[:, None]) & (g[None, :] != g[:, None]))


def key_valid(config: SETRecConfig, item_valid: jax.Array) -> jax.Array:
  """int32 [B, T]: 0 for the tokens of padded history items, 1 elsewhere.

  Args:
    config: the sequence structure.
    item_valid: bool [B, L], False for padded items.
  """
  batch = item_valid.shape[0]
  per_token = jnp.repeat(item_valid, config.tokens_per_item, axis=1)
  ones = lambda n: jnp.ones((batch, n), bool)
  valid = jnp.concatenate([
      ones(config.num_instruction), per_token,
      ones(config.seq_len - config.history_end)], axis=1)
  return valid.astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def host_layout(config: SETRecConfig, padded: bool
                ) -> layout_lib.BlockLayout:
  """Tile-pool layout of the set mask; all blocks partial when `padded`."""
  layout = layout_lib.BlockLayout.from_element_mask(
      element_mask(config)[None, None], config.block_q, config.block_kv)
  return static.demote_full(layout) if padded else layout


class SETRecMethod(base.SparseMethod):
  """Static set-identifier layout (+ key padding); parameter-free."""

  def __init__(self, config: SETRecConfig = SETRecConfig()):
    self.config = config

  def plan(self, q, k, v, *, item_valid: jax.Array | None = None,
           **kwargs) -> base.SparsePlan:
    """Plan over the T = I + L*n_q + R + n_q tokens.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D].
      item_valid: optional bool [B, L]; padded items are masked as keys.

    Returns:
      A SparsePlan with the shared host layout.
    """
    del v, kwargs
    if q.shape[1] != self.config.seq_len or k.shape[1] != q.shape[1]:
      raise ValueError(
          f"SETRec expects T = S = {self.config.seq_len}, got "
          f"T={q.shape[1]}, S={k.shape[1]}")
    if item_valid is None:
      return base.SparsePlan(layout=host_layout(self.config, False))
    kv_seg = key_valid(self.config, item_valid)
    return base.SparsePlan(
        layout=host_layout(self.config, True),
        q_segment_ids=jnp.ones_like(kv_seg), kv_segment_ids=kv_seg)


class SETRecHead(nnx.Module):
  """Query-guided simultaneous generation: n_q queries decoded in one pass.

  The learnable query tokens are appended to the sequence; the hidden state
  of query q is scored against the q-th token table of every item (q = 0:
  CF tokens, q >= 1: semantic tokens).
  """

  def __init__(self, config: SETRecConfig, dim: int, *, rngs: nnx.Rngs):
    """Builds n_q query embeddings [n_q, dim] ~ N(0, 0.02)."""
    self.config = config
    self.queries = nnx.Param(
        0.02 * jax.random.normal(rngs.params(),
                                 (config.tokens_per_item, dim)))

  def append_queries(self, context: jax.Array) -> jax.Array:
    """[B, T - n_q, dim] context embeddings -> [B, T, dim]."""
    queries = jnp.broadcast_to(self.queries[...],
                               (context.shape[0], *self.queries.shape))
    return jnp.concatenate([context, queries.astype(context.dtype)], axis=1)

  def logits(self, hidden: jax.Array, item_tokens: jax.Array) -> jax.Array:
    """Per-query scores of every item.

    Args:
      hidden: [B, T, dim] last-layer states (the last n_q are the queries).
      item_tokens: [n_q, M, dim] token q of each of the M items.

    Returns:
      f32 [B, n_q, M].
    """
    h = hidden[:, -self.config.tokens_per_item:]
    return jnp.einsum("bqd,qmd->bqm", h, item_tokens,
                      preferred_element_type=jnp.float32)

  @staticmethod
  def loss(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over queries and batch of CE([B, n_q, M], target int [B])."""
    labels = jnp.broadcast_to(target[:, None], logits.shape[:2])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  @staticmethod
  def score(logits: jax.Array, beta: float) -> jax.Array:
    """Inference ranking [B, M]: (1 - beta) CF + beta * sum of semantic."""
    return (1 - beta) * logits[:, 0] + beta * logits[:, 1:].sum(1)
