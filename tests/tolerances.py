"""One tolerance table for every kernel test."""

import jax.numpy as jnp
import numpy as np

# Absolute value tolerance per dtype (interpret mode / CPU, f32 at HIGHEST).
ATOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2}
# bf16 gate (Marin's rule): the kernel's RMS error vs an f32 oracle is at
# most this many times the reference's own bf16 RMS error.
BF16_ERROR_RATIO = 1.5


def atol(dtype) -> float:
  return ATOL[jnp.dtype(dtype)]


def rtol(dtype) -> float:
  return atol(dtype) / 10


def grad_atol(dtype) -> float:
  return 2 * atol(dtype)


def rms(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0
