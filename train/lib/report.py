"""Metrics to a JSONL file, log lines, a progress bar, and image grids."""

from __future__ import annotations

from collections.abc import Sequence
import json
import logging as py_logging
import os
import time

from absl import logging
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import tqdm


def log(message: str, *args) -> None:
  """logging.info that keeps the progress bar intact (no torn lines)."""
  with tqdm.tqdm.external_write_mode():
    logging.info(message, *args)


# Log lines name log()'s caller, not log().
logging.ABSLLogger.register_frame_to_skip(__file__, log.__name__)


def format_metrics(metrics: dict[str, float]) -> str:
  return ", ".join(f"{k}={v:.5g}" for k, v in metrics.items())


class MetricWriter:
  """Writes scalar metrics (process 0 only) to metrics.jsonl.

  Each record is one line {"step": N, name: value, ...}.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, step: int, metrics: dict[str, float], *,
            echo: bool = True) -> None:
    """Appends a record; `echo` also logs it (evaluations)."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if echo:
      log("step %d: %s", step, format_metrics(metrics))
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def truncate(self, step: int) -> None:
    """Drops the records after `step` (written after its checkpoint) and a
    line cut short by a kill."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = [line for line in lines
            if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
      with open(self.path, "w") as f:
        f.writelines(kept)
      logging.info("metrics.jsonl: dropped %d records after step %d",
                   len(lines) - len(kept), step)

  def set_aside(self) -> None:
    """Renames a non-empty metrics.jsonl left from an earlier run."""
    if (not self.enabled or not os.path.exists(self.path)
        or not os.path.getsize(self.path)):
      return
    aside = self.path.replace(
        ".jsonl", time.strftime(".before-%Y%m%d-%H%M%S.jsonl"))
    os.rename(self.path, aside)
    logging.warning(
        "no checkpoint to resume from, but %s holds metrics of an earlier "
        "run: moved it to %s and starting a fresh one", self.path, aside)


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
  """step -> metrics from metrics.jsonl (the last record of a step wins)."""
  records = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      records[record.pop("step")] = record
  return records


class Progress:
  """A tqdm bar on process 0 showing steps/s and the loss."""

  def __init__(self, first_step: int, total: int):
    # rate_noinv: always steps/s (tqdm's default flips to s/step below 1).
    self.bar = tqdm.tqdm(initial=first_step, total=total, unit="step",
                         dynamic_ncols=True, mininterval=1.0,
                         bar_format=("{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                     "[{elapsed}<{remaining}, "
                                     "{rate_noinv_fmt}{postfix}]"),
                         disable=jax.process_index() != 0)
    self.last_step, self.last_time = first_step, time.perf_counter()

  def update(self, step: int, loss: float) -> float:
    """Advances to `step` (finished steps); returns steps/s since last."""
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    self.bar.update(step - self.last_step)
    self.last_step, self.last_time = step, now
    return rate

  def close(self) -> None:
    self.bar.close()


def save_image_grid(images: np.ndarray, path: str, columns: int = 8,
                    upscale: int = 1,
                    row_labels: Sequence[str] | None = None) -> None:
  """Saves [N, R, R, C] images in [0, 1] as one PNG grid, row-major.

  Args:
    images: [N, R, R, C], C in {1, 3}.
    path: the PNG file.
    columns: images per row.
    upscale: nearest-neighbour magnification.
    row_labels: text written left of each row (None: no label column).
  """
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
  if row_labels is not None:
    img = _with_row_labels(img, row_labels, (r + 2) * upscale)
  img.save(path)


def _with_row_labels(grid: Image.Image, labels: Sequence[str],
                     row_height: int) -> Image.Image:
  """`grid` with a white column on its left holding one label per row."""
  font = ImageFont.load_default(size=max(8, row_height // 2))
  width = max(int(font.getlength(text)) for text in labels) + row_height // 2
  out = Image.new(grid.mode, (grid.width + width, grid.height), "white")
  out.paste(grid, (width, 0))
  draw = ImageDraw.Draw(out)
  for i, text in enumerate(labels):
    draw.text((width // 2, (i + 0.5) * row_height), text, fill="black",
              font=font, anchor="mm")
  return out


def quiet_orbax(record: py_logging.LogRecord) -> bool:
  """Log filter: orbax's INFO chatter off, its warnings kept."""
  return (record.levelno >= py_logging.WARNING
          or "orbax" not in record.pathname)


def write_results(workdir: str, results: dict) -> str:
  """Writes the final evaluation to `workdir`/results.json; returns its path."""
  path = os.path.join(workdir, "results.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  return path
