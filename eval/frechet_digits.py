r"""Frechet distance of DiT digit samples, LLSA vs dense, on digit features.

A small MLP digit classifier is trained here on scikit-learn's digits (at the
DiT's resolution); the Frechet distance between its penultimate features on
real digits and on EMA samples of each trained run plays the role of FID.

  python train/llsa_dit.py --workdir=workdir/fd_llsa --config.num_steps=200
  python train/llsa_dit.py --workdir=workdir/fd_dense --config.num_steps=200 \
      --config.attn.method=dense
  python eval/frechet_digits.py --workdirs=workdir/fd_llsa,workdir/fd_dense

Writes eval/results/frechet_digits.json.
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
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from scipy import linalg

from train import llsa_dit
from train.lib import data
from train.lib import parallel

_WORKDIRS = flags.DEFINE_list("workdirs", None,
                              "Trained llsa_dit work dirs to compare.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 256,
                                    "EMA samples per run.")
_OUT = flags.DEFINE_string(
    "out", os.path.join("eval", "results", "frechet_digits.json"),
    "Where the JSON results go.")


class Classifier(nnx.Module):
  """MLP on [0, 1] grey images; `features` is the 128-d penultimate layer."""

  def __init__(self, num_pixels: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(num_pixels, 256, rngs=rngs)
    self.feature = nnx.Linear(256, 128, rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """images [N, R, R, 1] in [0, 1] -> [N, 128]."""
    x = images.reshape(images.shape[0], -1)
    return jax.nn.relu(self.feature(jax.nn.relu(self.hidden(x))))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.head(self.features(images))


def train_classifier(images: np.ndarray, labels: np.ndarray,
                     steps: int = 400) -> tuple[Classifier, float]:
  """Full-batch Adam on 80% of the digits; returns it and held-out accuracy."""
  order = np.random.default_rng(0).permutation(len(images))
  split = int(0.8 * len(images))
  train, test = order[:split], order[split:]
  model = Classifier(int(np.prod(images.shape[1:])), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
        m(x), y).mean())(model)
    optimizer.update(model, grads)

  x, y = jnp.asarray(images[train]), jnp.asarray(labels[train])
  for _ in range(steps):
    step(model, optimizer, x, y)
  predictions = nnx.jit(lambda m, x: m(x).argmax(-1))(
      model, jnp.asarray(images[test]))
  return model, float(np.mean(np.asarray(predictions) == labels[test]))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to features a, b [N, F]."""
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a = np.cov(a, rowvar=False)
  cov_b = np.cov(b, rowvar=False)
  covmean = linalg.sqrtm(cov_a @ cov_b).real
  return float(np.sum((mu_a - mu_b)**2)
               + np.trace(cov_a + cov_b - 2.0 * covmean))


def load_run(workdir: str):
  """(config, EMA model, step) of the latest checkpoint of a run."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  state = llsa_dit.create_train_state(config,
                                      parallel.make_mesh(config.mesh.fsdp))
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"no checkpoint in {workdir}")
  llsa_dit.restore_checkpoint(manager, step, state, names=("ema",))
  return config, state.ema, step


def sample(config, model, num_samples: int, chunk: int = 32) -> np.ndarray:
  """num_samples EMA samples in [0, 1], drawn `chunk` at a time."""
  out = []
  for i in range(-(-num_samples // chunk)):
    config.sample.seed = 1000 + i
    out.append(llsa_dit.sample_images(model, config, chunk))
  return np.concatenate(out)[:num_samples]


def main(argv):
  del argv
  if not _WORKDIRS.value:
    raise app.UsageError("--workdirs is required")
  results = {"device": str(jax.devices()[0].device_kind),
             "jax": jax.__version__, "runs": []}
  classifiers = {}
  for workdir in _WORKDIRS.value:
    config, ema, step = load_run(workdir)
    size = config.data.image_size
    digits = data.DigitsDataset(size, channels=1)
    real = (digits.images + 1.0) / 2.0
    if size not in classifiers:
      classifiers[size] = train_classifier(real, digits.labels)
    classifier, accuracy = classifiers[size]
    fake = sample(config, ema, _NUM_SAMPLES.value)[..., :1]
    feats = nnx.jit(lambda m, x: m.features(x))
    fd = frechet_distance(np.asarray(feats(classifier, jnp.asarray(real))),
                          np.asarray(feats(classifier, jnp.asarray(fake))))
    run = {"workdir": workdir, "attention": config.attn.method,
           "step": step, "image_size": size, "num_samples": len(fake),
           "classifier_accuracy": accuracy, "frechet_distance": fd}
    print(json.dumps(run))
    results["runs"].append(run)
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
