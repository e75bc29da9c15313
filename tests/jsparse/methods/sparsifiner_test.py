"""Sparsifiner: predictor mask, sparse attention vs dense reference, losses."""

from __future__ import annotations

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import methods
from jsparse.methods import sparsifiner
from tests.jsparse.methods import method_test_base as mtb

_B, _N, _H, _D = 2, 33, 2, 8
_CFG = sparsifiner.SparsifinerConfig(num_tokens=_N, keep_rate=0.25,
                                     block_size=8)


class SparsifinerTest(mtb.MethodTestBase):

  TRAINS = True  # phase 2 fine-tunes the backbone through the sparse op

  def make_method(self):
    return sparsifiner.SparsifinerMethod(_CFG, _H, _D, rngs=nnx.Rngs(0))

  def dense_method(self):
    cfg = sparsifiner.SparsifinerConfig(num_tokens=_N, keep_rate=1.0,
                                        block_size=8)
    return sparsifiner.SparsifinerMethod(cfg, _H, _D, rngs=nnx.Rngs(0))

  def inputs(self, method):
    q, k, v = mtb.random_qkv(3, _B, _N, _N, _H, _H, _D)
    return q, k, v, {}

  def logical_mask(self, method, q, k, kwargs):
    return method.mask(q, k)

  def test_registered(self):
    self.assertIs(methods.METHODS["sparsifiner"],
                  sparsifiner.SparsifinerMethod)

  def test_exact_k_per_row_and_dense_cls_row(self):
    for selection in ("predictor", "random"):
      method = sparsifiner.SparsifinerMethod(
          sparsifiner.SparsifinerConfig(num_tokens=_N, selection=selection),
          _H, _D, rngs=nnx.Rngs(0))
      q, k, _, _ = self.inputs(method)
      mask = np.asarray(method.mask(q, k))
      self.assertEqual(mask.shape, (_B, _H, _N, _N))
      self.assertTrue(np.all(mask[:, :, 0]))
      np.testing.assert_array_equal(mask[:, :, 1:].sum(-1),
                                    _CFG.keys_per_row)

  def test_no_gradient_through_selection(self):
    method = self.make_method()
    q, k, v, _ = self.inputs(method)
    grads = nnx.grad(lambda m: m(q, k, v, implementation="xla").sum())(
        method)
    for leaf in jax.tree.leaves(grads):
      np.testing.assert_array_equal(leaf, 0.0)

  def test_approximation_forms(self):
    method = self.make_method()
    q, k, _, _ = self.inputs(method)
    raw = method.approximate(q, k, sparse=False)
    sparse = method.approximate(q, k, sparse=True)
    self.assertEqual(raw.shape, (_B, _H, _N - 1, _N))
    self.assertTrue(np.all(np.asarray(sparse) >= 0))
    # Raw form: softmax coefficients times the signed basis.
    cfg = method.config
    kr = method.k_reduce(k)
    qr = method.q_reduce(q)[:, 1:]
    coef = jax.nn.softmax(jnp.einsum(
        "bnhc,bmhc->bhnm", qr, jnp.einsum("bnhc,nm->bmhc", kr,
                                          method.down[...])) * _H**-0.5, -1)
    want = jnp.einsum("bhnm,sm->bhns", coef, method.up[...])
    np.testing.assert_allclose(raw, want, atol=1e-6)
    self.assertEqual(cfg.num_slots, _N // 6)

  def test_losses_on_small_tensors(self):
    approx = jnp.asarray([[[[0.5, 0.5], ]]])  # [1, 1, 1, 2]
    teacher = jnp.asarray([[[[1.0, 0.0], [0.25, 0.75]]]])
    self.assertAlmostEqual(float(sparsifiner.reconstruction_loss(
        approx, teacher)), 0.01 * (0.25**2 + 0.25**2), places=7)
    s = jnp.asarray([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    t = jnp.asarray([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pt, ps = jax.nn.softmax(t), jax.nn.softmax(s)
    kl = float(jnp.sum(pt * (jnp.log(pt) - jnp.log(ps))) / 2)
    self.assertAlmostEqual(float(sparsifiner.logit_distillation_loss(s, t)),
                           kl, places=6)
    a, b = jnp.ones((1, 3, 2)), jnp.zeros((1, 3, 2)).at[:, 0].set(5.0)
    self.assertAlmostEqual(float(sparsifiner.token_distillation_loss(a, b)),
                           1.0)

  def test_flops(self):
    flops = sparsifiner.attention_flops(_CFG, _H, _D)
    k = _CFG.keys_per_row
    self.assertEqual(flops["dense"], 4 * _H * _N * _N * _D)
    self.assertEqual(flops["sparse"], 4 * _H * (k * (_N - 1) + _N) * _D)


if __name__ == "__main__":
  absltest.main()
