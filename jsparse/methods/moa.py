"""MoA: Mixture of Attention spans (per-head elastic sink + window).

Paper: "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", https://arxiv.org/abs/2406.14909 (CoLM 2025).

Every head h keeps the first s_h tokens (sinks) and a sliding window, with a
span growing with the length N: S_h(N) = alpha_h + beta_h * N. The rules are
searched offline: a gradient profile estimates how much the loss rises when
each attention entry is dropped, candidate (alpha, beta) rules are scored by
the influence of the blocks they drop, and a mixed-integer program (here
`scipy.optimize.milp` / HiGHS instead of Gurobi) picks one rule per head
under an average-density budget.

Conventions. Inference (the method): S_h = min(alpha + beta * N, N) rounded
up to a multiple of the block and at least `min_span`; the sink part
s_h = min(S_h, sink_tokens) lies inside the span and the window is
w_h = S_h - s_h. Prefill is block-aligned (query block i sees kv blocks
j <= i with j < s_h / b or j > i - w_h / b, causal inside the diagonal
block); decode is token-exact. Both layouts are built on the host (exact
Kmax), never under jit. The search scores a rule by the layout inference
runs (one block for profiling and inference), so a plan's density in the
search is its density at inference. Density counts the causal logits
evaluated over those of dense causal attention (the compute density
`eval/fidelity.py` measures). (The official search instead keeps
floor(alpha / b + beta * n_b) band blocks plus block column 0 and counts
causal tiles.)

Pipeline (`profile_model`, `pareto_plans`, `best_plan`): calibration
sequences end with the dense model's own continuation of a passage, and
only those response tokens count in the loss (`response_samples`); the
influence uses dL/dA = dO V^T, dO from a probe on each attention output, so
profiling holds one layer's N x N map at a time; the MILP trades the
losses at several lengths (the target included) along a weighted-sum
Pareto sweep, and the plan with the best loss at an unseen validation
length wins.

CLI: `python -m jsparse.methods.moa profile --out profile.npz` trains a tiny
causal LM on local text and profiles it; `python -m jsparse.methods.moa
search --profile profile.npz --out plan.json` solves the MILP.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jsparse import attention
from jsparse.masks import static
from jsparse.methods import base
from pallas_kernels import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class MoAConfig:
  """Elastic rules of the heads of one layer.

  Attributes:
    alphas: per-head alpha (tokens; may be negative).
    betas: per-head beta (fraction of N).
    block_size: layout block b (64 in the paper).
    sink_tokens: sink part of the span (a multiple of block_size).
    min_span: smallest span in tokens (128 in the paper).
  """

  alphas: tuple[float, ...] = (0.0,)
  betas: tuple[float, ...] = (0.5,)
  block_size: int = 64
  sink_tokens: int = 64
  min_span: int = 128

  def __post_init__(self):
    if len(self.alphas) != len(self.betas):
      raise ValueError("alphas and betas need one entry per head")
    if self.sink_tokens % self.block_size:
      raise ValueError("sink_tokens must be a multiple of block_size")


def head_spans(config: MoAConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-head (sink, window) token counts at total length n."""
  b = config.block_size
  alpha, beta = np.asarray(config.alphas), np.asarray(config.betas)
  span = np.minimum(alpha + beta * n, n)
  span = np.maximum(np.ceil(span / b) * b, config.min_span).astype(np.int64)
  sink = np.minimum(span, config.sink_tokens)
  return sink, span - sink


@functools.lru_cache(maxsize=64)
def host_layout(config: MoAConfig, n: int) -> layout_lib.BlockLayout:
  """[1, H, Qb, Kb] prefill layout at length n (causal diagonal blocks)."""
  b = config.block_size
  nb = layout_lib.cdiv(n, b)
  sink, window = head_spans(config, n)
  mask = static.sink_window_block_mask(nb, nb, sink // b, window // b)
  below = np.tril(np.ones((nb, nb), bool), -1)
  return layout_lib.BlockLayout.from_block_mask(
      mask[None], b, b, full_block_mask=below[None, None], band=(None, 0))


class MoAMethod(base.SparseMethod):
  """Static per-head elastic layouts of one layer; parameter-free."""

  def __init__(self, config: MoAConfig = MoAConfig()):
    self.config = config

  def plan(self, q, k, v, **kwargs) -> base.SparsePlan:
    """Causal prefill plan; dense causal when S <= one block.

    Args:
      q: [B, N, Hq, D]; k, v: [B, N, Hkv, D]. The layout has one row per
        rule; with GQA give one rule per kv head.
    """
    del v, kwargs
    n = k.shape[1]
    if q.shape[1] != n:
      raise ValueError(f"MoA prefill needs T == S, got {q.shape[1]} != {n}")
    if n <= self.config.block_size:
      return attention.dense_plan(n, n, causal=True)
    return base.SparsePlan(layout=host_layout(self.config, n))

  def decode_plan(self, q, k, v, *, index) -> base.SparsePlan:
    """Token-exact sinks + window for a query at position `index`.

    Spans are evaluated at the cache capacity S_max = N_in + N_new.
    """
    max_len = k.shape[1]
    sink, window = head_spans(self.config, max_len)
    j = jnp.arange(max_len)[None]
    visible = (j <= index) & ((j < sink[:, None]) |
                              (j > index - window[:, None]))
    bias = jnp.where(visible, 0.0, -jnp.inf)[None]
    layout = static.partial_dense_layout(1, max_len, 1,
                                         min(self.config.block_size, max_len))
    return base.SparsePlan(layout=layout, bias_k=bias)


# -- profiling -----------------------------------------------------------------
# A profiled model has `attention_layers` (its SparseAttention modules) and
# `probed_logits(tokens, probes) -> (logits, [(q, k, v)] per layer)`, dense
# attention with a zero probe added to each layer's per-head output, whose
# gradient is dO; then dL/dA = dO V^T (`Llama`, `TinyLM`).


def influence(probs: jax.Array, grads: jax.Array,
              eps: float = 1e-6) -> jax.Array:
  """First-order loss change of dropping each attention entry.

  dL_ij = -A_ij (G_ij - sum_k G_ik A_ik) / (1 - A_ij + eps): row i is
  renormalised after entry j is removed; row 0 (a single key) uses
  -G_0j A_0j.

  Args:
    probs: A [..., N, N] causal attention probabilities.
    grads: G = dL/dA, same shape.

  Returns:
    [..., N, N] influence (positive: harmful to drop).
  """
  row = jnp.sum(grads * probs, -1, keepdims=True)
  delta = -probs * (grads - row) / (1 - probs + eps)
  first = -grads * probs
  is_first = jnp.arange(probs.shape[-2])[:, None] == 0
  return jnp.where(is_first, first, delta)


def tile_sums(x: jax.Array, block: int) -> jax.Array:
  """[..., N, N] lower triangle summed into [..., N/b, N/b] tiles."""
  n = x.shape[-1]
  x = jnp.tril(x)
  nb = n // block
  return x.reshape(*x.shape[:-2], nb, block, nb, block).sum((-3, -1))


def layer_influence(q: jax.Array, k: jax.Array, v: jax.Array,
                    dout: jax.Array, block: int) -> jax.Array:
  """Tile influence of one layer, averaged over the batch.

  Entries are summed as magnitudes |dL_ij|, as the official profile does
  (`take_abs`): signed sums cancel inside a tile and make tiles whose
  entries matter look free to drop.

  Args:
    q: [B, N, Hq, D] rotated queries; k, v: [B, N, Hkv, D] (GQA: each kv
      head serves Hq / Hkv query heads).
    dout: [B, N, Hq, D] the loss gradient at the attention output.
    block: tile size b (N a multiple of it).

  Returns:
    f32 [Hq, N/b, N/b] summed |influence| of each causal tile.
  """
  group = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
  n = q.shape[1]
  s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
  probs = jax.nn.softmax(s, -1)
  grads = jnp.einsum("bthd,bshd->bhts", dout, v)
  return tile_sums(jnp.abs(influence(probs, grads)), block).mean(0)


def response_loss(logits, tokens, response_mask):
  """Mean next-token CE over positions where response_mask [B, N] is set."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                       tokens[:, 1:])
  weight = response_mask[:, 1:].astype(ce.dtype)
  return jnp.sum(ce * weight) / jnp.maximum(weight.sum(), 1)


def profile_model(model, samples, block: int) -> np.ndarray:
  """Mean tile influence [L, H, nb, nb] of the response loss over samples.

  Args:
    model: a profiled model (see above), run densely.
    samples: (tokens int [B, N], response_mask bool [B, N]) pairs of one
      length N (a multiple of `block`); the loss counts response tokens.
    block: tile size b.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def one(state, tokens, mask):
    m = nnx.merge(graphdef, state)
    probes = [jnp.zeros((*tokens.shape, a.num_heads, a.head_dim))
              for a in m.attention_layers]

    def loss(probes):
      logits, qkvs = m.probed_logits(tokens, probes)
      return response_loss(logits, tokens, mask), qkvs

    douts, qkvs = jax.grad(loss, has_aux=True)(probes)
    # One layer at a time: a layer's N x N maps are freed before the next.
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *qkvs)
    return jax.lax.map(
        lambda args: layer_influence(*args[0], args[1], block),
        (stacked, jnp.stack(douts)))

  total = sum(np.asarray(one(state, t, m), np.float64) for t, m in samples)
  return total / len(samples)


def response_samples(sequences, response_len: int, lengths):
  """Calibration samples: the last N tokens of each sequence, N in lengths.

  Each sequence ends with `response_len` tokens the model generated itself
  (MoA regenerates the calibration answers with the dense model); only
  they count in the loss.

  Args:
    sequences: int [N_max] arrays, a passage followed by the model's own
      continuation of it.
    response_len: tokens of the continuation.
    lengths: the profile lengths (each <= every sequence's length and
      > response_len).

  Returns:
    {N: [(tokens int32 [1, N], response mask bool [1, N])]}.
  """
  out = {}
  for n in lengths:
    if n <= response_len:
      raise ValueError(f"lengths must exceed response_len={response_len}, "
                       f"got {n}")
    mask = jnp.asarray(np.arange(n) >= n - response_len)[None]
    out[n] = [(jnp.asarray(np.asarray(s)[-n:], jnp.int32)[None], mask)
              for s in sequences]
  return out


class TinyLM(nnx.Module):
  """A small causal LM for profiling (byte vocabulary, RoPE, pre-LN)."""

  def __init__(self, *, vocab: int = 256, dim: int = 64, heads: int = 4,
               layers: int = 2, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs)
                           for _ in range(2 * layers)])
    self.attns = nnx.List([
        attention.SparseAttention(heads, dim, rope_theta=10000.0,
                                  use_bias=False, rngs=rngs)
        for _ in range(layers)])
    self.mlps = nnx.List([
        nnx.Sequential(nnx.Linear(dim, 4 * dim, rngs=rngs), jax.nn.gelu,
                       nnx.Linear(4 * dim, dim, rngs=rngs))
        for _ in range(layers)])
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  @property
  def attention_layers(self) -> list[attention.SparseAttention]:
    return list(self.attns)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, N] int -> [B, N, vocab] logits."""
    x = self.embed(tokens)
    for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
      x = x + attn(self.norms[2 * i](x), is_causal=True)
      x = x + mlp(self.norms[2 * i + 1](x))
    return self.head(x)

  def probed_logits(self, tokens, probes):
    """Dense logits with output probes; see `jsparse.models.llama`."""
    x = self.embed(tokens)
    qkvs = []
    for i, (attn, mlp, probe) in enumerate(zip(self.attns, self.mlps,
                                                probes, strict=True)):
      out, qkv = attn.probed(self.norms[2 * i](x), probe)
      x = x + out
      x = x + mlp(self.norms[2 * i + 1](x))
      qkvs.append(qkv)
    return self.head(x), qkvs


# -- candidate rules and the MILP ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Candidate elastic rules and the budget.

  A rule's layout at length N, in the search as at inference, is the
  `host_layout` of MoAConfig(block_size=block, sink_tokens, min_span): a
  sink plus a window of S = alpha + beta * N tokens rounded up to blocks.
  Profiling and inference share the block.

  Attributes:
    block: block b of profiling and inference.
    profile_lengths: lengths with an influence profile.
    extend_length: longest length a rule must fit (alpha + beta N <= N).
    alpha_step: alpha grid step (tokens).
    num_betas: betas are linspace(0, 1, num_betas).
    density: average density bound d_N at every constrained length.
    max_rules_per_layer: distinct rules allowed inside one layer.
    constrained_lengths: lengths where the bound holds; default the
      profile lengths and extend_length (the paper). At short lengths a
      block-aligned sink and diagonal alone can exceed a small budget.
    sink_tokens: the sink of a span (default one block).
    min_span: the smallest span (default two blocks).
  """

  block: int = 16
  profile_lengths: tuple[int, ...] = (128, 256)
  extend_length: int = 512
  alpha_step: int = 32
  num_betas: int = 9
  density: float = 0.5
  max_rules_per_layer: int = 2
  constrained_lengths: tuple[int, ...] | None = None
  sink_tokens: int | None = None
  min_span: int | None = None

  def candidates(self) -> np.ndarray:
    """[C, 2] (alpha, beta) pairs satisfying the official filters."""
    n_min, n_max = min(self.profile_lengths), max(self.profile_lengths)
    alphas = np.arange(-n_min, n_max + 1, self.alpha_step)
    betas = np.linspace(0, 1, self.num_betas)
    a, b = (x.ravel() for x in np.meshgrid(alphas, betas, indexing="ij"))
    ok = ((a + b * n_max <= n_max) & (a + b * self.extend_length
                                      <= self.extend_length)
          & (a + b * n_min > 0))
    return np.stack([a[ok], b[ok]], -1)

  def budget_lengths(self) -> list[int]:
    if self.constrained_lengths is not None:
      return sorted(self.constrained_lengths)
    return sorted(set(self.profile_lengths) | {self.extend_length})

  def config(self, alphas, betas) -> MoAConfig:
    """The inference MoAConfig of one layer's rules."""
    b = self.block
    return MoAConfig(
        alphas=tuple(float(a) for a in alphas),
        betas=tuple(float(x) for x in betas), block_size=b,
        sink_tokens=b if self.sink_tokens is None else self.sink_tokens,
        min_span=2 * b if self.min_span is None else self.min_span)


def rule_block_masks(candidates: np.ndarray, n: int,
                     space: SearchSpace) -> np.ndarray:
  """bool [C, nb, nb]: each rule's inference block layout at length n."""
  config = space.config(candidates[:, 0], candidates[:, 1])
  sink, window = head_spans(config, n)
  nb = n // space.block
  return static.sink_window_block_mask(nb, nb, sink // space.block,
                                       window // space.block)


def rule_cost(candidates: np.ndarray, tiles: np.ndarray | None, n: int,
              space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
  """Loss [heads, C] (influence of dropped tiles) and density [C] at n.

  Args:
    candidates: [C, 2] rules.
    tiles: [heads, nb, nb] tile influence at length n, or None (density
      only; the loss is None).
    n: the length.
    space: the search space (block, sink, min span).
  """
  b, nb = space.block, n // space.block
  causal = np.tril(np.ones((nb, nb), bool))
  keeps = rule_block_masks(candidates, n, space)
  # Logits evaluated over those of dense causal attention (the diagonal
  # tiles hold b (b + 1) / 2 causal entries).
  diagonal = np.eye(nb, dtype=bool)
  entries = ((keeps & ~diagonal).sum((1, 2)) * b * b
             + (keeps & diagonal).sum((1, 2)) * b * (b + 1) / 2)
  density = entries / (n * (n + 1) / 2)
  if tiles is None:
    return None, density
  dropped = (causal & ~keeps).astype(np.float64)
  return np.einsum("hij,cij->hc", tiles, dropped), density


def solve_plan(profiles: dict[int, np.ndarray], space: SearchSpace,
               time_limit: float = 60.0,
               weights: dict[int, float] | None = None) -> dict:
  """Picks one rule per head with `scipy.optimize.milp` (HiGHS).

  Args:
    profiles: length -> tile influence [L, H, nb, nb].
    space: the candidate space and constraints.
    time_limit: seconds for HiGHS.
    weights: length -> weight of its loss in the objective (default 1).

  Returns:
    {"alphas": [L][H], "betas": [L][H], "loss": the objective,
    "loss_per_length": {length: loss}, "density": {length: average
    density}, "block": b}.

  Raises:
    RuntimeError: if no plan meets the budget.
  """
  # SciPy is slow to import and only the plan search needs it.
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  from scipy import sparse  # pylint: disable=g-import-not-at-top

  cands = space.candidates()
  num_layers, num_heads = next(iter(profiles.values())).shape[:2]
  heads, num_c = num_layers * num_heads, len(cands)
  costs = {n: rule_cost(cands, t.reshape(heads, *t.shape[2:]), n, space)[0]
           for n, t in profiles.items()}
  weights = weights or {}
  loss = sum(weights.get(n, 1.0) * c for n, c in costs.items())
  lengths = space.budget_lengths()
  densities = {n: rule_cost(cands, None, n, space)[1]
               for n in sorted(set(lengths) | set(profiles))}
  # Variables: x[h, c] (heads * C), then y[l, c] (layers * C).
  nx, ny = heads * num_c, num_layers * num_c
  rows, lower, upper = [], [], []

  def add(row, lo, hi):
    rows.append(row)
    lower.append(lo)
    upper.append(hi)

  for h in range(heads):
    row = sparse.lil_matrix((1, nx + ny))
    row[0, h * num_c:(h + 1) * num_c] = 1
    add(row, 1, 1)
  for n in lengths:
    row = sparse.lil_matrix((1, nx + ny))
    row[0, :nx] = np.tile(densities[n], heads)
    add(row, -np.inf, space.density * heads)
  link = sparse.lil_matrix((nx, nx + ny))
  for h in range(heads):
    layer = h // num_heads
    for c in range(num_c):
      link[h * num_c + c, h * num_c + c] = 1
      link[h * num_c + c, nx + layer * num_c + c] = -1
  for layer in range(num_layers):
    row = sparse.lil_matrix((1, nx + ny))
    row[0, nx + layer * num_c:nx + (layer + 1) * num_c] = 1
    add(row, 0, space.max_rules_per_layer)
  constraints = [
      optimize.LinearConstraint(sparse.vstack(rows).tocsr(), lower, upper),
      optimize.LinearConstraint(link.tocsr(), -np.inf, 0)]
  objective = np.concatenate([loss.ravel(), np.zeros(ny)])
  result = optimize.milp(
      objective, constraints=constraints, integrality=np.ones(nx + ny),
      bounds=optimize.Bounds(0, 1), options={"time_limit": time_limit})
  if result.x is None:
    raise RuntimeError(f"MILP found no feasible plan: {result.message}")
  choice = result.x[:nx].reshape(heads, num_c).argmax(-1)
  chosen = cands[choice].reshape(num_layers, num_heads, 2)
  picked = lambda m: float(m[np.arange(heads), choice].sum())
  return {
      "alphas": chosen[..., 0].tolist(),
      "betas": chosen[..., 1].tolist(),
      "loss": picked(loss),
      "loss_per_length": {str(n): picked(c) for n, c in costs.items()},
      "density": {str(n): float(d[choice].mean())
                  for n, d in densities.items()},
      "block": space.block,
  }


def pareto_plans(profiles: dict[int, np.ndarray], space: SearchSpace,
                 time_limit: float = 60.0) -> list[dict]:
  """Plans on the Pareto front of the per-length losses (weighted sums).

  MoA's objectives are the losses at each profile length. Each length's
  loss is normalised by its mean over heads and rules; the sweep puts all
  weight on one length in turn, then equal weights. Duplicate plans are
  dropped; choose among the rest on an unseen length (`best_plan`).

  Returns:
    Distinct `solve_plan` results, each with its "weights".
  """
  cands = space.candidates()
  scale = {}
  for n, t in profiles.items():
    cost = rule_cost(cands, t.reshape(-1, *t.shape[2:]), n, space)[0]
    scale[n] = max(float(np.abs(cost).mean()), 1e-30)
  sweeps = [{m: float(m == n) / scale[m] for m in profiles}
            for n in sorted(profiles)]
  if len(profiles) > 1:
    sweeps.append({m: 1.0 / scale[m] for m in profiles})
  plans, seen = [], set()
  for weights in sweeps:
    plan = solve_plan(profiles, space, time_limit, weights)
    key = json.dumps([plan["alphas"], plan["betas"]])
    if key not in seen:
      seen.add(key)
      plans.append(dict(plan, weights={str(n): w for n, w in
                                       weights.items()}))
  return plans


def best_plan(plans: list[dict], validation_loss) -> tuple[dict, list]:
  """The plan of least `validation_loss(plan)` and every plan's value."""
  losses = [float(validation_loss(p)) for p in plans]
  return plans[int(np.argmin(losses))], losses


def uniform_plan_loss(profiles, space: SearchSpace) -> tuple[float, tuple]:
  """Best single rule for every head under the same density budget."""
  cands = space.candidates()
  ok = np.ones(len(cands), bool)
  for n in space.budget_lengths():
    ok &= rule_cost(cands, None, n, space)[1] <= space.density + 1e-12
  total = np.zeros(len(cands))
  for n, tiles in profiles.items():
    flat = tiles.reshape(-1, *tiles.shape[2:])
    total += rule_cost(cands, flat, n, space)[0].sum(0)
  total = np.where(ok, total, np.inf)
  best = int(np.argmin(total))
  return float(total[best]), tuple(cands[best])


def save_plan(plan: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(plan, f, indent=1)


def load_configs(path: str, **overrides) -> list[MoAConfig]:
  """One MoAConfig per layer from a plan JSON (see `solve_plan`)."""
  with open(path) as f:
    plan = json.load(f)
  block = overrides.pop("block_size", plan.get("block", 64))
  space = SearchSpace(block=block, sink_tokens=overrides.get("sink_tokens"),
                      min_span=overrides.get("min_span"))
  return [space.config(a, b) for a, b in zip(plan["alphas"], plan["betas"])]


# -- CLI ----------------------------------------------------------------------


def _default_text(limit: int = 2_000_000) -> bytes:
  """Real text available offline: the Python standard library's sources."""
  root = os.path.dirname(os.__file__)
  chunks, size = [], 0
  for name in sorted(os.listdir(root)):
    if name.endswith(".py"):
      with open(os.path.join(root, name), "rb") as f:
        chunks.append(f.read())
      size += len(chunks[-1])
      if size >= limit:
        break
  return b"".join(chunks)[:limit]


def _batches(data: np.ndarray, n: int, batch: int, count: int, seed: int):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    starts = rng.integers(0, len(data) - n, batch)
    tokens = np.stack([data[s:s + n] for s in starts]).astype(np.int32)
    # The second half of each window plays the response tokens.
    mask = np.broadcast_to(np.arange(n) >= n // 2, tokens.shape)
    out.append((jnp.asarray(tokens), jnp.asarray(mask)))
  return out


def _train(model, data, steps, n, batch, seed):
  opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tokens):
    def loss_fn(model):
      return response_loss(model(tokens), tokens, jnp.ones_like(tokens))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  loss = float("nan")
  for i in range(steps):
    starts = rng.integers(0, len(data) - n, batch)
    tokens = jnp.asarray(np.stack([data[s:s + n] for s in starts]),
                         jnp.int32)
    loss = float(step(model, opt, tokens))
    if i % 50 == 0 or i == steps - 1:
      print(f"train step {i}: loss {loss:.3f}", flush=True)
  return loss


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jsparse.methods.moa")
  sub = parser.add_subparsers(dest="command", required=True)
  prof = sub.add_parser("profile", help="train a tiny LM and profile it")
  prof.add_argument("--text", help="training text file (default: stdlib)")
  prof.add_argument("--out", default="moa_profile.npz")
  prof.add_argument("--steps", type=int, default=300)
  prof.add_argument("--train-length", type=int, default=256)
  prof.add_argument("--lengths", default="128,256")
  prof.add_argument("--block", type=int, default=16)
  prof.add_argument("--samples", type=int, default=4)
  prof.add_argument("--seed", type=int, default=0)
  search = sub.add_parser("search", help="solve the MILP for a plan")
  search.add_argument("--profile", default="moa_profile.npz")
  search.add_argument("--out", default="moa_plan.json")
  search.add_argument("--density", type=float, default=0.5)
  search.add_argument("--extend-length", type=int, default=512)
  search.add_argument("--alpha-step", type=int, default=32)
  args = parser.parse_args(argv)
  if args.command == "profile":
    if args.text:
      with open(args.text, "rb") as f:
        text = f.read()
    else:
      text = _default_text()
    data = np.frombuffer(text, np.uint8)
    split = int(0.9 * len(data))
    model = TinyLM(rngs=nnx.Rngs(args.seed))
    t0 = time.time()
    _train(model, data[:split], args.steps, args.train_length, 16, args.seed)
    profiles = {}
    for n in (int(x) for x in args.lengths.split(",")):
      batches = _batches(data[split:], n, 4, args.samples, args.seed + n)
      profiles[f"len_{n}"] = profile_model(model, batches, args.block)
    np.savez(args.out, block=args.block, **profiles)
    print(f"profiled {sorted(profiles)} in {time.time() - t0:.0f}s -> "
          f"{args.out}")
  else:
    loaded = np.load(args.profile)
    profiles = {int(k[4:]): loaded[k] for k in loaded.files
                if k.startswith("len_")}
    space = SearchSpace(block=int(loaded["block"]),
                        profile_lengths=tuple(sorted(profiles)),
                        extend_length=args.extend_length,
                        alpha_step=args.alpha_step, density=args.density)
    plan = solve_plan(profiles, space)
    uniform, rule = uniform_plan_loss(profiles, space)
    save_plan(plan, args.out)
    print(f"MoA plan loss {plan['loss']:.4g} (uniform rule {rule}: "
          f"{uniform:.4g}); densities {plan['density']} -> {args.out}")


if __name__ == "__main__":
  main(sys.argv[1:])
