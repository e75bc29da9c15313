"""train/llsa_dit.py end to end: samples, 2 processes, kill + resume.

Each run is a subprocess of `python train/llsa_dit.py` on a test-sized
variant of the default config (16x16 digits, 256 pixel tokens, LLSA-l1).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from train.lib import report

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
TINY = [
    "--config.data.image_size=16", "--config.model.hidden_size=32",
    "--config.model.depth=1", "--config.model.num_heads=2",
    "--config.attn.options.topk=4", "--config.batch_size=4",
    "--config.log_every=1", "--config.checkpoint_every=2",
    "--config.sample.num_images=10", "--config.sample.steps=2",
]


_ENV = dict(os.environ, JAX_PLATFORMS="cpu",
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
_ENV.pop("XLA_FLAGS", None)


def _launch(workdir, *extra, num_steps=STEPS):
  """Starts a run; runs share a JAX compile cache (same programs)."""
  env = dict(_ENV, JAX_COMPILATION_CACHE_DIR=str(
      pathlib.Path(workdir).parent / "jax_cache"))
  args = [sys.executable, str(ROOT / "train" / "llsa_dit.py"),
          f"--workdir={workdir}", f"--config.num_steps={num_steps}", *TINY,
          *extra]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300, status=0):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == status, out[-4000:]
  return out


def _losses(workdir):
  return {step: m["train/loss"]
          for step, m in report.read_metrics(str(workdir)).items()}


def _checkpoints(workdir):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit())


def _records(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_records(proc, workdir, count, timeout=300):
  """Waits until `proc` made metrics.jsonl hold `count` records."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    if _records(workdir) >= count:
      return
    time.sleep(0.2)
  raise TimeoutError(f"{count} metric records not reached")


def _wait_for_checkpoint_after(proc, workdir, step, timeout=300):
  """Waits until `proc` saved a checkpoint after `step`."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    if _checkpoints(workdir) and _checkpoints(workdir)[-1] > step:
      return
    time.sleep(0.2)
  raise TimeoutError(f"no checkpoint after {step}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted single-process run of the default config's variant."""
  workdir = tmp_path_factory.mktemp("reference")
  _finish(_launch(workdir, "--config.sample.every=4"))
  return workdir


def test_default_config_writes_samples_and_metrics(reference):
  losses = _losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(np.isfinite(list(losses.values())))
  assert _checkpoints(reference)[-1] == STEPS
  for step in (4, STEPS):  # sample.every=4, and the end
    assert (reference / f"samples_step{step}.png").exists()
    with np.load(reference / f"samples_step{step}.npz") as f:
      assert f["images"].shape == (10, 16, 16, 1)
      assert 0.0 <= f["images"].min() <= f["images"].max() <= 1.0
      np.testing.assert_array_equal(f["labels"], np.arange(10))
      assert int(f["step"]) == step


def test_two_processes_match_one(reference, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [_launch(tmp_path, f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}")
           for i in range(2)]
  for proc in procs:
    _finish(proc)
  want, got = _losses(reference), _losses(tmp_path)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [want[s] for s in sorted(want)], rtol=2e-5)
  assert _checkpoints(tmp_path)[-1] == STEPS


def test_kill_sigterm_and_resume_match_uninterrupted(reference, tmp_path):
  # SIGKILL once a checkpoint is committed: nothing after it survives.
  proc = _launch(tmp_path, num_steps=10_000)
  _wait_for_records(proc, tmp_path, 3)
  while not _checkpoints(tmp_path):
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _checkpoints(tmp_path)[-1]
  # Resume: the records after the checkpoint are dropped; SIGTERM must save
  # the step it finished, then exit with status 143.
  proc = _launch(tmp_path, num_steps=10_000)
  _wait_for_checkpoint_after(proc, tmp_path, killed_at)
  proc.send_signal(signal.SIGTERM)
  _finish(proc, status=143)
  steps = [json.loads(line)["step"] for line in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, steps[-1] + 1))
  assert _checkpoints(tmp_path)[-1] == steps[-1]
  # Resume to the end (a shorter run: a config change, allowed): every
  # step's loss equals the uninterrupted run's.
  if steps[-1] < STEPS:
    _finish(_launch(tmp_path, "--allow_config_change"))
  want, got = _losses(reference), _losses(tmp_path)
  for step in range(1, STEPS + 1):
    assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_changed_model_shape_is_refused_with_the_differing_field(reference):
  before = (reference / "config.json").read_text()
  out = _finish(_launch(reference, "--config.model.hidden_size=48"),
                status=1)
  assert "ValueError: the config differs" in out
  assert "model.hidden_size: 32 -> 48" in out
  assert "--allow_config_change" in out
  assert "tensorstore" not in out and "Event loop" not in out
  assert (reference / "config.json").read_text() == before
