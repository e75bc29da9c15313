"""Benchmark: what each of the 13 methods costs against dense attention.

For every method at its default configuration (sized to the sequence length
where the method's structure depends on it) and every sequence length, one
run measures side by side:

- `plan_s`: jit(method.plan), the selection (estimator, search, layout);
- `total_s`: jit(method(q, k, v)), plan + attend as a user's forward pass
  runs it;
- `dense_s`: `jax.nn.dot_product_attention` on the same q, k, v (causal for
  the causal methods);
- compiled temp memory of plan + attend and of dense attention;
- FLOPs against dense: matmul FLOPs counted in the jaxpr
  (`eval/matmul_flops.py`: loop bodies times their trip counts), and XLA's
  cost-analysis FLOPs, which count a loop body once and so under-count the
  chunked gather paths (kept for comparison);
- block density (listed blocks over Qb·Kb, or listed keys over S for row
  layouts) and element density (visible logits over T·S, counted exactly
  by running the plan's own masks on q = k = 0, where lse = log(count)).

On CPU only the ratios mean something (the "xla" backend stands in for the
GPU/TPU kernels); absolute numbers come from accelerators.

  python eval/bench_methods.py                             # CPU default
  python eval/bench_methods.py --seq_lens 4096 --methods hip,sea
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import platform
import sys
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from eval import host as host_lib  # noqa: E402
from eval import matmul_flops as matmul_flops_lib  # noqa: E402
from jsparse import methods as methods_lib  # noqa: E402
from jsparse.methods import blade  # noqa: E402
from jsparse.methods import dma  # noqa: E402
from jsparse.methods import hip  # noqa: E402
from jsparse.methods import hmar  # noqa: E402
from jsparse.methods import llsa  # noqa: E402
from jsparse.methods import moa  # noqa: E402
from jsparse.methods import pemf  # noqa: E402
from jsparse.methods import psa  # noqa: E402
from jsparse.methods import radial  # noqa: E402
from jsparse.methods import sea  # noqa: E402
from jsparse.methods import setrec  # noqa: E402
from jsparse.methods import sparsifiner  # noqa: E402
from jsparse.methods import swinbert  # noqa: E402

ALL_METHODS = tuple(methods_lib.METHODS)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq_lens", default="4096,8192,16384")
  p.add_argument("--methods", default=",".join(ALL_METHODS))
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--reps", type=int, default=3,
                 help="timed calls per measurement; the minimum is kept")
  p.add_argument("--out", default=None,
                 help="JSON path; default eval/results/bench_methods_"
                 "<platform>.json (a PNG is written next to it)")
  return p.parse_args(argv)


@dataclasses.dataclass
class Case:
  """One method set up for one length: what to call and on which shapes."""
  method: Any
  causal: bool
  q_len: int
  kv_len: int
  plan_kwargs: dict
  note: str = ""


def _hmar_patch_nums(t: int) -> tuple[int, ...]:
  """HMAR's default scales stretched so that sum(pn**2) is about t."""
  base = np.asarray(hmar.HMARConfig().patch_nums, np.float64)
  factor = math.sqrt(t / float(np.sum(base**2)))
  return tuple(int(x) for x in np.maximum(np.round(base * factor), 1))


def make_case(name: str, t: int, heads: int, head_dim: int) -> Case:
  """The method at its defaults, sized to length t where it must be."""
  rngs = nnx.Rngs(0)
  if name == "hip":
    return Case(hip.HiPMethod(hip.HiPConfig()), True, t, t, {})
  if name == "sea":
    return Case(sea.SEAMethod(sea.SEAConfig(max_positions=t), heads,
                              head_dim, rngs=rngs), True, t, t, {})
  if name == "psa":
    return Case(psa.PSAMethod(psa.PSAConfig(mode="topk")), False, t, t, {})
  if name == "blade":
    return Case(blade.BladeMethod(blade.BladeConfig()), False, t, t, {})
  if name == "llsa":
    return Case(llsa.LLSAMethod(llsa.LLSAConfig()), False, t, t, {})
  if name == "dma":
    config = dma.DMAConfig(num_kv_heads=heads, head_dim=head_dim,
                           window=t // 8)
    return Case(dma.DMAMethod(config, rngs=rngs), True, t, t, {},
                "per_row, window T/8")
  if name == "sparsifiner":
    config = sparsifiner.SparsifinerConfig(num_tokens=t, keep_rate=0.1,
                                           cls_token=False)
    return Case(sparsifiner.SparsifinerMethod(config, heads, head_dim,
                                              rngs=rngs), False, t, t, {},
                "N=T, keep_rate 0.1, no CLS")
  if name == "moa":
    return Case(moa.MoAMethod(moa.MoAConfig()), True, t, t, {},
                "one rule: span 0.5 N")
  if name == "radial":
    config = radial.RadialConfig(num_frames=t // 256, tokens_per_frame=256)
    return Case(radial.RadialMethod(config), False, t, t, {},
                "T/256 frames of 256 tokens")
  if name == "hmar":
    config = hmar.HMARConfig(patch_nums=_hmar_patch_nums(t))
    n = config.seq_len
    return Case(hmar.HMARMethod(config), False, n, n, {},
                f"patch_nums {config.patch_nums}")
  if name == "setrec":
    base = setrec.SETRecConfig()
    fixed = base.seq_len - base.num_items * base.tokens_per_item
    config = dataclasses.replace(
        base, num_items=(t - fixed) // base.tokens_per_item)
    n = config.seq_len
    return Case(setrec.SETRecMethod(config), True, n, n, {},
                f"{config.num_items} items")
  if name == "swinbert":
    base = swinbert.SwinBERTConfig()
    config = dataclasses.replace(base, num_video=t - base.num_caption)
    return Case(swinbert.SwinBERTMethod(config, rngs=rngs), False, t, t,
                {"hard": True}, "hard (inference) layout")
  if name == "pemf":
    points = max(t // 16, 64)
    visible = jnp.arange(points)[None] % 2 == 0
    return Case(pemf.PEMFMethod(pemf.PEMFConfig(num_heads=heads)), False, t,
                points, {"visible": visible},
                f"{points} point keys, half visible")
  raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


def min_time(fn: Callable, *args, reps: int) -> float:
  """Minimum wall seconds over `reps` calls, after one compiling call.

  Calls of one function run back to back: a call right after dense
  attention runs up to 2x slower on CPU while the dense call's gigabyte of
  logits is released, so the functions compared are not interleaved.
  """
  jax.block_until_ready(fn(*args))
  best = math.inf
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def compiled_stats(fn: Callable, *args) -> dict:
  """Temp memory (bytes) and cost-analysis FLOPs of jit(fn) on args."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return dict(temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
              flops=float(cost.get("flops", float("nan"))))


def block_density(layout) -> float:
  """Listed blocks over Qb·Kb (row layouts: listed keys over S)."""
  return float(np.asarray(layout.density()))


def element_density(plan, q, k, v, kv_len: int) -> float:
  """Visible logits over T·S, counted with the plan's own masks.

  With q = k = 0 and no bias every visible logit is 0, so a row's
  log-sum-exp is log(number of visible keys) on the combined kv axis.
  """
  counting = dataclasses.replace(plan, bias_k=None, logit_q=None,
                                 logit_k=None)
  if counting.extra_k is not None:
    counting = dataclasses.replace(
        counting, extra_k=jnp.zeros_like(counting.extra_k))
  _, lse = jax.jit(lambda p, q, k, v: p.attend(
      q, k, v, return_lse=True, implementation="xla"))(
          counting, jnp.zeros_like(q), jnp.zeros_like(k), v)
  count = jnp.sum(jnp.where(jnp.isfinite(lse), jnp.exp(lse), 0.0))
  return float(count) / (lse.size * kv_len)


def bench_one(name: str, t: int, args) -> dict:
  h, d = args.num_heads, args.head_dim
  case = make_case(name, t, h, d)
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (1, case.q_len, h, d))
  k = jax.random.normal(kk, (1, case.kv_len, h, d))
  v = jax.random.normal(kv, (1, case.kv_len, h, d))
  graph, state = nnx.split(case.method)

  def plan_fn(state, q, k, v):
    # What the attention reads: aux (inspection outputs) is left out, as
    # the method's own call never materialises it.
    plan = nnx.merge(graph, state).plan(q, k, v, **case.plan_kwargs)
    return dataclasses.replace(plan, aux={})

  def total_fn(state, q, k, v):
    # What a user's forward pass runs: the method's own call (plan + attend,
    # or the LSE-merged branch calls where a method has them).
    method = nnx.merge(graph, state)
    return method(q, k, v, implementation="xla", **case.plan_kwargs)

  def dense_fn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=case.causal)

  plan = jax.jit(plan_fn)(state, q, k, v)
  plan_s = min_time(jax.jit(plan_fn), state, q, k, v, reps=args.reps)
  total_s = min_time(jax.jit(total_fn), state, q, k, v, reps=args.reps)
  dense_s = min_time(jax.jit(dense_fn), q, k, v, reps=args.reps)
  sparse_stats = compiled_stats(total_fn, state, q, k, v)
  dense_stats = compiled_stats(dense_fn, q, k, v)
  sparse_mm = matmul_flops_lib.matmul_flops(total_fn, state, q, k, v)
  dense_mm = matmul_flops_lib.matmul_flops(dense_fn, q, k, v)
  layout = plan.layout
  row = dict(
      method=name, seq_len=case.q_len, kv_len=case.kv_len,
      causal=case.causal, note=case.note,
      layout=type(layout).__name__,
      block_density=block_density(layout),
      element_density=element_density(plan, q, k, v, case.kv_len),
      plan_s=plan_s, total_s=total_s, dense_s=dense_s,
      total_over_dense=total_s / dense_s,
      selection_share=plan_s / total_s,
      temp_bytes=sparse_stats["temp_bytes"],
      dense_temp_bytes=dense_stats["temp_bytes"],
      matmul_flops=sparse_mm.flops, dense_matmul_flops=dense_mm.flops,
      matmul_flops_over_dense=sparse_mm.flops / dense_mm.flops,
      while_loops_counted_once=sparse_mm.while_loops,
      xla_flops=sparse_stats["flops"], dense_xla_flops=dense_stats["flops"],
      xla_flops_over_dense=sparse_stats["flops"] / dense_stats["flops"],
  )
  print(f"{name:11s} T={case.q_len:6d} density block {row['block_density']:.3f}"
        f" element {row['element_density']:.3f}  total/dense "
        f"{row['total_over_dense']:5.2f}  select share "
        f"{row['selection_share']:4.2f}  temp {row['temp_bytes'] / 2**20:8.1f}"
        f" MiB  matmul flops/dense {row['matmul_flops_over_dense']:5.3f}",
        flush=True)
  return row


def memory_growth(rows: list[dict]) -> dict:
  """Per method: temp memory ratio between consecutive benchmarked lengths."""
  growth = {}
  for name in dict.fromkeys(r["method"] for r in rows):
    mine = sorted((r for r in rows if r["method"] == name and "error" not in r),
                  key=lambda r: r["seq_len"])
    growth[name] = {
        f"{a['seq_len']}->{b['seq_len']}": b["temp_bytes"] / max(
            a["temp_bytes"], 1) for a, b in zip(mine, mine[1:])}
  return growth


def plot(rows: list[dict], device: str, path: pathlib.Path) -> None:
  """Cost against element density, one colour per method, one dot per T."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 5))
  colours = plt.get_cmap("tab20").colors
  markers = "osD^v<>phX*P8"
  for i, name in enumerate(dict.fromkeys(r["method"] for r in rows)):
    mine = [r for r in rows if r["method"] == name and "error" not in r]
    if not mine:
      continue
    x = [r["element_density"] for r in mine]
    y = [r["total_over_dense"] for r in mine]
    ax.plot(x, y, "-", marker=markers[i % len(markers)],
            color=colours[i % len(colours)], label=name, alpha=0.85)
    last = mine[-1]
    ax.annotate(f"{last['seq_len']}", (x[-1], y[-1]), fontsize=6)
  lim = [1e-3, 1.5]
  ax.plot(lim, lim, "k--", lw=0.8, label="cost = density")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("element density (visible logits / T·S)")
  ax.set_ylabel("jit(plan + attend) time / dense time")
  ax.set_title(f"jsparse methods on {device} (xla backend)")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  args = parse_args(argv)
  device = jax.devices()[0]
  host = host_lib.describe()
  print(f"device={device.device_kind} platform={device.platform} "
        f"jax={jax.__version__} host={host['model']} "
        f"{','.join(host['features'])}", flush=True)
  rows = []
  for name in args.methods.split(","):
    for t in (int(x) for x in args.seq_lens.split(",")):
      try:
        rows.append(bench_one(name, t, args))
      except Exception as err:  # pylint: disable=broad-except
        # A method that fails at a length is reported, not hidden.
        message = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"{name:11s} T={t:6d} FAILED {message}", flush=True)
        rows.append(dict(method=name, seq_len=t, error=message))
  result = dict(
      benchmark="bench_methods",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      device=device.device_kind, platform=device.platform, host=host,
      command="python eval/bench_methods.py " + " ".join(sys.argv[1:]),
      note=("CPU: ratios only; attention runs the gather-based 'xla' "
            "backend") if device.platform == "cpu" else None,
      jax=jax.__version__, jaxlib=jaxlib.__version__,
      python=platform.python_version(),
      shapes=dict(batch=1, num_heads=args.num_heads,
                  head_dim=args.head_dim, dtype="float32"),
      reps=args.reps, memory_growth=memory_growth(rows), rows=rows)
  out = pathlib.Path(args.out or (
      f"eval/results/bench_methods_{device.platform}.json"))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  plot(rows, device.device_kind, out.with_suffix(".png"))
  print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  main()
