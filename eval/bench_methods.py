"""Benchmark: selection vs sparse attention vs dense, for HiP/SEA/PSA/BLADE.

For each method and sequence length, times (a) `method.plan` (the selection:
estimator, search, layout build), (b) `plan.attend` with that plan (the
block-sparse op), and (c) dense attention (`jax.nn.dot_product_attention`,
causal for the causal methods), each jitted and measured side by side in the
same run. Writes JSON with device, versions and shapes. On CPU only the
ratios mean something (the "xla" backend stands in for the GPU/TPU kernels);
absolute numbers come from accelerators.

  python eval/bench_methods.py                        # CPU default
  python eval/bench_methods.py --seq_lens 8192,16384,32768 --methods psa
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import jaxlib

from jsparse.methods import blade
from jsparse.methods import hip
from jsparse.methods import psa
from jsparse.methods import sea

CAUSAL = {"hip": True, "sea": True, "psa": False, "blade": False}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq_lens", default="1024,2048,4096")
  p.add_argument("--methods", default="hip,sea,psa,blade")
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--sea_max_len", type=int, default=4096,
                 help="SEA builds a dense T x T element mask; skip above")
  p.add_argument("--out", default=None,
                 help="JSON path; default eval/results/bench_methods_"
                 "<platform>.json")
  return p.parse_args(argv)


def make_method(name: str, t: int, heads: int, head_dim: int):
  """The paper defaults, scaled to T where a default exceeds it."""
  if name == "hip":
    return hip.HiPMethod(hip.HiPConfig(budget=min(512, t // 8)))
  if name == "sea":
    return sea.SEAMethod(sea.SEAConfig(max_positions=t), heads, head_dim,
                         rngs=nnx.Rngs(0))
  if name == "psa":
    return psa.PSAMethod(psa.PSAConfig(mode="topk"))
  return blade.BladeMethod(blade.BladeConfig(samples=16))


def timed(fn, *args, reps: int) -> float:
  """Median wall seconds of `reps` calls after one compile call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_one(name, t, args):
  h, d = args.num_heads, args.head_dim
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, t, h, d)) for x in (kq, kk, kv))
  method = make_method(name, t, h, d)
  plan_fn = nnx.jit(lambda m, q, k, v: m.plan(q, k, v))
  plan = plan_fn(method, q, k, v)
  attend = jax.jit(lambda p, q, k, v: p.attend(q, k, v,
                                               implementation="xla"))
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=CAUSAL[name]))
  sel = timed(plan_fn, method, q, k, v, reps=args.reps)
  att = timed(attend, plan, q, k, v, reps=args.reps)
  den = timed(dense, q, k, v, reps=args.reps)
  layout = plan.layout
  row = {
      "method": name, "seq_len": t, "causal": CAUSAL[name],
      "selection_s": sel, "attention_s": att, "dense_s": den,
      "selection_over_dense": sel / den,
      "attention_over_dense": att / den,
      "total_over_dense": (sel + att) / den,
      "layout_block_q": layout.block_q, "layout_block_kv": layout.block_kv,
      "layout_kmax": layout.max_kv_blocks,
      "layout_density": float(layout.density()),
  }
  print(f"{name:6s} T={t:6d} select {sel * 1e3:9.2f} ms  attend "
        f"{att * 1e3:9.2f} ms  dense {den * 1e3:9.2f} ms  "
        f"(select/dense {sel / den:6.2f}, attend/dense {att / den:6.2f})")
  return row


def main(argv=None):
  args = parse_args(argv)
  device = jax.devices()[0]
  print(f"device={device.device_kind} platform={device.platform} "
        f"jax={jax.__version__}")
  rows = []
  for name in args.methods.split(","):
    for t in (int(x) for x in args.seq_lens.split(",")):
      if name == "sea" and t > args.sea_max_len:
        print(f"sea    T={t:6d} skipped (dense element mask)")
        continue
      rows.append(bench_one(name, t, args))
  result = dict(
      benchmark="bench_methods",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      device=device.device_kind, platform=device.platform,
      note=("CPU: ratios only; attention runs the gather-based 'xla' "
            "backend") if device.platform == "cpu" else None,
      jax=jax.__version__, jaxlib=jaxlib.__version__,
      python=platform.python_version(),
      shapes=dict(batch=1, num_heads=args.num_heads,
                  head_dim=args.head_dim, dtype="float32"),
      reps=args.reps, rows=rows)
  out = pathlib.Path(args.out or (
      f"eval/results/bench_methods_{device.platform}.json"))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
