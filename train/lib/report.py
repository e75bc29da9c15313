"""Metrics to stdout and a JSONL file, a progress bar, and image grids."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np
from PIL import Image
import tqdm


class MetricWriter:
  """Writes scalar metrics (process 0 only) to stdout and metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = ", ".join(f"{k}={v:.5g}" for k, v in record.items()
                     if k != "step")
    tqdm.tqdm.write(f"step {step}: {line}", file=sys.stdout)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
  """step -> metrics from metrics.jsonl (the last record of a step wins)."""
  records = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      records[record.pop("step")] = record
  return records


class Progress:
  """A tqdm bar on process 0 showing loss and steps/s."""

  def __init__(self, first_step: int, total: int):
    self.bar = tqdm.tqdm(initial=first_step, total=total, unit="step",
                         dynamic_ncols=True, mininterval=1.0,
                         disable=jax.process_index() != 0)
    self.last_step, self.last_time = first_step, time.perf_counter()

  def update(self, step: int, loss: float) -> float:
    """Advances to `step` (finished steps); returns steps/s since last."""
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.bar.update(step - self.last_step)
    self.bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
    self.last_step, self.last_time = step, now
    return rate

  def close(self) -> None:
    self.bar.close()


def save_image_grid(images: np.ndarray, path: str, columns: int = 8,
                    upscale: int = 1) -> None:
  """Saves [N, R, R, C] images in [0, 1] as one PNG grid."""
  images = np.asarray(images, np.float32)
  n, r, _, c = images.shape
  columns = min(columns, n)
  rows = -(-n // columns)
  grid = np.ones((rows * (r + 2), columns * (r + 2), c), np.float32)
  for i, img in enumerate(images):
    y, x = divmod(i, columns)
    grid[y * (r + 2) + 1:y * (r + 2) + 1 + r,
         x * (r + 2) + 1:x * (r + 2) + 1 + r] = img
  grid = (grid * 255).round().astype(np.uint8)
  grid = grid[..., 0] if c == 1 else grid
  img = Image.fromarray(grid)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale),
                     Image.NEAREST)
  img.save(path)


def quiet_orbax(record: logging.LogRecord) -> bool:
  """Log filter: orbax's INFO chatter off, its warnings kept."""
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def prepare_workdir(workdir: str, config) -> str:
  """Makes `workdir` (absolute) and writes the run's config.json there."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  return workdir


def write_results(workdir: str, results: dict) -> None:
  """Writes the final evaluation to `workdir`/results.json."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
