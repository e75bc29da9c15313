"""GPU check of the Triton backend: correctness, then benchmarks.

One script for a GPU session (no numbers in this repository come from it
until it has run on a GPU):

1. Correctness of implementation="triton" against the dense reference on the
   GPU: f32 values and gradients within tolerance, and bf16 by Marin's rule
   (RMS error vs an f32 oracle <= 1.5x the reference's own bf16 error).
2. Benchmarks in bf16, B=1, H=16, D in {128, 64}, T in {4k, 16k, 64k}, fwd and
   fwd+bwd: the dense layout through the op vs cuDNN
   (`jax.nn.dot_product_attention(implementation="cudnn")`) and jax's Pallas
   `mha`; then a density sweep (1, .5, .25, .1, .05) of random and
   causal-window layouts. Reports ms, dense-equivalent TFLOP/s and effective
   TFLOP/s (FLOPs of the visited blocks only; fwd+bwd counts 3.5x fwd).

Every case runs in its own try/except and records its error; the JSON (device,
versions, results) is rewritten after each case, so a timeout keeps what ran.

  python eval/gpu_check.py                 # writes $OUT/gpu_check.json
  python eval/gpu_check.py --quick         # T=4k only, short sweep
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
import time
import traceback

import jax
from jax.experimental.pallas.ops.gpu import attention as pallas_mha
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention

_BF16_RATIO = 1.5
# f32 gate on GPU (IEEE dots in the kernel, HIGHEST in the reference).
_F32_ATOL = 1e-4


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq_lens", default="4096,16384,65536")
  p.add_argument("--head_dims", default="128,64")
  p.add_argument("--num_heads", type=int, default=16)
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--densities", default="1,0.5,0.25,0.1,0.05")
  p.add_argument("--sweep_seq_lens", default="16384",
                 help="T values of the density sweep")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--time_budget_s", type=float, default=480.0,
                 help="skip the remaining benchmark cases after this long")
  p.add_argument("--quick", action="store_true",
                 help="T=4096 only and a 3-point sweep")
  p.add_argument("--skip_correctness", action="store_true")
  p.add_argument("--skip_bench", action="store_true")
  p.add_argument("--out", default=None,
                 help="JSON path; default $OUT/gpu_check.json, else "
                 "eval/results/gpu_check_<device>.json")
  args = p.parse_args(argv)
  if args.quick:
    args.seq_lens = args.sweep_seq_lens = "4096"
    args.densities = "1,0.25,0.05"
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
  """Collects results and rewrites the JSON after every case."""

  def __init__(self, path: pathlib.Path, header: dict):
    self.path = path
    self.data = dict(header, correctness=[], benchmarks=[])

  def add(self, section: str, row: dict):
    self.data[section].append(row)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(self.data, indent=2) + "\n")

  def run(self, section: str, row: dict, fn):
    """Runs fn() -> dict of results; records them, or the error."""
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


def _correctness_cases():
  """(name, shape (B, T, S, Hq, Hkv, D), layout builder, op kwargs)."""
  rng = np.random.default_rng(0)

  def random_layout(bl, hl, t, s, block, empty_rows=False):
    qb, kb = -(-t // block), -(-s // block)
    present = rng.random((bl, hl, qb, kb)) < 0.5
    if empty_rows:
      present[..., 0, :] = False
    full = rng.random(present.shape) < 0.5
    return BlockLayout.from_block_mask(present, block, block,
                                       full_block_mask=full)

  seg = np.sort(rng.integers(0, 4, (2, 1000)), axis=-1).astype(np.int32)
  mask = rng.random((1, 2, 700, 900)) < 0.3
  mask[..., :300] = True
  return [
      ("gqa_kv_layout_causal", (2, 1000, 1000, 8, 2, 128),
       lambda: random_layout(2, 2, 1000, 1000, 128), dict(causal=True)),
      ("q_head_layout_bias_softcap", (1, 700, 900, 4, 2, 64),
       lambda: random_layout(1, 4, 700, 900, 64),
       dict(bias_k=jax.random.normal(jax.random.key(1), (1, 4, 900)),
            softcap=20.0)),
      ("segments_empty_rows", (2, 1000, 1000, 4, 4, 64),
       lambda: random_layout(1, 1, 1000, 1000, 64, empty_rows=True),
       dict(q_segment_ids=seg, kv_segment_ids=seg)),
      ("element_mask_tiles", (1, 700, 900, 2, 2, 128),
       lambda: BlockLayout.from_element_mask(mask, 64, 64), {}),
      ("causal_window_d80_padded", (1, 1024, 1024, 4, 4, 80),
       lambda: BlockLayout.local(1024, window=(300, 0), block_q=128,
                                 block_kv=128), {}),
  ]


def _values_and_grads(impl, q, k, v, cot, layout, kwargs):
  bias = kwargs.get("bias_k")
  rest = {key: val for key, val in kwargs.items() if key != "bias_k"}

  def run(q, k, v, bias):
    return block_sparse_attention(q, k, v, layout, bias_k=bias,
                                  implementation=impl, **rest)

  @jax.jit
  def go(q, k, v, bias):
    out, vjp = jax.vjp(run, q, k, v, bias)
    return out, vjp(cot.astype(out.dtype))

  return go(q, k, v, bias)


def check_case(name, shape, make_layout, kwargs) -> dict:
  b, t, s, hq, hkv, d = shape
  layout = make_layout()
  result = {}
  q, k, v, cot = _qkv(0, b, t, s, hq, hkv, d, jnp.float32)
  kwargs32 = dict(kwargs)
  if "bias_k" in kwargs32:
    kwargs32["bias_k"] = kwargs32["bias_k"].astype(jnp.float32)
  # Without this the f32 oracle would use TF32 dots on GPU.
  with jax.default_matmul_precision("highest"):
    out, grads = _values_and_grads("triton", q, k, v, cot, layout, kwargs32)
    ref, ref_grads = _values_and_grads("reference", q, k, v, cot, layout,
                                       kwargs32)
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
  out16, grads16 = _values_and_grads("triton", bf(q), bf(k), bf(v), cot,
                                     layout, kwargs16)
  ref16, ref_grads16 = _values_and_grads("reference", bf(q), bf(k), bf(v),
                                         cot, layout, kwargs16)
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


def baselines(d: int):
  """Dense attention callables [B, T, H, D] -> [B, T, H, D] to compare."""
  scale = 1.0 / math.sqrt(d)
  return {
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, implementation="cudnn"),
      "pallas_mha": lambda q, k, v: pallas_mha.mha(
          q, k, v, segment_ids=None, sm_scale=scale),
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


def main(argv=None):
  args = parse_args(argv)
  device = jax.devices()[0]
  header = dict(
      script="eval/gpu_check.py",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      device=device.device_kind, platform=device.platform,
      versions=versions(), args=vars(args))
  out_dir = os.environ.get("OUT")
  path = pathlib.Path(args.out or (
      pathlib.Path(out_dir) / "gpu_check.json" if out_dir else
      pathlib.Path("eval/results") /
      f"gpu_check_{device.device_kind.replace(' ', '_')}.json"))
  rec = Recorder(path, header)
  print(f"device={device.device_kind} versions={header['versions']}",
        flush=True)
  if device.platform != "gpu":
    print("warning: not a GPU; Triton kernels will not run here", flush=True)

  if not args.skip_correctness:
    for name, shape, layout_fn, kwargs in _correctness_cases():
      rec.run("correctness", dict(case=name, shape=shape),
              functools.partial(check_case, name, shape, layout_fn, kwargs))

  if args.skip_bench:
    print(f"wrote {path}")
    return rec.data
  start = time.perf_counter()
  heads, block, reps = args.num_heads, args.block, args.reps
  cases = []
  for d in map(int, args.head_dims.split(",")):
    for t in map(int, args.seq_lens.split(",")):
      for mode in ("fwd", "fwd_bwd"):
        dense = make_layout("dense", 1.0, t, heads, block)
        cases.append((dict(kind="dense", impl="triton", d=d, t=t, mode=mode,
                           density=1.0), dense))
        for name in ("cudnn", "pallas_mha"):
          cases.append((dict(kind="dense", impl=name, d=d, t=t, mode=mode,
                             density=1.0), None))
    for t in map(int, args.sweep_seq_lens.split(",")):
      for kind in ("random", "causal_window"):
        for density in map(float, args.densities.split(",")):
          for mode in ("fwd", "fwd_bwd"):
            cases.append((dict(kind=kind, impl="triton", d=d, t=t, mode=mode,
                               density=density), (kind, density)))

  for row, layout in cases:
    if time.perf_counter() - start > args.time_budget_s:
      rec.add("benchmarks", dict(row, status="skipped: time budget"))
      continue

    def run(row=row, layout=layout):
      t, d = row["t"], row["d"]
      if row["impl"] != "triton":
        attention = baselines(d)[row["impl"]]
        return bench_case(attention, row["mode"], t, heads, d, reps, 1.0)
      if isinstance(layout, tuple):
        layout = make_layout(layout[0], layout[1], t, heads, block)
      visited = float(layout.density())
      attention = lambda q, k, v: block_sparse_attention(
          q, k, v, layout, implementation="triton")
      result = bench_case(attention, row["mode"], t, heads, d, reps, visited)
      return dict(result, visited_block_fraction=visited,
                  kmax=layout.max_kv_blocks)

    rec.run("benchmarks", row, run)
  print(f"wrote {path}")
  return rec.data


if __name__ == "__main__":
  main()
