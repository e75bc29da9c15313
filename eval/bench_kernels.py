"""Benchmark: block_sparse_attention vs dense attention across densities.

For random and causal-window layouts at densities (1, .5, .25, .1, .05), times
every available backend of the op against dense
`jax.nn.dot_product_attention` (cuDNN on a GPU in bf16/f16, else XLA),
measured side by side in the same run, forward and forward+backward (the
forward-only "mosaic_gpu" skips the latter). Prints a table and writes JSON
(device, versions, shapes, times, ratios, compiled temp memory). On CPU only
the ratios mean something; absolute numbers come from accelerators.

  python eval/bench_kernels.py                       # CPU default, T=8192
  python eval/bench_kernels.py --seq_len 2048 --modes fwd
  python eval/bench_kernels.py --tpu                 # TPU vs splash
                                             # (eval/bench_kernels_tpu.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from eval import host
from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import api

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# Backends without a backward pass.
FORWARD_ONLY = ("mosaic_gpu",)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq_len", type=int, default=8192)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--num_q_heads", type=int, default=4)
  p.add_argument("--num_kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--block", type=int, default=None,
                 help="layout block (default 128; 512 with --tpu)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                 help="default f32; bf16 with --tpu")
  p.add_argument("--densities", default="1,0.5,0.25,0.1,0.05")
  p.add_argument("--layouts", default="random,causal_window")
  p.add_argument("--modes", default="fwd,fwd_bwd")
  p.add_argument("--implementations", default=None,
                 help="comma list; default: every backend available here")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--memory_window", type=int, default=1024,
                 help="fixed causal window (keys) of the memory-scaling "
                 "check at T/4, T/2, T")
  p.add_argument("--interpret", action="store_true",
                 help="run Pallas backends in interpret mode")
  p.add_argument("--out", default=None,
                 help="JSON path; default eval/results/bench_kernels_"
                 "<platform>_T<seq_len>.json")
  tpu = p.add_argument_group(
      "TPU section (eval/bench_kernels_tpu.py): the Mosaic TPU kernels "
      "against splash attention, dense mode and the density sweep")
  tpu.add_argument("--tpu", action="store_true",
                   help="run the TPU section instead (bf16, block 512, "
                   "within --time_budget_s)")
  tpu.add_argument("--dry_run", action="store_true",
                   help="with --tpu: a small problem in interpret mode on "
                   "any host (checks the script, not speed)")
  tpu.add_argument("--time_budget_s", type=float, default=420.0,
                   help="with --tpu: start no case after this many seconds")
  args = p.parse_args(argv)
  if args.dry_run and not args.tpu:
    p.error("--dry_run applies to --tpu only")
  if args.dtype is None:
    args.dtype = "bf16" if args.tpu else "f32"
  if args.block is None:
    args.block = 512 if args.tpu else 128
  return args


def make_layout(kind: str, density: float, t: int, block: int,
                seed: int = 0) -> BlockLayout:
  """A layout visiting about `density` of the (q block, kv block) pairs."""
  nb = t // block
  per_row = max(1, round(density * nb))
  if kind == "random":
    # Exactly `per_row` random blocks per row, so Kmax tracks the density.
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, 1, nb, nb), bool)
    for r in range(nb):
      mask[0, 0, r, rng.choice(nb, per_row, replace=False)] = True
    return BlockLayout.from_block_mask(mask, block, block,
                                       full_block_mask=mask)
  if kind == "causal_window":
    return BlockLayout.local(t, window=(per_row * block - 1, 0),
                             block_q=block, block_kv=block)
  raise ValueError(f"unknown layout kind {kind!r}")


def dense_implementation(platform_name: str, dtype) -> str:
  """cuDNN where it runs (GPU, 16-bit floats), else XLA."""
  half = jnp.dtype(dtype).itemsize == 2
  return "cudnn" if platform_name == "gpu" and half else "xla"


def timed(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def temp_bytes(fn, *args) -> int | None:
  analysis = fn.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def with_grad(attention):
  """fwd+bwd: value and gradients of sum(out * cotangent)."""

  def loss(q, k, v, cot):
    return jnp.sum(attention(q, k, v).astype(jnp.float32) * cot)

  return jax.grad(loss, argnums=(0, 1, 2))


def build(attention, mode):
  if mode == "fwd":
    return jax.jit(lambda q, k, v, cot: attention(q, k, v))
  if mode == "fwd_bwd":
    return jax.jit(with_grad(attention))
  raise ValueError(f"unknown mode {mode!r}")


def main(argv=None):
  args = parse_args(argv)
  if args.tpu:
    # Imported here: it builds on this module's helpers.
    from eval import bench_kernels_tpu  # pylint: disable=g-import-not-at-top
    return bench_kernels_tpu.main(args)
  dtype = DTYPES[args.dtype]
  t, b = args.seq_len, args.batch
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, args.num_q_heads, args.head_dim),
                        dtype)
  k = jax.random.normal(keys[1], (b, t, args.num_kv_heads, args.head_dim),
                        dtype)
  v = jax.random.normal(keys[2], k.shape, dtype)
  cot = jax.random.normal(keys[3], q.shape, jnp.float32)
  impls = (args.implementations.split(",") if args.implementations else
           api.available_implementations(interpret=args.interpret))
  device = jax.devices()[0]
  print(f"device={device.device_kind} platform={device.platform} "
        f"jax={jax.__version__} implementations={','.join(impls)}")
  print(f"B={b} T=S={t} Hq={args.num_q_heads} Hkv={args.num_kv_heads} "
        f"D={args.head_dim} block={args.block} dtype={args.dtype}")

  dense_impl = dense_implementation(device.platform, dtype)
  rows = []
  for mode in args.modes.split(","):
    dense = build(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation=dense_impl), mode)
    dense_time = timed(dense, q, k, v, cot, reps=args.reps)
    dense_mem = temp_bytes(dense, q, k, v, cot)
    print(f"\n[{mode}] dense jax.nn.dot_product_attention ({dense_impl}): "
          f"{dense_time * 1e3:.1f} ms, temp {_mib(dense_mem)}")
    print(f"{'layout':>14} {'density':>8} {'actual':>7} {'impl':>11} "
          f"{'ms':>9} {'ratio':>7} {'temp':>10}")
    for kind in args.layouts.split(","):
      for density in map(float, args.densities.split(",")):
        layout = make_layout(kind, density, t, args.block)
        actual = float(layout.density())
        for impl in impls:
          if mode != "fwd" and impl in FORWARD_ONLY:
            continue
          attention = lambda q, k, v, layout=layout, impl=impl: (
              block_sparse_attention(q, k, v, layout, implementation=impl,
                                     interpret=args.interpret))
          fn = build(attention, mode)
          sparse_time = timed(fn, q, k, v, cot, reps=args.reps)
          mem = temp_bytes(fn, q, k, v, cot)
          ratio = sparse_time / dense_time
          rows.append(dict(mode=mode, layout=kind, density=density,
                           actual_density=actual, implementation=impl,
                           kmax=layout.max_kv_blocks, time_s=sparse_time,
                           dense_time_s=dense_time, ratio_vs_dense=ratio,
                           temp_bytes=mem, dense_temp_bytes=dense_mem))
          print(f"{kind:>14} {density:>8.2f} {actual:>7.3f} {impl:>11} "
                f"{sparse_time * 1e3:>9.1f} {ratio:>7.3f} {_mib(mem):>10}")

  memory = memory_scaling(args, impls, dtype)
  result = dict(
      benchmark="bench_kernels",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      device=device.device_kind, platform=device.platform,
      jax_version=jax.__version__,
      jaxlib_version=jaxlib.__version__,
      python=platform.python_version(), host=host.describe(),
      dense_implementation=dense_impl,
      shapes=dict(batch=b, seq_len=t, num_q_heads=args.num_q_heads,
                  num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                  block=args.block, dtype=args.dtype),
      reps=args.reps, results=rows, memory_scaling=memory)
  out = pathlib.Path(args.out or (
      f"eval/results/bench_kernels_{device.platform}_T{t}.json"))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"\nwrote {out}")
  return result


def memory_scaling(args, impls, dtype):
  """Compiled temp memory (fwd) at T/4, T/2, T for a fixed-width window.

  The sparse op's memory should grow linearly with T, dense quadratically.
  Compile-only: nothing is run.
  """
  print(f"\n[memory] causal window of {args.memory_window} keys, fwd temp:")
  rows = []
  for t in (args.seq_len // 4, args.seq_len // 2, args.seq_len):
    shape_q = jax.ShapeDtypeStruct(
        (args.batch, t, args.num_q_heads, args.head_dim), dtype)
    shape_kv = jax.ShapeDtypeStruct(
        (args.batch, t, args.num_kv_heads, args.head_dim), dtype)
    layout = BlockLayout.local(t, window=(args.memory_window - 1, 0),
                               block_q=args.block, block_kv=args.block)
    row = dict(seq_len=t, dense_temp_bytes=temp_bytes(
        jax.jit(jax.nn.dot_product_attention), shape_q, shape_kv, shape_kv))
    for impl in impls:
      fn = jax.jit(lambda q, k, v, impl=impl, layout=layout: (
          block_sparse_attention(q, k, v, layout, implementation=impl,
                                 interpret=args.interpret)))
      row[f"{impl}_temp_bytes"] = temp_bytes(fn, shape_q, shape_kv, shape_kv)
    rows.append(row)
    print("  T=" + str(t) + " " + " ".join(
        f"{key[:-len('_temp_bytes')]}={_mib(val)}" for key, val in row.items()
        if key.endswith("_temp_bytes")))
  return rows


def _mib(n):
  return "n/a" if n is None else f"{n / 2**20:.1f}MiB"


if __name__ == "__main__":
  main()
