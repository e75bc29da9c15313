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
Kmax), never under jit. Profiling/search (as the official pipeline):
a rule keeps a causal band of floor(alpha / b + beta * n_b) blocks plus
block column 0, and density counts causal (lower-triangular) tiles.

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


def tile_sums(x: np.ndarray, block: int) -> np.ndarray:
  """[..., N, N] lower triangle summed into [..., N/b, N/b] tiles."""
  n = x.shape[-1]
  x = np.tril(np.asarray(x, np.float64))
  nb = n // block
  return x.reshape(*x.shape[:-2], nb, block, nb, block).sum((-3, -1))


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

  def __call__(self, tokens: jax.Array, deltas=None) -> jax.Array:
    """[B, N] int -> [B, N, vocab] logits.

    With `deltas` (one [B, H, N, N] array per layer, zeros), attention is
    computed densely as (A + delta) V so that d loss / d delta = dL/dA.
    """
    x = self.embed(tokens)
    for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
      h = self.norms[2 * i](x)
      if deltas is None:
        x = x + attn(h, is_causal=True)
      else:
        x = x + _probed_attention(attn, h, deltas[i])
      x = x + mlp(self.norms[2 * i + 1](x))
    return self.head(x)


def _probed_attention(attn: attention.SparseAttention, x, delta):
  n = x.shape[1]
  pos = jnp.arange(n)
  q = attn._rotate(attn.query(x), pos)  # pylint: disable=protected-access
  k = attn._rotate(attn.key(x), pos)  # pylint: disable=protected-access
  v = attn.value(x)
  s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
  probs = jax.nn.softmax(s, -1) + delta
  return attn.out(jnp.einsum("bhts,bshd->bthd", probs, v))


def response_loss(logits, tokens, response_mask):
  """Mean next-token CE over positions where response_mask [B, N] is set."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                       tokens[:, 1:])
  weight = response_mask[:, 1:].astype(ce.dtype)
  return jnp.sum(ce * weight) / jnp.maximum(weight.sum(), 1)


def profile_model(model: TinyLM, batches, block: int) -> np.ndarray:
  """Mean tile influence [L, H, nb, nb] over batches of (tokens, mask)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def one(state, tokens, mask):
    b, n = tokens.shape
    heads = model.attns[0].num_heads
    deltas = [jnp.zeros((b, heads, n, n)) for _ in model.attns]

    def loss_and_probs(deltas):
      m = nnx.merge(graphdef, state)
      return response_loss(m(tokens, deltas), tokens, mask)

    grads = jax.grad(loss_and_probs)(deltas)
    probs = _layer_probs(nnx.merge(graphdef, state), tokens)
    return jnp.stack([influence(p, g).mean(0) for p, g in zip(probs, grads)])

  total = None
  for tokens, mask in batches:
    e = tile_sums(np.asarray(one(state, tokens, mask)), block)
    total = e if total is None else total + e
  return total / len(batches)


def _layer_probs(model: TinyLM, tokens):
  """Dense causal attention probabilities [B, H, N, N] of every layer."""
  probs = []
  x = model.embed(tokens)
  n = tokens.shape[1]
  pos = jnp.arange(n)
  for i, (attn, mlp) in enumerate(zip(model.attns, model.mlps)):
    h = model.norms[2 * i](x)
    q = attn._rotate(attn.query(h), pos)  # pylint: disable=protected-access
    k = attn._rotate(attn.key(h), pos)  # pylint: disable=protected-access
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
    probs.append(jax.nn.softmax(s, -1))
    x = x + _probed_attention(attn, h, 0.0)
    x = x + mlp(model.norms[2 * i + 1](x))
  return probs


# -- candidate rules and the MILP ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Candidate elastic rules (profiling convention).

  Attributes:
    block: profiling block b.
    profile_lengths: lengths with an influence profile.
    extend_length: longest constrained (unprofiled) length.
    alpha_step: alpha grid step (tokens).
    num_betas: betas are linspace(0, 1, num_betas).
    density: average density bound d_N at every constrained length.
    max_rules_per_layer: distinct rules allowed inside one layer.
  """

  block: int = 16
  profile_lengths: tuple[int, ...] = (128, 256)
  extend_length: int = 512
  alpha_step: int = 32
  num_betas: int = 9
  density: float = 0.5
  max_rules_per_layer: int = 2

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


def rule_block_mask(alpha: float, beta: float, n: int,
                    block: int) -> np.ndarray:
  """bool [nb, nb] profiling layout: causal band + block column 0."""
  nb = n // block
  width = int(math.floor(alpha / block + beta * nb))
  return static.sink_window_block_mask(nb, nb, [1], [width])[0]


def rule_cost(candidates: np.ndarray, tiles: np.ndarray, n: int,
              block: int) -> tuple[np.ndarray, np.ndarray]:
  """Loss [heads, C] (influence of dropped tiles) and density [C] at n.

  Args:
    candidates: [C, 2] rules.
    tiles: [heads, nb, nb] tile influence at length n, or None (density
      only; the loss is zeros).
  """
  nb = n // block
  causal = np.tril(np.ones((nb, nb), bool))
  keeps = np.stack([rule_block_mask(a, b, n, block) for a, b in candidates])
  density = keeps.sum((1, 2)) / causal.sum()
  if tiles is None:
    return None, density
  dropped = (causal & ~keeps).astype(np.float64)
  return np.einsum("hij,cij->hc", tiles, dropped), density


def solve_plan(profiles: dict[int, np.ndarray], space: SearchSpace,
               time_limit: float = 60.0) -> dict:
  """Picks one rule per head with `scipy.optimize.milp` (HiGHS).

  Args:
    profiles: length -> tile influence [L, H, nb, nb].
    space: the candidate space and constraints.

  Returns:
    {"alphas": [L][H], "betas": [L][H], "loss": objective, "density":
    {length: average density}, "candidates": [C, 2]}.
  """
  # SciPy is slow to import and only the plan search needs it.
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  from scipy import sparse  # pylint: disable=g-import-not-at-top

  cands = space.candidates()
  num_layers, num_heads = next(iter(profiles.values())).shape[:2]
  heads, num_c = num_layers * num_heads, len(cands)
  loss = np.zeros((heads, num_c))
  for n, tiles in profiles.items():
    cost, _ = rule_cost(cands, tiles.reshape(heads, *tiles.shape[2:]), n,
                        space.block)
    loss += cost
  lengths = sorted(set(space.profile_lengths) | {space.extend_length})
  densities = {n: rule_cost(cands, None, n, space.block)[1] for n in lengths}
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
  return {
      "alphas": chosen[..., 0].tolist(),
      "betas": chosen[..., 1].tolist(),
      "loss": float(loss[np.arange(heads), choice].sum()),
      "density": {str(n): float(densities[n][choice].mean())
                  for n in lengths},
      "block": space.block,
  }


def uniform_plan_loss(profiles, space: SearchSpace) -> tuple[float, tuple]:
  """Best single rule for every head under the same density budget."""
  cands = space.candidates()
  lengths = sorted(set(space.profile_lengths) | {space.extend_length})
  ok = np.ones(len(cands), bool)
  for n in lengths:
    ok &= rule_cost(cands, None, n, space.block)[1] <= space.density + 1e-12
  total = np.zeros(len(cands))
  for n, tiles in profiles.items():
    flat = tiles.reshape(-1, *tiles.shape[2:])
    total += rule_cost(cands, flat, n, space.block)[0].sum(0)
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
  return [MoAConfig(alphas=tuple(a), betas=tuple(b), block_size=block,
                    sink_tokens=overrides.get("sink_tokens", block),
                    min_span=overrides.get("min_span", 2 * block))
          for a, b in zip(plan["alphas"], plan["betas"])]


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
