"""SparseAttention trains without retracing when only the data changes.

A training step (nnx.value_and_grad + optax update under nnx.jit) over a
dynamic method (HiP) traces once per length across 3 steps of new data.
"""

from __future__ import annotations

from absl.testing import absltest
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jsparse import attention
from jsparse.methods import hip

B, HEADS, FEATURES = 2, 2, 32
LENGTHS = (128, 256)
NUM_STEPS = 3


def _model_and_optimizer():
  model = attention.SparseAttention(HEADS, FEATURES,
                                    method=hip.HiPMethod(hip.HiPConfig()),
                                    rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


def _train_step(max_traces):
  """A jitted step whose Python body may trace at most `max_traces` times."""
  def step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y)**2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return nnx.jit(chex.assert_max_traces(step, n=max_traces))


def _batch(seed, t):
  kx, ky = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (B, t, FEATURES)),
          jax.random.normal(ky, (B, t, FEATURES)))


def _params(model):
  return [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


class NoRetraceAttentionTest(absltest.TestCase):

  def tearDown(self):
    chex.clear_trace_counter()
    super().tearDown()

  def test_train_step_traces_once_per_length(self):
    model, optimizer = _model_and_optimizer()
    before = _params(model)
    step = _train_step(max_traces=len(LENGTHS))
    for t in LENGTHS:
      for seed in range(NUM_STEPS):
        loss = step(model, optimizer, *_batch(seed, t))
        chex.assert_shape(loss, ())
        chex.assert_tree_all_finite(loss)
    self.assertFalse(all(np.array_equal(a, b)
                         for a, b in zip(before, _params(model))))


if __name__ == "__main__":
  absltest.main()
