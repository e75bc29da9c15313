r"""Nearest-neighbour digit check of generated digits (scikit-learn's digits).

  python eval/digit_check.py --samples=workdir/llsa_dit/samples_step600.npz

A sample is recognised as digit y when its nearest real digit (L2 distance
of pixels in [0, 1], at the samples' resolution) has label y and
  * it is near: at most the 95th percentile of the distance from a real
    digit to its nearest other real digit, and
  * it is unambiguous: d(nearest) / d(nearest of any other label) at most
    the 90th percentile of that ratio among real digits.
Both thresholds are fit on 80% of the digits (leave-one-out); the other 20%
are the "held-out real" control. Uniform noise and 50/50 blends of two
different digits (what blurry blobs look like) are the negative controls.
With labels (class-conditional samples), a sample counts only when it is
recognised as the digit it was asked for.

Writes eval/results/digit_check.json (or --out).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np

from train.lib import data

# The bar of the default run (issue 18).
MIN_RECOGNISED, MIN_DISTINCT = 0.6, 9


class Recogniser:
  """Nearest-neighbour digit recogniser with a rejection rule.

  Attributes:
    reference: f32 [M, R*R] the reference digits (80%), pixels in [0, 1].
    reference_labels: int [M].
    held_out, held_out_labels: the other 20% ([N, R, R], [N]).
    max_distance: distance threshold (95th percentile, leave-one-out).
    max_ratio: ambiguity threshold (90th percentile, leave-one-out).
  """

  def __init__(self, image_size: int, seed: int = 0):
    digits = data.DigitsDataset(image_size, channels=1)
    images = (digits.images[..., 0] + 1.0) / 2.0
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(0.8 * len(images))
    ref, held = order[:split], order[split:]
    self.reference = images[ref].reshape(split, -1).astype(np.float64)
    self.reference_labels = digits.labels[ref]
    self.held_out, self.held_out_labels = images[held], digits.labels[held]
    distances = self._distances(self.reference)
    np.fill_diagonal(distances, np.inf)
    _, nearest, ratio = self._nearest(distances)
    self.max_distance = float(np.quantile(nearest, 0.95))
    self.max_ratio = float(np.quantile(ratio, 0.9))

  def _distances(self, flat: np.ndarray) -> np.ndarray:
    """[N, M] L2 distances of flat [N, R*R] images to the reference."""
    ref = self.reference
    squared = ((flat**2).sum(1)[:, None] + (ref**2).sum(1)[None]
               - 2.0 * flat @ ref.T)
    return np.sqrt(np.maximum(squared, 0.0))

  def _nearest(self, distances: np.ndarray):
    """Label, distance and own/other-label ratio of each nearest digit."""
    labels = self.reference_labels[distances.argmin(1)]
    nearest = distances.min(1)
    other = np.where(self.reference_labels[None] == labels[:, None], np.inf,
                     distances).min(1)
    return labels, nearest, nearest / other

  def recognise(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recognises images.

    Args:
      images: [N, R, R] or [N, R, R, 1] grey images in [0, 1], R the
        recogniser's image size.

    Returns:
      labels int [N] (the nearest digit's) and recognised bool [N].
    """
    images = np.asarray(images, np.float64)
    if images.ndim == 4 and images.shape[-1] == 1:
      images = images[..., 0]
    side = int(np.sqrt(self.reference.shape[1]))
    if images.ndim != 3 or images.shape[1:] != (side, side):
      raise ValueError(
          f"images must be [N, {side}, {side}(, 1)], got {images.shape}")
    labels, nearest, ratio = self._nearest(
        self._distances(images.reshape(len(images), -1)))
    return labels, (nearest <= self.max_distance) & (ratio <= self.max_ratio)

  def score(self, images: np.ndarray,
            labels: np.ndarray | None = None) -> dict:
    """Fraction recognised (as `labels` if given) and distinct digits."""
    predicted, recognised = self.recognise(images)
    if labels is not None:
      recognised &= predicted == np.asarray(labels)
    return {"num_images": len(predicted),
            "recognised": float(recognised.mean()),
            "distinct_digits": len(set(predicted[recognised].tolist()))}


def controls(recogniser: Recogniser, seed: int = 0) -> dict:
  """Scores of held-out real digits (with labels), noise and blends."""
  rng = np.random.default_rng(seed)
  held, labels = recogniser.held_out, recogniser.held_out_labels
  a, b = rng.integers(0, len(held), (2, 2 * len(held)))
  different = labels[a] != labels[b]
  a, b = a[different][:len(held)], b[different][:len(held)]
  return {
      "held_out_real": recogniser.score(held, labels),
      "uniform_noise": recogniser.score(rng.uniform(size=held.shape)),
      "blends_of_two_digits": recogniser.score((held[a] + held[b]) / 2.0),
  }


def check_samples(path: str, recognisers: dict | None = None) -> dict:
  """Scores one samples_step<N>.npz (images in [0, 1], labels, step)."""
  with np.load(path) as f:
    images, labels = f["images"], f["labels"]
  recognisers = {} if recognisers is None else recognisers
  size = images.shape[1]
  if size not in recognisers:
    recognisers[size] = Recogniser(size)
  conditional = bool((labels >= 0).all())
  result = recognisers[size].score(images, labels if conditional else None)
  return {"samples": path, "class_conditional": conditional, **result,
          "passes": (result["recognised"] >= MIN_RECOGNISED
                     and result["distinct_digits"] >= MIN_DISTINCT)}


def main(argv):
  del argv
  if not _SAMPLES.value:
    raise app.UsageError("--samples is required")
  recognisers = {}
  runs = [check_samples(path, recognisers) for path in _SAMPLES.value]
  results = {"bar": {"min_recognised": MIN_RECOGNISED,
                     "min_distinct_digits": MIN_DISTINCT},
             "runs": runs,
             "controls": {size: controls(r) for size, r in
                          recognisers.items()},
             "thresholds": {size: {"max_distance": r.max_distance,
                                   "max_ratio": r.max_ratio}
                            for size, r in recognisers.items()}}
  print(json.dumps(results, indent=2))
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  # Flags only when run as a script: train/llsa_dit.py imports this module
  # next to eval/frechet_digits.py, which has an --out of its own.
  _SAMPLES = flags.DEFINE_list(
      "samples", None,
      "samples_step<N>.npz files written by train/llsa_dit.py.")
  _OUT = flags.DEFINE_string(
      "out", os.path.join("eval", "results", "digit_check.json"),
      "Where the JSON results go.")
  app.run(main)
