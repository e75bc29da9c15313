"""Rectified flow (v-prediction) as in LLSA's flow-matching recipe.

x_t = (1 - sigma) x_0 + sigma eps, sigma = (T - i) / T with i ~ U{0..T-1}
("uniform"), or sigma = sigmoid(n), n ~ N(0, 1) ("logit_normal", SD3's
choice, arXiv 2403.03206: more weight on the middle noise levels); the
model sees t = T * sigma and predicts v = eps - x_0, or predicts x_0 and
v = (x_t - x_0) / sigma is derived from it (`velocity_from_x0`, "JiT",
arXiv 2511.13720: clean images are easier targets for pixel models than
noise); the Euler sampler integrates from sigma = 1 to 0. `noise_scale`
multiplies eps everywhere (2 at 128^2 in the paper's configs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_sigmas(key: jax.Array, batch: int,
                  sampling: str = "uniform") -> jax.Array:
  """f32 [batch] noise levels in (0, 1] drawn as `sampling` says."""
  if sampling == "uniform":
    i = jax.random.randint(key, (batch,), 0, NUM_TRAIN_TIMESTEPS)
    return (NUM_TRAIN_TIMESTEPS - i).astype(jnp.float32) / NUM_TRAIN_TIMESTEPS
  if sampling == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
  raise ValueError(
      f"sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")


def loss_fn(model, x0: jax.Array, key: jax.Array, noise_scale: float = 1.0,
            timestep_sampling: str = "uniform") -> jax.Array:
  """Plain MSE between predicted and true velocity.

  Args:
    model: callable (x_t [B, R, R, C], t [B]) -> v [B, R, R, C].
    x0: [B, R, R, C] clean images in [-1, 1].
    key: PRNG key for the timesteps and the noise.
    noise_scale: eps multiplier.
    timestep_sampling: one of TIMESTEP_SAMPLINGS.

  Returns:
    f32 scalar loss.
  """
  kt, kn = jax.random.split(key)
  b = x0.shape[0]
  sigma = sample_sigmas(kt, b, timestep_sampling)
  noise = jax.random.normal(kn, x0.shape, jnp.float32) * noise_scale
  s = sigma.reshape(b, 1, 1, 1)
  x_t = (1.0 - s) * x0 + s * noise
  v = model(x_t, sigma * NUM_TRAIN_TIMESTEPS)
  return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0)))


PREDICTIONS = ("v", "x0")


def velocity_from_x0(model, min_sigma: float = 0.05):
  """(x_t, t) -> v of a model (x_t, t) -> x_0: v = (x_t - x_0) / sigma,
  with sigma clipped at `min_sigma` (the loss weight 1 / sigma^2)."""
  def velocity(x, t):
    sigma = jnp.maximum(t.astype(jnp.float32) / NUM_TRAIN_TIMESTEPS,
                        min_sigma)
    return (x - model(x, t).astype(jnp.float32)) / sigma[:, None, None, None]
  return velocity


def euler_sigmas(num_steps: int) -> np.ndarray:
  """[num_steps + 1]: linspace(1, 0.001, num_steps) then 0."""
  return np.append(np.linspace(1.0, 0.001, num_steps), 0.0).astype(
      np.float32)


def sample(model, key: jax.Array, shape: tuple[int, ...],
           num_steps: int = 20, noise_scale: float = 1.0) -> jax.Array:
  """Euler sampling; returns images [B, R, R, C] in [0, 1]."""
  x = jax.random.normal(key, shape, jnp.float32) * noise_scale
  sigmas = jnp.asarray(euler_sigmas(num_steps))

  def step(x, pair):
    sigma, sigma_next = pair[0], pair[1]
    t = jnp.full((shape[0],), sigma * NUM_TRAIN_TIMESTEPS, jnp.float32)
    return x + (sigma_next - sigma) * model(x, t).astype(jnp.float32), None

  pairs = jnp.stack([sigmas[:-1], sigmas[1:]], axis=-1)
  x, _ = jax.lax.scan(step, x, pairs)
  return jnp.clip(x / 2 + 0.5, 0.0, 1.0)
