"""train/sea_distill.py: phases run and resume exactly; the KD losses."""

from __future__ import annotations

import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from tests.train import sparsifiner_vit_test
from train import sea_distill
from train.configs import sea_distill as configs


def tiny_config(data_dir, **overrides):
  config = configs.get_config()
  config.teacher_steps, config.distill_steps = 1, 1
  config.baseline_steps = 1
  config.batch_size, config.seq_len = 2, 32
  config.log_every, config.checkpoint_every = 1, 1
  config.data.data_dir, config.data.eval_windows = data_dir, 2
  config.data.val_every = 2  # two of the four fake plays validate
  config.model.num_layers, config.model.d_model = 1, 32
  config.model.mlp_hidden, config.model.block_size = 32, 16
  config.sea.predictor_len, config.sea.topk = 8, 4
  for key, val in overrides.items():
    setattr(config, key, val)
  return config


class SEADistillTest(absltest.TestCase):

  def test_phases_run_and_resume_exactly(self):
    from tests.train import dma_lm_test  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as data_dir, \
        tempfile.TemporaryDirectory() as a, \
        tempfile.TemporaryDirectory() as b:
      dma_lm_test.write_fake_sdist(data_dir)
      results = sea_distill.train_and_evaluate(tiny_config(data_dir), a)
      self.assertSetEqual(set(results["perplexity"]), {
          "dense", "sea", "window", "window_zero_shot", "linear"})
      sea_distill.train_and_evaluate(
          tiny_config(data_dir, baseline_steps=0), b)
      sea_distill.train_and_evaluate(tiny_config(data_dir), b,
                                     allow_config_change=True)
      want = sparsifiner_vit_test.train_losses(a)
      got = sparsifiner_vit_test.train_losses(b)
      self.assertEqual(sorted(want), [1, 2, 3, 4])
      np.testing.assert_allclose([got[s] for s in range(1, 5)],
                                 [want[s] for s in range(1, 5)], rtol=1e-6)

  def test_kd_losses(self):
    s = jnp.asarray([[[1.0, 0.0]]])
    t = jnp.asarray([[[0.0, 1.0]]])
    pt, ps = jax.nn.softmax(t), jax.nn.softmax(s)
    want = float(jnp.sum(pt * (jnp.log(pt) - jnp.log(ps))))
    self.assertAlmostEqual(float(sea_distill.logit_kl(s, t)), want, places=6)
    config = configs.get_config()
    h = [jnp.ones((1, 1, 2))]
    total, parts = sea_distill.kd_loss(
        config, s, [x * 0 for x in h], t, h, jnp.asarray([[1]]))
    ce = -float(jax.nn.log_softmax(s)[0, 0, 1])
    self.assertAlmostEqual(float(parts["train/ce"]), ce, places=6)
    self.assertAlmostEqual(float(total), 0.1 * ce + 5.0 + 0.2 * want,
                           places=5)


if __name__ == "__main__":
  absltest.main()
