"""Pixel-space DiT: token order, RoPE and pluggable attention."""

from __future__ import annotations

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import llsa
from jsparse.models import dit


def _randomized(config: dit.DiTConfig) -> dit.DiT:
  """A DiT whose zero-initialised (adaLN-Zero) weights are made random."""
  model = dit.DiT(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(key, x.shape) for key, x in zip(keys, leaves)]))
  return model


def _inputs(size, channels=3, batch=2):
  kx, kt = jax.random.split(jax.random.key(2))
  return (jax.random.normal(kx, (batch, size, size, channels)),
          jax.random.uniform(kt, (batch,), maxval=1000.0))


class DiTTest(absltest.TestCase):

  def test_zorder_is_invisible_to_dense_attention(self):
    # Permuting tokens and the RoPE table together must not change a dense
    # model's output (attention is permutation-equivariant).
    base = dict(image_size=8, hidden_size=32, depth=1, num_heads=2)
    x, t = _inputs(8)
    outs = []
    for permute in (False, True):
      model = _randomized(dit.DiTConfig(token_permutation=permute, **base))
      outs.append(jax.jit(lambda m, x, t: m(x, t))(model, x, t))
    self.assertGreater(float(jnp.abs(outs[0]).max()), 1e-3)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)

  def test_rope_is_relative(self):
    positions = np.array([[0, 0], [3, 5], [7, 2], [10, 9]])
    angles = jnp.asarray(dit.rope_angles(positions, 16, 10000.0))
    q = jax.random.normal(jax.random.key(3), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(4), (1, 1, 1, 16))
    rot = lambda x, i: dit.apply_rope(x, angles[i:i + 1])
    # <R(p) q, R(p') k> depends on p - p' only: shift both positions.
    shifted = jnp.asarray(dit.rope_angles(positions + 4, 16, 10000.0))
    rot2 = lambda x, i: dit.apply_rope(x, shifted[i:i + 1])
    a = jnp.vdot(rot(q, 1), rot(k, 2))
    b = jnp.vdot(rot2(q, 1), rot2(k, 2))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 3)),
                               jnp.linalg.norm(q), rtol=1e-6)

  def test_llsa_model_from_registry_name(self):
    method_config = dit.make_method_config(
        "llsa", {"num_levels": 1, "topk": 4, "block_size": 16})
    self.assertEqual(method_config, llsa.LLSAConfig(num_levels=1, topk=4))
    config = dit.DiTConfig(image_size=16, in_channels=1, hidden_size=32,
                           depth=1, num_heads=2, attention="llsa",
                           method_config=method_config)
    model = _randomized(config)
    x, t = _inputs(16, channels=1)
    out = nnx.jit(lambda m, x, t: m(x, t))(model, x, t)
    self.assertEqual(out.shape, x.shape)
    self.assertTrue(bool(jnp.all(jnp.isfinite(out))))
    with self.assertRaisesRegex(ValueError, "attention must be"):
      dit.make_method_config("nope")


if __name__ == "__main__":
  absltest.main()
