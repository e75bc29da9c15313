"""HMAR: scale-Markov / block-causal layouts and the normalised attention."""

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import hmar
from tests.jsparse.methods import method_test_base as mtb


def _brute_mask(patch_nums, rule):
  seg = [k for k, p in enumerate(patch_nums) for _ in range(p * p)]
  n = len(seg)
  return np.array([[(seg[j] == seg[i]) if rule == "markov" else
                    (seg[j] <= seg[i]) for j in range(n)] for i in range(n)])


class HMARMarkovTest(mtb.MethodTestBase):
  TRAINS = True
  CONFIG = hmar.HMARConfig(patch_nums=(1, 2, 3, 4, 5), block_q=16,
                           block_kv=16)

  def make_method(self):
    return hmar.HMARMethod(self.CONFIG)

  def dense_method(self):
    return hmar.HMARMethod(hmar.HMARConfig(patch_nums=(6,), block_q=16,
                                           block_kv=16))

  def inputs(self, method):
    n = method.config.seq_len
    return (*mtb.random_qkv(0, 2, n, n, 2, 2, 16), {})

  def logical_mask(self, method, q, k, kwargs):
    return jnp.asarray(_brute_mask(method.config.patch_nums,
                                   method.config.rule))[None, None]

  def test_perturbing_a_scale(self):
    method = self.make_method()
    q, k, v, _ = self.inputs(method)
    seg = hmar.scale_ids(method.config.patch_nums)
    j = 3
    noise = jax.random.normal(jax.random.key(1), k.shape)
    sel = jnp.asarray(seg == j)[None, :, None, None]
    k2, v2 = jnp.where(sel, k + noise, k), jnp.where(sel, v - noise, v)
    run = jax.jit(lambda k, v: method(q, k, v))
    changed = np.abs(np.asarray(run(k2, v2) - run(k, v))).max(
        axis=(0, 2, 3)) > 0
    if method.config.rule == "markov":
      np.testing.assert_array_equal(changed, seg == j)
    else:
      self.assertFalse(changed[seg < j].any())
      self.assertTrue(changed[seg >= j].all())


class HMARCausalTest(HMARMarkovTest):
  CONFIG = hmar.HMARConfig(patch_nums=(1, 2, 3, 4, 6, 9), rule="causal",
                           block_q=32, block_kv=16)


class HMARAttentionTest(absltest.TestCase):

  def test_normalised_attention(self):
    cfg = hmar.HMARConfig(patch_nums=(1, 2, 3), block_q=8, block_kv=8)
    block = hmar.HMARAttention(16, 2, cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, cfg.seq_len, 16))
    np.testing.assert_allclose(block.log_scale[...], np.log(4.0) * np.ones(2))

    def loss(block):
      return jnp.sum(block(x) ** 2)

    grads = nnx.jit(nnx.grad(loss))(block)
    self.assertTrue(np.all(np.isfinite(grads["log_scale"][...])))
    self.assertGreater(np.abs(grads["log_scale"][...]).sum(), 0)
    weights = hmar.lognorm_scale_weights(cfg.patch_nums)
    self.assertLen(weights, cfg.seq_len)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
