r"""LLSA vs dense: attention forward and one DiT training step.

  python eval/bench_llsa.py            # 1024 and 16384 tokens on this device

Attention: q, k, v [1, N, H, D] after the DiT's norms; LLSA (selection +
block-sparse op, the op's default backend) vs jax.nn.dot_product_attention.
DiT step: value_and_grad + AdamW of a small pixel DiT on N = R^2 pixels.
Times are medians of `--reps` runs after a compile run; ratios are
dense / llsa (> 1: LLSA faster). Writes eval/results/bench_llsa_<device>.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eval import host
from jsparse.methods import llsa
from jsparse.models import dit

_TOKENS = flags.DEFINE_list("tokens", ["1024", "16384"],
                            "Sequence lengths (perfect squares).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed runs per case.")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "Head dim.")
_WIDTH = flags.DEFINE_integer("width", 64, "DiT width.")
_DEPTH = flags.DEFINE_integer("depth", 2, "DiT depth.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default under "
                           "eval/results/).")


def _time(fn, *args, reps: int) -> tuple[float, float]:
  """(compile + first run, median of `reps` runs) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def _method_config(n: int) -> llsa.LLSAConfig:
  return llsa.LLSAConfig(num_levels=llsa.LLSAConfig().levels(n), topk=8)


def bench_attention(n: int, reps: int) -> dict:
  """Forward time of one attention call, LLSA vs dense."""
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  shape = (1, n, _HEADS.value, _HEAD_DIM.value)
  q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
  method = llsa.LLSAMethod(_method_config(n))
  llsa_fn = jax.jit(lambda q, k, v: method(q, k, v))
  plan_fn = jax.jit(lambda q, k, v: method.plan(q, k, v).layout.kv_idx)
  dense_fn = jax.jit(jax.nn.dot_product_attention)
  _, t_llsa = _time(llsa_fn, q, k, v, reps=reps)
  _, t_plan = _time(plan_fn, q, k, v, reps=reps)
  _, t_dense = _time(dense_fn, q, k, v, reps=reps)
  return {"tokens": n, "shape_qkv": list(shape),
          "llsa_levels": method.config.levels(n),
          "llsa_fwd_s": t_llsa, "llsa_selection_s": t_plan,
          "dense_fwd_s": t_dense, "speedup_dense_over_llsa": t_dense / t_llsa}


def bench_dit_step(n: int, reps: int) -> dict:
  """One training step (fwd + bwd + AdamW) of a small DiT, batch 1."""
  side = int(round(n**0.5))
  out = {"tokens": n, "image_size": side, "width": _WIDTH.value,
         "depth": _DEPTH.value, "heads": _HEADS.value}
  x = jax.random.normal(jax.random.key(1), (1, side, side, 3))
  t = jnp.array([500.0])
  for attention in ("llsa", "dense"):
    config = dit.DiTConfig(
        image_size=side, hidden_size=_WIDTH.value, depth=_DEPTH.value,
        num_heads=_HEADS.value, attention=attention,
        method_config=_method_config(n) if attention == "llsa" else None)
    model = dit.DiT(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, t):
      loss, grads = nnx.value_and_grad(
          lambda m: jnp.mean(jnp.square(m(x, t) - x)))(model)
      optimizer.update(model, grads)
      return loss

    first, median = _time(step, model, optimizer, x, t, reps=reps)
    out[f"{attention}_step_s"] = median
    out[f"{attention}_compile_and_first_s"] = first
  out["speedup_dense_over_llsa"] = out["dense_step_s"] / out["llsa_step_s"]
  return out


def main(argv):
  del argv
  device = jax.devices()[0]
  results = {
      "device": f"{device.platform}:{device.device_kind}",
      "num_devices": jax.device_count(),
      "host": host.describe(),
      "load_average_1m_at_start": os.getloadavg()[0],
      "jax": jax.__version__,
      "dtype": "float32",
      "attention": [], "dit_step": [],
  }
  for n in (int(s) for s in _TOKENS.value):
    row = bench_attention(n, _REPS.value)
    print(json.dumps(row))
    results["attention"].append(row)
    row = bench_dit_step(n, _REPS.value)
    print(json.dumps(row))
    results["dit_step"].append(row)
  results["load_average_1m_at_end"] = os.getloadavg()[0]
  out = _OUT.value or os.path.join(
      "eval", "results", f"bench_llsa_{device.platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
