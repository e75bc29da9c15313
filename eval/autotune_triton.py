"""Times TritonConfig candidates per shape bucket on a GPU; writes the table.

For each bucket (dtype x head dim, `TritonConfig.bucket`) it times the forward
candidates on a dense and a 25%-density random layout (B=1, H=16, T=8192 by
default) and keeps the fastest; then, with that forward, the dQ tiles, the
dK/dV tiles and the backward launch (warps, stages) one after the other. A
candidate that fails is logged with its error and never chosen; a bucket
whose candidates all fail is not written. The table is JSON {device_kind:
{bucket: TritonConfig fields}}, merged into --out; with --install it also
goes to `config.TRITON_TUNED_PATH`, which `TritonConfig.heuristic` reads.

  python eval/autotune_triton.py                # on a GPU
  python eval/autotune_triton.py --dry_run      # list candidates, time nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse_attention import config as config_lib
from pallas_kernels.block_sparse_attention import pallas_triton
from pallas_kernels.block_sparse_attention import tile_math

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}
# (block_q, block_kv, num_warps, num_stages)
FWD_CANDIDATES = ((128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3),
                  (128, 128, 8, 2), (128, 64, 4, 2), (128, 64, 8, 2),
                  (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2),
                  (64, 64, 4, 3), (64, 32, 4, 3))
# The three backward stages, tuned one after the other with `bwd_config`.
# TritonConfig has one (warps, stages) for both backward kernels, so the
# launch is a stage of its own after the dQ and dK/dV tiles.
DQ_CANDIDATES = ((64, 64), (128, 64), (128, 128), (64, 128), (32, 64),
                 (64, 32))  # (dq_block_q, dq_block_kv)
DKV_CANDIDATES = ((64, 64), (128, 64), (128, 128), (64, 128), (64, 32),
                  (32, 64))  # (dkv_block_kv, dkv_block_q)
BWD_LAUNCH_CANDIDATES = ((4, 2), (8, 2), (4, 3), (8, 3), (8, 4), (8, 1),
                         (4, 1))  # (bwd_num_warps, bwd_num_stages)
BWD_STAGES = (
    ("dq", DQ_CANDIDATES, ("dq_block_q", "dq_block_kv")),
    ("dkv", DKV_CANDIDATES, ("dkv_block_kv", "dkv_block_q")),
    ("bwd_launch", BWD_LAUNCH_CANDIDATES, ("bwd_num_warps",
                                           "bwd_num_stages")),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq_len", type=int, default=8192)
  p.add_argument("--num_heads", type=int, default=16)
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--dtypes", default="bf16")
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default=None,
                 help="table JSON; default $OUT/triton_tuned.json, else "
                 "eval/results/triton_tuned.json")
  p.add_argument("--install", action="store_true",
                 help="also write the table to config.TRITON_TUNED_PATH")
  p.add_argument("--dry_run", action="store_true",
                 help="print the buckets and candidates, time nothing")
  return p.parse_args(argv)


def fwd_config(base, cand) -> config_lib.TritonConfig:
  block_q, block_kv, warps, stages = cand
  return dataclasses.replace(base, block_q=block_q, block_kv=block_kv,
                             num_warps=warps, num_stages=stages)


def bwd_config(base, fields, cand) -> config_lib.TritonConfig:
  return dataclasses.replace(base, **dict(zip(fields, cand)))


def select(candidates, score, log: list):
  """The candidate of least score(candidate), or None if every one fails.

  Args:
    candidates: configs to try.
    score: config -> seconds; may raise (a candidate that fails to lower,
      compile or run).
    log: gets one dict per candidate, with `seconds` or `error`.
  """
  best, best_seconds = None, math.inf
  for cand in candidates:
    entry = dict(config=dataclasses.asdict(cand))
    try:
      entry["seconds"] = seconds = float(score(cand))
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {e}"[:500]
      print(f"  failed {cand}: {entry['error']}", flush=True)
      log.append(entry)
      continue
    log.append(entry)
    print(f"  {seconds * 1e3:8.2f} ms {cand}", flush=True)
    if seconds < best_seconds:
      best, best_seconds = cand, seconds
  return best


def layouts(t: int, heads: int, block: int):
  nb = t // block
  rng = np.random.default_rng(0)
  top = np.argsort(-rng.random((1, heads, nb, nb)), axis=-1)[..., :nb // 4]
  mask = np.zeros((1, heads, nb, nb), bool)
  np.put_along_axis(mask, top, True, axis=-1)
  # The backward's dK/dV lists come from the transposed layout.
  return (BlockLayout.dense(t, t, block_q=block,
                            block_kv=block).with_kv_major(),
          BlockLayout.from_block_mask(mask, block, block,
                                      full_block_mask=mask).with_kv_major())


def time_config(cfg, layout, q, k, v, dout, spec, *, with_bwd: bool,
                reps: int) -> float:
  def step(q, k, v, dout):
    out, lse = pallas_triton.forward(q, k, v, None, None, None, layout, spec,
                                     config=cfg)
    if not with_bwd:
      return out
    dlse = jnp.zeros_like(lse)
    return pallas_triton.backward(q, k, v, None, None, None, layout, spec,
                                  out, lse, dout, dlse, config=cfg)

  fn = jax.jit(step)
  jax.block_until_ready(fn(q, k, v, dout))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(q, k, v, dout))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def tune_bucket(d: int, dtype, args, timer=time_config):
  """Best config fields of one bucket (None if all fail), and every timing.

  `timer(cfg, layout, q, k, v, dout, spec, with_bwd=, reps=) -> seconds` is
  `time_config` on a GPU; tests pass a fake one.
  """
  t, heads = args.seq_len, args.num_heads
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (1, t, heads, d), dtype)
                   for key in keys)
  spec = tile_math.MaskSpec(q_len=t, kv_len=t, kv_len_padded=t, band=None,
                            has_segments=False, has_tiles=False,
                            sm_scale=1.0 / math.sqrt(d), softcap=None)
  cases = layouts(t, heads, args.block)
  timings = []

  def total(with_bwd):
    return lambda cfg: sum(timer(cfg, layout, q, k, v, dout, spec,
                                 with_bwd=with_bwd, reps=args.reps)
                           for layout in cases)

  base = config_lib.TritonConfig.heuristic(d, dtype)
  log = []
  best = select([fwd_config(base, c) for c in FWD_CANDIDATES], total(False),
                log)
  timings.append(dict(stage="fwd", candidates=log))
  for stage, candidates, fields in BWD_STAGES:
    if best is None:
      break
    log = []
    best = select([bwd_config(best, fields, c) for c in candidates],
                  total(True), log)
    timings.append(dict(stage=stage, candidates=log))
  return (None if best is None else dataclasses.asdict(best)), timings


def main(argv=None):
  args = parse_args(argv)
  buckets = [(d, DTYPES[name]) for name in args.dtypes.split(",")
             for d in map(int, args.head_dims.split(","))]
  if args.dry_run:
    for d, dtype in buckets:
      print(config_lib.TritonConfig.bucket(d, dtype))
    print(f"forward candidates {FWD_CANDIDATES}")
    for stage, candidates, fields in BWD_STAGES:
      print(f"{stage} candidates {fields}: {candidates}")
    return None
  device_kind = jax.devices()[0].device_kind
  out_dir = os.environ.get("OUT")
  path = pathlib.Path(args.out or (
      pathlib.Path(out_dir) / "triton_tuned.json" if out_dir else
      pathlib.Path("eval/results/triton_tuned.json")))
  table = json.loads(path.read_text()) if path.exists() else {}
  log = []
  for d, dtype in buckets:
    bucket = config_lib.TritonConfig.bucket(d, dtype)
    print(f"{device_kind} {bucket}", flush=True)
    best, timings = tune_bucket(d, dtype, args)
    if best is None:
      print(f"  every candidate of {bucket} failed; not written", flush=True)
    else:
      table.setdefault(device_kind, {})[bucket] = best
    log.append(dict(bucket=bucket, best=best, timings=timings))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    path.with_name(path.stem + "_log.json").write_text(
        json.dumps(dict(device=device_kind, jax=jax.__version__,
                        args=vars(args), log=log), indent=2) + "\n")
  if args.install:
    config_lib.TRITON_TUNED_PATH.write_text(path.read_text())
  print(f"wrote {path}")
  return table


if __name__ == "__main__":
  main()
