"""train/lib/flow.py: noise-level sampling and the x0 parameterisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.lib import flow


@pytest.mark.parametrize("sampling", flow.TIMESTEP_SAMPLINGS)
def test_sigmas_lie_in_the_unit_interval(sampling):
  sigmas = flow.sample_sigmas(jax.random.key(0), 4096, sampling)
  assert sigmas.shape == (4096,) and sigmas.dtype == jnp.float32
  assert float(sigmas.min()) > 0.0 and float(sigmas.max()) <= 1.0
  assert abs(float(jnp.median(sigmas)) - 0.5) < 0.05


def test_logit_normal_favours_the_middle():
  key = jax.random.key(0)
  middle = lambda s: float(jnp.mean(jnp.abs(s - 0.5) < 0.25))
  assert (middle(flow.sample_sigmas(key, 4096, "logit_normal"))
          > middle(flow.sample_sigmas(key, 4096, "uniform")) + 0.1)


def test_unknown_sampling_is_refused():
  with pytest.raises(ValueError, match="sampling must be one of"):
    flow.sample_sigmas(jax.random.key(0), 4, "cosine")


def test_exact_x0_gives_the_exact_velocity():
  kx, kn = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(kx, (3, 4, 4, 1), minval=-1.0, maxval=1.0)
  noise = 2.0 * jax.random.normal(kn, x0.shape)
  sigma = jnp.asarray([0.1, 0.5, 1.0])
  s = sigma[:, None, None, None]
  x_t = (1 - s) * x0 + s * noise
  velocity = flow.velocity_from_x0(lambda x, t: x0)
  np.testing.assert_allclose(
      velocity(x_t, sigma * flow.NUM_TRAIN_TIMESTEPS), noise - x0,
      atol=1e-5)
