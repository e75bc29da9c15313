"""eval/digit_check.py: the recogniser accepts real digits, rejects noise
and blends, and holds samples to the digit they were asked for."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from eval import digit_check


@functools.lru_cache(maxsize=None)
def _recogniser(size=16):
  return digit_check.Recogniser(size)


def test_controls():
  controls = digit_check.controls(_recogniser())
  real = controls["held_out_real"]
  assert real["recognised"] > 0.8 and real["distinct_digits"] == 10
  assert controls["uniform_noise"]["recognised"] == 0.0
  assert controls["blends_of_two_digits"]["recognised"] < 0.15


def test_labels_must_match():
  r = _recogniser()
  right = r.score(r.held_out, r.held_out_labels)["recognised"]
  wrong = r.score(r.held_out, (r.held_out_labels + 1) % 10)["recognised"]
  assert right > 0.8 and wrong < 0.05


def test_check_samples_of_real_and_of_noise(tmp_path):
  r = _recogniser()
  real, noise = tmp_path / "real.npz", tmp_path / "noise.npz"
  np.savez(real, images=r.held_out[:50, ..., None],
           labels=r.held_out_labels[:50], step=1)
  np.savez(noise, images=np.random.default_rng(0).uniform(
      size=(50, 16, 16, 1)), labels=np.full(50, -1), step=1)
  recognisers = {16: r}
  got = digit_check.check_samples(str(real), recognisers)
  assert got["class_conditional"] and got["passes"]
  got = digit_check.check_samples(str(noise), recognisers)
  assert not got["class_conditional"] and not got["passes"]
  assert got["recognised"] == 0.0


def test_wrong_image_shape_is_refused():
  with pytest.raises(ValueError, match=r"images must be \[N, 16, 16"):
    _recogniser().recognise(np.zeros((2, 32, 32)))
