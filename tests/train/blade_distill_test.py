"""train/blade_distill.py: teacher + TDM run and resume exactly; losses."""

from __future__ import annotations

import tempfile

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from tests.train import sparsifiner_vit_test
from train import blade_distill
from train.configs import blade_distill as configs


def tiny_config(**overrides):
  config = configs.get_config()
  config.teacher_steps, config.distill_steps = 2, 2
  config.batch_size, config.log_every, config.checkpoint_every = 4, 1, 1
  config.model.hidden_size, config.model.depth = 16, 1
  config.tdm.student_steps = 2
  config.eval.num_samples, config.eval.teacher_steps = 16, 3
  for key, val in overrides.items():
    setattr(config, key, val)
  return config


class BladeDistillTest(absltest.TestCase):

  def test_teacher_and_tdm_run_and_resume_exactly(self):
    with tempfile.TemporaryDirectory() as a, \
        tempfile.TemporaryDirectory() as b:
      results = blade_distill.train_and_evaluate(tiny_config(), a)
      self.assertLen(results["frechet_to_real"], 4)
      blade_distill.train_and_evaluate(tiny_config(distill_steps=0), b)
      blade_distill.train_and_evaluate(tiny_config(), b,
                                       allow_config_change=True)
      want = sparsifiner_vit_test.train_losses(a)
      got = sparsifiner_vit_test.train_losses(b)
      self.assertEqual(sorted(want), [1, 2, 3, 4])
      np.testing.assert_allclose([got[s] for s in range(1, 5)],
                                 [want[s] for s in range(1, 5)], rtol=1e-6)

  def test_generator_loss_is_normalised_pseudo_huber(self):
    x0 = jnp.asarray([[1.0, 3.0]])
    real, fake = jnp.asarray([[2.0, 2.0]]), jnp.asarray([[0.0, 0.0]])
    c = 0.5
    # y = x0 + r - f, so x0 - y = f - r = -2; w = mean |x0 - r| = 1.
    want = np.sqrt(4 + c**2) - c
    got = blade_distill.generator_loss(x0, real, fake, huber_c=c,
                                       weight_clip=5.0)
    self.assertAlmostEqual(float(got), want, places=6)

  def test_student_levels(self):
    np.testing.assert_allclose(blade_distill.student_sigmas(4),
                               [0.999, 0.749, 0.499, 0.249, 0.0], atol=1e-6)


if __name__ == "__main__":
  absltest.main()
