"""Test inputs drawn with NumPy: no JAX program to compile per shape."""

import jax.numpy as jnp
import numpy as np


def normal(seed: int, shape, dtype=jnp.float32):
  """Standard normal samples as a jax array."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     dtype)
