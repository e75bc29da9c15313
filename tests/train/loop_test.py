"""The shared loop (train/lib): damaged checkpoints, metrics on resume,
config checks, settings validation and SIGTERM's exit status.

A one-parameter "model" counts finished steps, so the restored step can be
read off its value.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from train.lib import loop as loop_lib
from train.lib import report
from train.lib import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Counter(nnx.Module):
  """value = the number of steps run."""

  def __init__(self):
    self.value = nnx.Param(jnp.zeros((4,), jnp.float32))


def _make_loop(workdir, total, counter=None, **kwargs):
  counter = counter or Counter()
  settings = {"keep_checkpoints": 5, "log_every": 1, "checkpoint_every": 2,
              **kwargs}
  return loop_lib.Loop(str(workdir), {"counter": counter}, total,
                       **settings), counter


def _step_fn(counter):
  def step_fn(step):
    counter.value[...] += 1.0
    return {"train/loss": jnp.float32(step + 1)}
  return step_fn


def _train(workdir, total, **kwargs):
  loop, counter = _make_loop(workdir, total, **kwargs)
  loop.run(_step_fn(counter))
  return counter


def _steps_recorded(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines]


def _truncate_data(step_dir):
  files = [p for p in step_dir.rglob("*") if p.is_file()
           and p.parent.name == "d"]
  assert files
  for path in files:
    os.truncate(path, 10)


def _delete_metadata(step_dir):
  (step_dir / "counter" / "_METADATA").unlink()


def _empty_step_dir(step_dir):
  for path in sorted(step_dir.rglob("*"), reverse=True):
    path.rmdir() if path.is_dir() else path.unlink()


@pytest.mark.parametrize("damage", [_truncate_data, _delete_metadata,
                                    _empty_step_dir])
def test_damaged_latest_checkpoint_is_moved_aside(tmp_path, damage, caplog):
  _train(tmp_path, 4)  # checkpoints 2 and 4
  damage(tmp_path / "checkpoints" / "4")
  loop, counter = _make_loop(tmp_path, 6)
  assert loop.start == 2
  np.testing.assert_array_equal(counter.value[...], 2.0)
  assert not (tmp_path / "checkpoints" / "4").exists()
  assert (tmp_path / "checkpoints_unrestorable" / "4").is_dir()
  assert "checkpoint 4 does not restore" in caplog.text
  loop.run(_step_fn(counter))
  np.testing.assert_array_equal(counter.value[...], 6.0)
  assert _steps_recorded(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_no_restorable_checkpoint_fails_and_moves_nothing(tmp_path):
  _train(tmp_path, 2)
  _delete_metadata(tmp_path / "checkpoints" / "2")
  with pytest.raises(RuntimeError, match="no checkpoint .* restores"):
    _make_loop(tmp_path, 4)
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert not (tmp_path / "checkpoints_unrestorable").exists()


def test_resume_truncates_metrics_to_the_restored_step(tmp_path):
  _train(tmp_path, 3)  # checkpoints 2 and 3
  # A kill after step 3 was recorded but before it was saved.
  _empty_step_dir(tmp_path / "checkpoints" / "3")
  (tmp_path / "checkpoints" / "3").rmdir()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train/lo')  # a line cut short by the kill
  loop, counter = _make_loop(tmp_path, 5)
  assert loop.start == 2
  assert _steps_recorded(tmp_path) == [1, 2]
  loop.run(_step_fn(counter))
  assert _steps_recorded(tmp_path) == [1, 2, 3, 4, 5]


def test_lost_checkpoints_set_old_metrics_aside(tmp_path, caplog):
  _train(tmp_path, 2)
  old = (tmp_path / "metrics.jsonl").read_text()
  for path in sorted((tmp_path / "checkpoints").rglob("*"), reverse=True):
    path.rmdir() if path.is_dir() else path.unlink()
  loop, counter = _make_loop(tmp_path, 3)
  assert loop.start == 0 and not (tmp_path / "metrics.jsonl").exists()
  [aside] = tmp_path.glob("metrics.before-*.jsonl")
  assert aside.read_text() == old
  assert "starting a fresh one" in caplog.text
  loop.run(_step_fn(counter))
  assert _steps_recorded(tmp_path) == [1, 2, 3]


def test_sigterm_saves_the_finished_step_and_exits_143(tmp_path):
  loop, counter = _make_loop(tmp_path, 10, checkpoint_every=100)
  step_fn = _step_fn(counter)

  def interrupted(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return step_fn(step)

  with pytest.raises(SystemExit) as exit_info:
    loop.run(interrupted)
  assert exit_info.value.code == 143
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  loop, counter = _make_loop(tmp_path, 10)
  assert loop.start == 3
  np.testing.assert_array_equal(counter.value[...], 3.0)


def test_sigterm_exit_status_of_a_process(tmp_path):
  script = textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {str(ROOT)!r})
      from tests.train import loop_test
      loop, counter = loop_test._make_loop({str(tmp_path)!r}, 10**6,
                                           checkpoint_every=10**6)
      step_fn = loop_test._step_fn(counter)
      def slow(step):
        if step == 1:
          print("running", flush=True)
        time.sleep(0.01)
        return step_fn(step)
      loop.run(slow)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline() == "running\n", proc.communicate()[1]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
  assert saved == [_steps_recorded(tmp_path)[-1]]


def _config(**changes):
  config = ml_collections.ConfigDict({
      "seed": 0, "optim": {"learning_rate": 1e-3},
      "model": {"hidden_size": 64}})
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_changed_config_is_refused_before_anything_is_written(tmp_path):
  workdir_lib.prepare(str(tmp_path), _config())
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match=r"(?s)model\.hidden_size: 64 -> 96.*"
                     r"optim\.learning_rate: 0\.001 -> 0\.0005.*"
                     r"--allow_config_change"):
    workdir_lib.prepare(str(tmp_path),
                        _config(**{"model.hidden_size": 96,
                                   "optim.learning_rate": 5e-4}))
  assert (tmp_path / "config.json").read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
  workdir_lib.prepare(str(tmp_path), _config())  # the same config resumes


def test_allowed_config_change_is_recorded_in_the_history(tmp_path):
  workdir_lib.prepare(str(tmp_path), _config())
  workdir_lib.prepare(str(tmp_path), _config(**{"optim.learning_rate": 5e-4}),
                      allow_config_change=True)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["optim"]["learning_rate"] == 5e-4
  [line] = (tmp_path / "config_history.jsonl").read_text().splitlines()
  record = json.loads(line)
  assert record["changes"] == {
      "optim.learning_rate": {"old": 1e-3, "new": 5e-4}}
  assert record["previous_config"] == _config().to_dict()


@pytest.mark.parametrize("field,value", [
    ("checkpoint_every", 0), ("log_every", -1), ("batch_size", 0),
    ("num_steps", 0), ("keep_checkpoints", 1.5), ("log_every", True)])
def test_bad_settings_are_refused(field, value):
  config = ml_collections.ConfigDict({
      "num_steps": 10, "batch_size": 8, "log_every": 1,
      "checkpoint_every": 5, "keep_checkpoints": 2, field: value})
  with pytest.raises(ValueError, match=f"config.{field} must be"):
    loop_lib.check_settings(config, "num_steps")


def test_phase_lengths_may_be_zero_but_not_all():
  config = ml_collections.ConfigDict({
      "a_steps": 0, "b_steps": 3, "batch_size": 8, "log_every": 1,
      "checkpoint_every": 5, "keep_checkpoints": 2})
  loop_lib.check_settings(config, "a_steps", "b_steps")
  config.b_steps = 0
  with pytest.raises(ValueError, match=r"a_steps \+ config.b_steps"):
    loop_lib.check_settings(config, "a_steps", "b_steps")


def test_metric_lines_are_not_echoed_during_training(tmp_path, capsys):
  _train(tmp_path, 3)
  assert "step 1:" not in capsys.readouterr().out
  assert report.read_metrics(str(tmp_path))[3]["train/loss"] == 3.0
