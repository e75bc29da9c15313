"""train/sparsifiner_vit.py: the three phases run and resume exactly."""

from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from train import sparsifiner_vit
from train.configs import sparsifiner_vit as configs


def tiny_config(**overrides):
  config = configs.get_config()
  config.teacher_steps, config.phase1_steps, config.phase2_steps = 1, 1, 2
  config.batch_size, config.log_every, config.checkpoint_every = 8, 1, 1
  config.data.image_size = 8
  config.model.hidden_size, config.model.depth = 16, 1
  config.model.num_heads = 2
  for key, val in overrides.items():
    setattr(config, key, val)
  return config


def train_losses(workdir):
  """step -> train/loss of metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


class SparsifinerViTTest(absltest.TestCase):

  def test_phases_run_and_resume_exactly(self):
    with tempfile.TemporaryDirectory() as a, \
        tempfile.TemporaryDirectory() as b:
      results = sparsifiner_vit.train_and_evaluate(tiny_config(), a)
      self.assertIn("sparsifiner_accuracy", results)
      # The random-mask student is fine-tuned in phase 2 (steps 3-4) too.
      with open(os.path.join(a, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
      self.assertEqual(
          sorted(r["step"] for r in records if "train/random_mask_loss" in r),
          [3, 4])
      for name in ("column_share_per_layer",
                   "teacher_column_share_per_layer"):
        self.assertLen(results[name], 1)  # one layer
        self.assertBetween(results[name][0], 0.0, 1.0)
      self.assertAlmostEqual(results["mask_density_non_cls_rows"],
                             results["expected_density"], places=5)
      # Stop after phase 1 (checkpoint at step 2), then resume to the end.
      self.assertEqual(sparsifiner_vit.train_and_evaluate(
          tiny_config(phase2_steps=0), b)["num_tokens"], 17)
      sparsifiner_vit.train_and_evaluate(tiny_config(), b,
                                         allow_config_change=True)
      want, got = train_losses(a), train_losses(b)
      self.assertEqual(sorted(want), [1, 2, 3, 4])
      np.testing.assert_allclose([got[s] for s in range(1, 5)],
                                 [want[s] for s in range(1, 5)], rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
