"""Image data: sklearn digits (ships with scikit-learn) or a folder.

Every host reads only its own slice of each global batch. The batch of a
step is a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading

import jax
import numpy as np
from PIL import Image
from sklearn import datasets

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, h, w, C] in [0, 1] to [N, size, size, C]."""
  out = []
  for img in images:
    channels = [np.asarray(Image.fromarray(img[..., c].astype(np.float32))
                           .resize((size, size), Image.BILINEAR))
                for c in range(img.shape[-1])]
    out.append(np.stack(channels, -1))
  return np.stack(out).astype(np.float32)


class DigitsDataset:
  """scikit-learn's 1797 8x8 digits, bilinear-upscaled, in [-1, 1].

  Attributes:
    images: f32 [1797, size, size, channels].
    labels: int [1797], the digit of each image.
    num_classes: 10.
  """

  num_classes = 10

  def __init__(self, image_size: int = 32, channels: int = 1):
    digits = datasets.load_digits()
    small = (digits.images / 16.0)[..., None].astype(np.float32)
    images = np.clip(_resize(small, image_size), 0.0, 1.0) * 2.0 - 1.0
    self.images = np.repeat(images, channels, axis=-1)
    self.labels = digits.target

  def __len__(self) -> int:
    return len(self.images)

  def load(self, indices: np.ndarray) -> np.ndarray:
    return self.images[indices]


class FolderDataset:
  """Images of a folder (recursive), resized (bilinear, shorter side) and
  center-cropped to `image_size`, RGB in [-1, 1]; decoded on demand.
  Unlabelled: `labels` is None, `num_classes` 0."""

  labels = None
  num_classes = 0

  def __init__(self, image_dir: str, image_size: int, num_threads: int = 8):
    if not image_dir or not os.path.isdir(image_dir):
      raise ValueError(
          f"data.image_dir must be a folder of images, got {image_dir!r}")
    self.files = sorted(
        os.path.join(root, name) for root, _, names in os.walk(image_dir)
        for name in names if name.lower().endswith(_IMAGE_SUFFIXES))
    if not self.files:
      raise ValueError(f"no images under {image_dir}")
    self.image_size = image_size
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)

  def __len__(self) -> int:
    return len(self.files)

  def _decode(self, path: str) -> np.ndarray:
    with Image.open(path) as img:
      img = img.convert("RGB")
      scale = self.image_size / min(img.size)
      w, h = (max(self.image_size, round(s * scale)) for s in img.size)
      img = img.resize((w, h), Image.BILINEAR)
      left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
      img = img.crop((left, top, left + self.image_size,
                      top + self.image_size))
      return np.asarray(img, np.float32) / 127.5 - 1.0

  def load(self, indices: np.ndarray) -> np.ndarray:
    return np.stack(list(self._pool.map(
        self._decode, [self.files[i] for i in indices])))


def num_classes(source: str) -> int:
  """The number of labels of data.source `source` (0: unlabelled)."""
  return {"digits": DigitsDataset.num_classes,
          "folder": FolderDataset.num_classes}.get(source, 0)


def make_dataset(config):
  """The dataset named by `config.data.source` ("digits" or "folder")."""
  if config.data.source == "digits":
    return DigitsDataset(config.data.image_size, config.model.in_channels)
  if config.data.source == "folder":
    return FolderDataset(config.data.image_dir, config.data.image_size)
  raise ValueError(
      f"data.source must be 'digits' or 'folder', got {config.data.source!r}")


def global_batch_indices(step: int, global_batch: int, num_examples: int,
                         seed: int) -> np.ndarray:
  """Example ids of step `step`: one shuffle per epoch, no repeats."""
  per_epoch = num_examples // global_batch
  if per_epoch < 1:
    raise ValueError(
        f"global batch {global_batch} exceeds the {num_examples} examples")
  epoch, pos = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[pos * global_batch:(pos + 1) * global_batch]


def local_indices(dataset, step: int, global_batch: int, seed: int
                  ) -> np.ndarray:
  """This process's [global_batch / process_count] example ids of a step."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch % count:
    raise ValueError(
        f"global batch {global_batch} is not divisible by {count} processes")
  ids = global_batch_indices(step, global_batch, len(dataset), seed)
  size = global_batch // count
  return ids[index * size:(index + 1) * size]


def local_batch(dataset, step: int, global_batch: int, seed: int
                ) -> np.ndarray:
  """This process's slice [global_batch / process_count, ...] of a step."""
  return dataset.load(local_indices(dataset, step, global_batch, seed))


def prefetch(dataset, first_step: int, global_batch: int, seed: int,
             depth: int = 2):
  """Yields (step, local images, their labels or None) from `first_step`
  on, loaded ahead."""
  buffer: queue.Queue = queue.Queue(maxsize=depth)

  def produce():
    step = first_step
    while True:
      ids = local_indices(dataset, step, global_batch, seed)
      labels = None if dataset.labels is None else dataset.labels[ids]
      buffer.put((step, dataset.load(ids), labels))
      step += 1

  threading.Thread(target=produce, daemon=True).start()
  while True:
    yield buffer.get()
