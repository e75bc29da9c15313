"""TPU section of eval/bench_kernels.py: Mosaic TPU kernels vs splash.

  python eval/bench_kernels.py --tpu              # one TPU chip, < 8 min
  python eval/bench_kernels.py --tpu --dry_run    # any host: tiny shapes,
                                                  # interpret mode

Side by side in one run, bf16 by default:

1. Dense mode. `block_sparse_attention` (mosaic_tpu) with every block
   listed, and with a causal layout, against jax's splash attention
   (FullMask / CausalMask) and XLA's `jax.nn.dot_product_attention`.
2. Density sweep. Random and causal-window block layouts at each density:
   the op against splash given the same mask (a NumpyMask of the layout's
   elements, so both skip the same blocks) and against dense XLA.

Both kernels use the layout's block (`--block`, 512 by default here) as
their DMA granularity and the op's default compute tile (`MosaicTpuConfig`:
512 keys for head dims up to 128, clamped to the block). Every case records
max |op - splash| of the outputs, so a fast wrong kernel shows. Cases run in order until
`--time_budget_s`; the rest are listed in `skipped`. Timings are medians of
`--reps` calls after a compiling one, fwd and fwd+bwd. The JSON (device,
versions, shapes, times, ratios) goes to
eval/results/bench_kernels_tpu_T<seq_len>.json unless --out is given.

--dry_run runs the same cases on a small problem with both kernels in
interpret mode: it checks the script (and the agreement of the two
kernels), not speed.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import time
from typing import Callable

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import jaxlib
import numpy as np

from eval import bench_kernels
from eval import host
from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import config as config_lib

# The small problem of --dry_run (interpret mode on any host).
DRY_RUN_SHAPES = dict(seq_len=1024, num_q_heads=2, num_kv_heads=2,
                      head_dim=64, block=256)


def splash_kernel(mask: splash.Mask, num_heads: int, block: int,
                  block_compute: int, interpret: bool) -> Callable:
  """Splash attention on [B, T, H, D] inputs with `mask` [H, T, S] shared.

  Splash takes head-major [H, T, D] per sample and does not scale q; the
  caller scales q by 1/sqrt(D) as the op does.
  """
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block_compute,
      block_q_dkv=block, block_kv_dkv=block,
      block_kv_dkv_compute=block_compute, block_q_dq=block,
      block_kv_dq=block)
  kernel = splash.make_splash_mha_single_device(
      splash.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
      interpret=interpret)

  def attention(q, k, v):
    scale = q.shape[-1] ** -0.5
    head_major = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(kernel)(head_major(q * jnp.asarray(scale, q.dtype)),
                           head_major(k), head_major(v))
    return head_major(out)

  return attention


def op_kernel(layout: BlockLayout, interpret: bool,
              causal: bool = False) -> Callable:
  """block_sparse_attention on the Mosaic TPU backend."""
  return lambda q, k, v: block_sparse_attention(
      q, k, v, layout, causal=causal, implementation="mosaic_tpu",
      interpret=interpret)


def cases(args) -> list[dict]:
  """The benchmark cases in run order: section, layout kind, density."""
  out = [dict(section="dense", layout_kind="full", density=1.0),
         dict(section="dense", layout_kind="causal", density=0.5)]
  for kind in args.layouts.split(","):
    for density in map(float, args.densities.split(",")):
      out.append(dict(section="density_sweep", layout_kind=kind,
                      density=density))
  return out


def build_case(case: dict, args) -> tuple[BlockLayout, splash.Mask, bool]:
  """(layout, the same mask for splash, causal) of one case.

  Built only when the case runs: a sweep mask is a host [T, S] array.
  """
  t, block = args.seq_len, args.block
  if case["layout_kind"] == "full":
    return (BlockLayout.dense(t, t, block_q=block, block_kv=block),
            splash.FullMask((t, t)), False)
  if case["layout_kind"] == "causal":
    return (BlockLayout.causal(t, block_q=block, block_kv=block),
            splash.CausalMask((t, t)), True)
  layout = bench_kernels.make_layout(case["layout_kind"], case["density"], t,
                                     block)
  mask = np.asarray(layout.to_dense_mask(t, t))[0, 0]
  return layout, splash.NumpyMask(mask), False


def main(args) -> dict:
  """Runs the TPU section; returns (and writes) the JSON result."""
  if args.dry_run:
    for name, value in DRY_RUN_SHAPES.items():
      setattr(args, name, value)
  interpret = args.dry_run
  device = jax.devices()[0]
  if device.platform != "tpu" and not args.dry_run:
    raise SystemExit(
        f"--tpu needs a TPU host (found {device.platform}); --dry_run "
        "checks the script anywhere in interpret mode")
  dtype = bench_kernels.DTYPES[args.dtype]
  b, t = args.batch, args.seq_len
  if args.num_q_heads != args.num_kv_heads:
    raise SystemExit("the TPU section compares MHA only: --num_kv_heads "
                     "must equal --num_q_heads")
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (b, t, args.num_q_heads, args.head_dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  cot = jax.random.normal(keys[3], shape, jnp.float32)
  compute = config_lib.MosaicTpuConfig.get_default().kv_compute_tile(
      args.block, args.head_dim)
  print(f"device={device.device_kind} jax={jax.__version__} B={b} T={t} "
        f"H={args.num_q_heads} D={args.head_dim} block={args.block} "
        f"compute={compute} dtype={args.dtype}"
        f"{' (dry run, interpret mode)' if interpret else ''}")

  start = time.perf_counter()
  rows, skipped = [], []
  modes = args.modes.split(",")
  for case in cases(args):
    label = f"{case['section']}/{case['layout_kind']}@{case['density']}"
    if time.perf_counter() - start > args.time_budget_s:
      skipped.append(label)
      continue
    layout, mask, causal = build_case(case, args)
    kernels = {
        "mosaic_tpu": op_kernel(layout, interpret, causal),
        "splash": splash_kernel(mask, args.num_q_heads, args.block, compute,
                                interpret),
        "xla_dense": lambda q, k, v, c=causal: (
            jax.nn.dot_product_attention(q, k, v, is_causal=c)),
    }
    outs = {name: jax.jit(fn)(q, k, v) for name, fn in kernels.items()
            if name != "xla_dense"}
    diff = float(jnp.max(jnp.abs(outs["mosaic_tpu"].astype(jnp.float32)
                                 - outs["splash"].astype(jnp.float32))))
    for mode in modes:
      times = {name: bench_kernels.timed(bench_kernels.build(fn, mode), q, k,
                                         v, cot, reps=args.reps)
               for name, fn in kernels.items()}
      row = dict(section=case["section"], layout=case["layout_kind"],
                 density=case["density"],
                 actual_density=float(layout.density()),
                 kmax=layout.max_kv_blocks, mode=mode,
                 max_abs_diff_vs_splash=diff,
                 **{f"{name}_s": s for name, s in times.items()},
                 op_over_splash=times["mosaic_tpu"] / times["splash"],
                 op_over_xla_dense=times["mosaic_tpu"] / times["xla_dense"])
      rows.append(row)
      print(f"{label:>30} {mode:>7}  op {times['mosaic_tpu'] * 1e3:8.2f} ms"
            f"  splash {times['splash'] * 1e3:8.2f} ms  xla "
            f"{times['xla_dense'] * 1e3:8.2f} ms  op/splash "
            f"{row['op_over_splash']:5.2f}  |op-splash| {diff:.2e}",
            flush=True)

  result = dict(
      benchmark="bench_kernels_tpu", dry_run=args.dry_run,
      interpret=interpret,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      device=device.device_kind, platform=device.platform,
      jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
      python=platform.python_version(), host=host.describe(),
      shapes=dict(batch=b, seq_len=t, num_heads=args.num_q_heads,
                  head_dim=args.head_dim, block=args.block,
                  block_compute=compute, dtype=args.dtype),
      reps=args.reps, time_budget_s=args.time_budget_s,
      elapsed_s=time.perf_counter() - start, results=rows, skipped=skipped)
  out = pathlib.Path(args.out or f"eval/results/bench_kernels_tpu_T{t}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"\nwrote {out}")
  return result
