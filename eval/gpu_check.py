"""GPU check of the GPU backends: correctness, then benchmarks, one budget.

One script for a GPU session, runnable from a bare checkout (only jax, flax,
optax, orbax and chex installed; the repository root goes on sys.path). No
number in this repository comes from it until it has run on a GPU.

1. Correctness on small shapes, within --correctness_budget_s:
   implementation="triton" against the dense reference (f32 values and
   gradients within tolerance; bf16 by Marin's rule: RMS error vs an f32
   oracle <= 1.5x the reference's own bf16 error), then the UNVERIFIED
   "mosaic_gpu" forward (bf16/f16, d 64/128, causal or not) against the
   reference.
2. Benchmarks in bf16, B=1, in order of importance: the dense layout at
   T=4k (d128, then d64) through each backend next to cuDNN
   (`jax.nn.dot_product_attention(implementation="cudnn")`) and jax's Pallas
   `mha`; a density sweep (1, .5, .25, .1, .05) of causal-window and random
   layouts at T=16k; then longer dense T (16k, 32k). fwd and fwd+bwd
   ("mosaic_gpu" is forward only). Reports ms, dense-equivalent and effective
   TFLOP/s (FLOPs of the visited blocks only; fwd+bwd counts 3.5x fwd), and
   speedups against cuDNN and Pallas `mha` at the same (d, T, mode).

The whole run, correctness included, stays within --time_budget_s (a case
is skipped once less than --min_case_s is left). The JSON (device, versions,
results) is rewritten after every case, so a timeout keeps what ran.

--dry_run is a CPU mode: every case with tiny shapes, the Triton kernels and
Pallas `mha` in interpret mode, XLA attention standing in for cuDNN, and
"mosaic_gpu" only lowered for an abstract H100 (the Mosaic GPU interpreter
cannot run wgmma pipelines). Its timings are meaningless.

  python eval/gpu_check.py                    # ~500 s, $OUT/gpu_check.json
  python eval/gpu_check.py --quick            # T=4k only, < 3 minutes
  python eval/gpu_check.py --quick --dry_run  # CPU: the schema, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax.experimental.pallas.ops.gpu import attention as pallas_mha
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu
from pallas_kernels.block_sparse_attention import tile_math

_BF16_RATIO = 1.5
# f32 gate on GPU (IEEE dots in the kernel, HIGHEST in the reference).
_F32_ATOL = 1e-4
# Forward-only backends, not yet verified on a GPU.
_UNVERIFIED = ("mosaic_gpu",)
_H100 = "NVIDIA H100 80GB HBM3"


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog=__doc__[__doc__.index("  python"):],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq_lens", default="4096,16384,32768",
                 help="T values of the dense rows (the first comes first)")
  p.add_argument("--head_dims", default="128,64")
  p.add_argument("--num_heads", type=int, default=16)
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--densities", default="1,0.5,0.25,0.1,0.05")
  p.add_argument("--sweep_seq_lens", default="16384",
                 help="T values of the density sweep")
  p.add_argument("--backends", default="triton,mosaic_gpu")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--time_budget_s", type=float, default=None,
                 help="whole run, correctness included; default 500 (170 "
                 "with --quick)")
  p.add_argument("--correctness_budget_s", type=float, default=None,
                 help="default 90 (40 with --quick)")
  p.add_argument("--min_case_s", type=float, default=None,
                 help="start no case with less time left; default 15 "
                 "(0 with --dry_run)")
  p.add_argument("--quick", action="store_true",
                 help="T=4096 only, d128 sweep of 3 densities")
  p.add_argument("--dry_run", action="store_true",
                 help="CPU: tiny shapes, interpret mode, mosaic_gpu lowered "
                 "only; writes the JSON schema")
  p.add_argument("--skip_correctness", action="store_true")
  p.add_argument("--skip_bench", action="store_true")
  p.add_argument("--out", default=None,
                 help="JSON path; default $OUT/gpu_check.json, else "
                 "eval/results/gpu_check_<device>.json")
  args = p.parse_args(argv)
  if args.quick:
    args.seq_lens = args.sweep_seq_lens = "4096"
    args.densities = "1,0.25,0.05"
  if args.dry_run:
    args.seq_lens = args.sweep_seq_lens = "256"
    args.num_heads, args.reps = 2, 1
  defaults = (170.0, 40.0) if args.quick else (500.0, 90.0)
  if args.time_budget_s is None:
    args.time_budget_s = defaults[0]
  if args.correctness_budget_s is None:
    args.correctness_budget_s = defaults[1]
  if args.min_case_s is None:
    args.min_case_s = 0.0 if args.dry_run else 15.0
  return args


def versions() -> dict:
  out = {}
  for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin",
               "flax", "optax", "chex", "orbax-checkpoint"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


class Recorder:
  """Collects results, rewrites the JSON after every case, keeps the clock."""

  def __init__(self, path: pathlib.Path, header: dict, budget_s: float,
               min_case_s: float):
    self.path = path
    self.start = time.perf_counter()
    self.budget_s, self.min_case_s = budget_s, min_case_s
    self.data = dict(header, correctness=[], benchmarks=[])

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def time_left(self, budget_s: float | None = None) -> bool:
    budget = self.budget_s if budget_s is None else min(budget_s,
                                                        self.budget_s)
    return self.elapsed() + self.min_case_s < budget

  def add(self, section: str, row: dict):
    self.data[section].append(row)
    self.data["elapsed_s"] = round(self.elapsed(), 3)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(self.data, indent=2) + "\n")

  def run(self, section: str, row: dict, fn, budget_s: float | None = None):
    """Runs fn() -> dict of results; records them, the error, or a skip."""
    if not self.time_left(budget_s):
      self.add(section, dict(row, status="skipped: time budget"))
      return
    start = time.perf_counter()
    try:
      row.update(fn())
      row["status"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                 traceback=traceback.format_exc()[-3000:])
    row["wall_s"] = round(time.perf_counter() - start, 3)
    self.add(section, row)
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}),
          flush=True)


def abstract_h100_export(fn, *shapes):
  """Lowers fn for CUDA on an abstract H100 (works without a GPU)."""
  device = jax.sharding.AbstractDevice(device_kind=_H100, num_cores=132,
                                       platform="gpu")
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
      abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*shapes)


# -- correctness -----------------------------------------------------------


def _rms(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _qkv(seed, b, t, s, hq, hkv, d, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, hq, d)).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, hkv, d)).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, hkv, d)).astype(dtype)
  return q, k, v, jax.random.normal(keys[3], q.shape).astype(dtype)


def _random_layout(rng, bl, hl, t, s, block, empty_rows=False):
  qb, kb = -(-t // block), -(-s // block)
  present = rng.random((bl, hl, qb, kb)) < 0.5
  if empty_rows:
    present[..., 0, :] = False
  full = rng.random(present.shape) < 0.5
  return BlockLayout.from_block_mask(present, block, block,
                                     full_block_mask=full)


def _triton_cases(tiny: bool):
  """(name, shape (B, T, S, Hq, Hkv, D), layout builder, op kwargs)."""
  rng = np.random.default_rng(0)
  # Tiny: sizes / 8 and blocks of 16 (interpret mode on a CPU).
  n = (lambda x: max(16, x // 8)) if tiny else (lambda x: x)
  blk = (lambda x: 16) if tiny else (lambda x: x)
  seg = np.sort(rng.integers(0, 4, (2, n(1000))), axis=-1).astype(np.int32)
  mask = rng.random((1, 2, n(700), n(900))) < 0.3
  mask[..., :n(300)] = True
  return [
      ("gqa_kv_layout_causal", (2, n(1000), n(1000), 8, 2, 128),
       lambda: _random_layout(rng, 2, 2, n(1000), n(1000), blk(128)),
       dict(causal=True)),
      ("q_head_layout_bias_softcap", (1, n(700), n(900), 4, 2, 64),
       lambda: _random_layout(rng, 1, 4, n(700), n(900), blk(64)),
       dict(bias_k=jax.random.normal(jax.random.key(1), (1, 4, n(900))),
            softcap=20.0)),
      ("segments_empty_rows", (2, n(1000), n(1000), 4, 4, 64),
       lambda: _random_layout(rng, 1, 1, n(1000), n(1000), blk(64),
                              empty_rows=True),
       dict(q_segment_ids=seg, kv_segment_ids=seg)),
      ("element_mask_tiles", (1, n(700), n(900), 2, 2, 128),
       lambda: BlockLayout.from_element_mask(mask, blk(64), blk(64)), {}),
      ("causal_window_d80_padded", (1, n(1024), n(1024), 4, 4, 80),
       lambda: BlockLayout.local(n(1024), window=(n(300), 0),
                                 block_q=blk(128), block_kv=blk(128)), {}),
  ]


def _values_and_grads(impl, q, k, v, cot, layout, kwargs, interpret):
  bias = kwargs.get("bias_k")
  rest = {key: val for key, val in kwargs.items() if key != "bias_k"}

  def run(q, k, v, bias):
    return block_sparse_attention(q, k, v, layout, bias_k=bias,
                                  implementation=impl, interpret=interpret,
                                  **rest)

  @jax.jit
  def go(q, k, v, bias):
    out, vjp = jax.vjp(run, q, k, v, bias)
    return out, vjp(cot.astype(out.dtype))

  return go(q, k, v, bias)


def check_triton_case(shape, make_layout, kwargs, interpret) -> dict:
  b, t, s, hq, hkv, d = shape
  layout = make_layout()
  result = {}
  q, k, v, cot = _qkv(0, b, t, s, hq, hkv, d, jnp.float32)
  kwargs32 = dict(kwargs)
  if "bias_k" in kwargs32:
    kwargs32["bias_k"] = kwargs32["bias_k"].astype(jnp.float32)
  run = functools.partial(_values_and_grads, interpret=interpret)
  # Without this the f32 oracle would use TF32 dots on GPU.
  with jax.default_matmul_precision("highest"):
    out, grads = run("triton", q, k, v, cot, layout, kwargs32)
    ref, ref_grads = run("reference", q, k, v, cot, layout, kwargs32)
  errors = [float(jnp.max(jnp.abs(out - ref)))]
  scales = [1.0]
  for g, rg in zip(grads, ref_grads):
    if rg is None:
      continue
    errors.append(float(jnp.max(jnp.abs(g - rg))))
    scales.append(max(1.0, float(jnp.max(jnp.abs(rg)))))
  result["f32_max_abs_err"] = dict(zip(("out", "dq", "dk", "dv", "dbias"),
                                       errors))
  result["f32_ok"] = all(e <= 2 * _F32_ATOL * sc for e, sc in
                         zip(errors, scales))
  result["finite"] = bool(jnp.all(jnp.isfinite(out)) and all(
      bool(jnp.all(jnp.isfinite(g))) for g in grads if g is not None))

  bf = lambda x: x.astype(jnp.bfloat16)
  kwargs16 = dict(kwargs)
  if "bias_k" in kwargs16:
    kwargs16["bias_k"] = bf(kwargs16["bias_k"])
  out16, grads16 = run("triton", bf(q), bf(k), bf(v), cot, layout, kwargs16)
  ref16, ref_grads16 = run("reference", bf(q), bf(k), bf(v), cot, layout,
                           kwargs16)
  ratios = {}
  for key, x, rx, oracle in zip(
      ("out", "dq", "dk", "dv", "dbias"), (out16, *grads16),
      (ref16, *ref_grads16), (ref, *ref_grads)):
    if oracle is None:
      continue
    err = _rms(np.asarray(x, np.float32) - np.asarray(oracle))
    ref_err = _rms(np.asarray(rx, np.float32) - np.asarray(oracle))
    ratios[key] = err / max(ref_err, 1e-12)
  result["bf16_error_ratio"] = ratios
  result["bf16_ok"] = all(r <= _BF16_RATIO for r in ratios.values())
  result["ok"] = result["f32_ok"] and result["bf16_ok"] and result["finite"]
  return result


def _mosaic_gpu_cases():
  """(name, shape, dtype, causal): the forward of the kernel test."""
  return [(f"{jnp.dtype(dtype).name}_d{d}{'_causal' if causal else ''}",
           (2, 300, 320, 4, 2, d), dtype, causal)
          for d in (128, 64) for dtype in (jnp.bfloat16, jnp.float16)
          for causal in (False, True)]


def check_mosaic_gpu_case(shape, dtype, causal, dry_run) -> dict:
  """Forward values and lse vs the reference; lowering only on a CPU."""
  b, t, s, hq, hkv, d = shape
  layout = _random_layout(np.random.default_rng(0), b, hkv, t, s, 128,
                          empty_rows=True)
  if dry_run:
    return dict(lowered=lower_mosaic_gpu(layout, (b, t, hq, d),
                                         (b, s, hkv, d), dtype, causal),
                verified=False)
  q, k, v, _ = _qkv(0, b, t, s, hq, hkv, d, dtype)
  run = lambda impl: block_sparse_attention(
      q, k, v, layout, causal=causal, return_lse=True, implementation=impl)
  (out, lse), (ref, ref_lse) = run("mosaic_gpu"), run("reference")
  out_err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
  both = jnp.isfinite(ref_lse)
  lse_err = float(jnp.max(jnp.where(both, jnp.abs(lse - ref_lse), 0.0)))
  lse_inf_ok = bool(jnp.all(jnp.isfinite(lse) == both))
  return dict(out_max_abs_err=out_err, lse_max_abs_err=lse_err,
              ok=out_err <= 2e-2 and lse_err <= 2e-2 and lse_inf_ok,
              verified=False)


def lower_mosaic_gpu(layout, q_shape, kv_shape, dtype, causal) -> bool:
  """Exports the padded mosaic_gpu forward for an abstract H100."""
  t = layout.num_q_blocks * layout.block_q
  s = layout.num_kv_blocks * layout.block_kv
  spec = tile_math.MaskSpec(
      q_len=q_shape[1], kv_len=kv_shape[1], kv_len_padded=s,
      band=layout.band, has_segments=False,
      has_tiles=layout.tiles is not None, sm_scale=q_shape[-1] ** -0.5,
      softcap=None, causal=causal)

  def fwd(q, k, v):
    return pallas_mosaic_gpu.forward(
        q, k, v, None, None, None, layout, spec,
        causal_offset=jnp.int32(0) if causal else None)

  abstract_h100_export(
      fwd, jax.ShapeDtypeStruct((q_shape[0], t, *q_shape[2:]), dtype),
      *[jax.ShapeDtypeStruct((kv_shape[0], s, *kv_shape[2:]), dtype)] * 2)
  return True


# -- benchmarks --------------------------------------------------------------


def make_layout(kind: str, density: float, t: int, heads: int,
                block: int) -> BlockLayout:
  """About `density` of the block pairs: random per head, or causal window."""
  nb = t // block
  per_row = max(1, round(density * nb))
  if kind == "random":
    rng = np.random.default_rng(0)
    scores = rng.random((1, heads, nb, nb))
    top = np.argsort(-scores, axis=-1)[..., :per_row]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, top, True, axis=-1)
    return BlockLayout.from_block_mask(mask, block, block,
                                       full_block_mask=mask)
  if kind == "causal_window":
    return BlockLayout.local(t, window=(per_row * block - 1, 0),
                             block_q=block, block_kv=block)
  if kind == "dense":
    return BlockLayout.dense(t, t, block_q=block, block_kv=block)
  raise ValueError(f"unknown layout kind {kind!r}")


def timed(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def build(attention, mode: str):
  if mode == "fwd":
    return jax.jit(lambda q, k, v, cot: attention(q, k, v))

  def loss(q, k, v, cot):
    return jnp.sum(attention(q, k, v).astype(jnp.float32) * cot)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def baselines(d: int, dry_run: bool):
  """Dense attention callables [B, T, H, D] -> [B, T, H, D] to compare.

  In a dry run XLA attention stands in for cuDNN and Pallas `mha` runs in
  interpret mode.
  """
  scale = 1.0 / math.sqrt(d)
  return {
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, implementation="xla" if dry_run else "cudnn"),
      "pallas_mha": lambda q, k, v: pallas_mha.mha(
          q, k, v, segment_ids=None, sm_scale=scale, interpret=dry_run),
  }


def bench_case(attention, mode, t, heads, d, reps, visited_fraction) -> dict:
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (1, t, heads, d)
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:3])
  cot = jax.random.normal(keys[3], shape, jnp.float32)
  seconds = timed(build(attention, mode), q, k, v, cot, reps=reps)
  dense_flops = 4.0 * t * t * heads * d * (1.0 if mode == "fwd" else 3.5)
  return dict(ms=seconds * 1e3,
              dense_equiv_tflops=dense_flops / seconds / 1e12,
              effective_tflops=(dense_flops * visited_fraction / seconds
                                / 1e12))


def bench_cases(args) -> list[dict]:
  """Benchmark rows in order of importance (baselines before their users)."""
  backends = args.backends.split(",")
  head_dims = list(map(int, args.head_dims.split(",")))
  seq_lens = list(map(int, args.seq_lens.split(",")))
  sweep_lens = list(map(int, args.sweep_seq_lens.split(",")))
  densities = list(map(float, args.densities.split(",")))
  rows = []

  def dense(d, t):
    for mode in ("fwd", "fwd_bwd"):
      for impl in ("cudnn", "pallas_mha", *backends):
        if mode == "fwd_bwd" and impl in _UNVERIFIED:
          continue
        rows.append(dict(kind="dense", impl=impl, d=d, t=t, mode=mode,
                         density=1.0))

  def sweep(d, t):
    for kind in ("causal_window", "random"):
      for density in densities:
        for mode in ("fwd", "fwd_bwd"):
          for impl in backends:
            if not (mode == "fwd_bwd" and impl in _UNVERIFIED):
              rows.append(dict(kind=kind, impl=impl, d=d, t=t, mode=mode,
                               density=density))

  for d in head_dims:  # The dense-mode rows at the first T, d128 first.
    dense(d, seq_lens[0])
  sweep_dims = head_dims[:1] if args.quick else head_dims
  for t in sweep_lens:
    if t not in seq_lens[:1]:
      for d in sweep_dims:
        dense(d, t)
    sweep(sweep_dims[0], t)
  for t in seq_lens[1:]:
    for d in head_dims:
      if t not in sweep_lens or d not in sweep_dims:
        dense(d, t)
  for d in sweep_dims[1:]:
    for t in sweep_lens:
      sweep(d, t)
  return rows


def run_bench_row(row, args) -> dict:
  t, d, impl, heads = row["t"], row["d"], row["impl"], args.num_heads
  if impl in ("cudnn", "pallas_mha"):
    attention = baselines(d, args.dry_run)[impl]
    return bench_case(attention, row["mode"], t, heads, d, args.reps, 1.0)
  layout = make_layout(row["kind"], row["density"], t, heads, args.block)
  visited = float(layout.density())
  info = dict(visited_block_fraction=visited, kmax=layout.max_kv_blocks,
              verified=impl not in _UNVERIFIED)
  if impl == "mosaic_gpu" and args.dry_run:
    shape = (1, t, heads, d)
    return dict(info, lowered=lower_mosaic_gpu(layout, shape, shape,
                                               jnp.bfloat16, False))
  attention = lambda q, k, v: block_sparse_attention(
      q, k, v, layout, implementation=impl, interpret=args.dry_run)
  result = bench_case(attention, row["mode"], t, heads, d, args.reps, visited)
  return dict(result, **info)


def with_ratios(row, result: dict, recorded: dict) -> dict:
  """`result` plus speedups against the baselines at the same (d, T, mode)."""
  for name in ("cudnn", "pallas_mha"):
    base = recorded.get((name, row["d"], row["t"], row["mode"]))
    if base and result.get("ms"):
      result[f"speedup_vs_{name}"] = base / result["ms"]
  return result


def main(argv=None):
  args = parse_args(argv)
  device = jax.devices()[0]
  header = dict(
      script="eval/gpu_check.py",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      device=device.device_kind, platform=device.platform,
      dry_run=args.dry_run, versions=versions(), args=vars(args),
      unverified_backends=list(_UNVERIFIED))
  out_dir = os.environ.get("OUT")
  path = pathlib.Path(args.out or (
      pathlib.Path(out_dir) / "gpu_check.json" if out_dir else
      pathlib.Path("eval/results") /
      f"gpu_check_{device.device_kind.replace(' ', '_')}.json"))
  rec = Recorder(path, header, args.time_budget_s, args.min_case_s)
  print(f"device={device.device_kind} versions={header['versions']}",
        flush=True)
  if device.platform != "gpu" and not args.dry_run:
    print("warning: not a GPU; pass --dry_run to check the script on a CPU",
          flush=True)

  backends = args.backends.split(",")
  if not args.skip_correctness:
    budget = args.correctness_budget_s
    for name, shape, layout_fn, kwargs in (
        _triton_cases(args.dry_run) if "triton" in backends else ()):
      rec.run("correctness", dict(case=name, impl="triton", shape=shape),
              functools.partial(check_triton_case, shape, layout_fn, kwargs,
                                args.dry_run), budget)
    for name, shape, dtype, causal in (
        _mosaic_gpu_cases() if "mosaic_gpu" in backends else ()):
      rec.run("correctness", dict(case=name, impl="mosaic_gpu", shape=shape),
              functools.partial(check_mosaic_gpu_case, shape, dtype, causal,
                                args.dry_run), budget)

  if not args.skip_bench:
    recorded = {}  # (baseline, d, T, mode) -> ms
    for row in bench_cases(args):
      row = dict(row, heads=args.num_heads, block=args.block, dtype="bf16")
      rec.run("benchmarks", row,
              lambda row=row: with_ratios(row, run_bench_row(row, args),
                                          recorded))
      if row.get("ms") is not None and row["impl"] in ("cudnn",
                                                       "pallas_mha"):
        recorded[(row["impl"], row["d"], row["t"], row["mode"])] = row["ms"]
  print(f"wrote {path}")
  return rec.data


if __name__ == "__main__":
  main()
