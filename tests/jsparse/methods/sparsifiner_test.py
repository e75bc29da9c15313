"""Sparsifiner: predictor mask, sparse attention vs dense reference, losses."""

from __future__ import annotations

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from eval import matmul_flops
from jsparse import methods
from jsparse.methods import sparsifiner
from tests import jaxpr_size
from tests.jsparse.methods import method_test_base as mtb

_B, _N, _H, _D = 2, 33, 2, 8
_CFG = sparsifiner.SparsifinerConfig(num_tokens=_N, keep_rate=0.25)


def _plan_cost(method, q, k, v):
  """Matmul FLOPs of plan + attend, loops counted times their trip count."""
  graph, state = nnx.split(method)
  fn = lambda s, q, k, v: nnx.merge(graph, s)(q, k, v, implementation="xla")
  return matmul_flops.matmul_flops(fn, state, q, k, v).flops


class SparsifinerTest(mtb.MethodTestBase):

  TRAINS = True  # phase 2 fine-tunes the backbone through the sparse op

  def make_method(self):
    return sparsifiner.SparsifinerMethod(_CFG, _H, _D, rngs=nnx.Rngs(0))

  def dense_method(self):
    cfg = sparsifiner.SparsifinerConfig(num_tokens=_N, keep_rate=1.0)
    return sparsifiner.SparsifinerMethod(cfg, _H, _D, rngs=nnx.Rngs(0))

  def inputs(self, method):
    q, k, v = mtb.random_qkv(3, _B, _N, _N, _H, _H, _D)
    return q, k, v, {}

  def logical_mask(self, method, q, k, kwargs):
    return method.mask(q, k)

  def test_plan_well_formed(self):
    # RowLayout [B, H, N, k]: k distinct keys per non-CLS row, none listed
    # for the CLS row (its dense row is attended in __call__).
    method = self.make_method()
    q, k, v, _ = self.inputs(method)
    layout = jax.jit(lambda q, k, v: method.plan(q, k, v).layout)(q, k, v)
    keep = _CFG.keys_per_row
    self.assertEqual(layout.kv_idx.shape, (_B, _H, _N, keep))
    np.testing.assert_array_equal(layout.kv_cnt[:, :, 0], 0)
    np.testing.assert_array_equal(layout.kv_cnt[:, :, 1:], keep)
    jax.tree.map(np.asarray, layout).validate()  # in range and distinct
    np.testing.assert_array_equal(
        layout.to_dense_mask(_N, _N)[:, :, 1:], method.mask(q, k)[:, :, 1:])

  def test_selection_matches_dense_top_k(self):
    # GQA inputs; the chunked selection equals a stable sort of the dense
    # approximate map, row by row.
    q, k, _ = mtb.random_qkv(6, _B, _N, _N, _H, 1, _D)
    method = self.make_method()
    scores = np.asarray(method.approximate(q, k, sparse=True))
    for chunk in (1 << 22, 1):  # one chunk, and one row per chunk
      with mock.patch.object(sparsifiner, "_CHUNK_ELEMENTS", chunk):
        idx = np.asarray(jax.jit(method.select)(q, k))
      want = np.argsort(-scores, -1, kind="stable")[..., :_CFG.keys_per_row]
      np.testing.assert_array_equal(np.sort(idx, -1), np.sort(want, -1))

  @parameterized.parameters(197, 785)
  def test_flops_below_dense_at_vit_sizes(self, n):
    # DeiT-S at 224 and 448 px: H = 6, D = 64, keep_rate 0.1. The counter
    # multiplies the chunk loops (XLA's cost analysis counts a body once).
    cfg = sparsifiner.SparsifinerConfig(num_tokens=n, keep_rate=0.1)
    method = sparsifiner.SparsifinerMethod(cfg, 6, 64, rngs=nnx.Rngs(0))
    q, k, v = mtb.random_qkv(0, 1, n, n, 6, 6, 64)
    dense = matmul_flops.matmul_flops(jax.nn.dot_product_attention, q, k,
                                      v).flops
    flops = _plan_cost(method, q, k, v)
    self.assertLess(flops, dense)
    predictor = sparsifiner.attention_flops(cfg, 6, 64)["predictor"]
    self.assertGreater(flops, predictor)  # everything was counted

  def test_plan_has_no_full_map_intermediate(self):
    # The approximate map is N x N per head by design, but the plan only
    # builds chunks of it: nothing reaches the B H N^2 of the full map (nor
    # the N^2 k of the old [B, H, N, k, N] one-hot).
    n = 4096
    cfg = sparsifiner.SparsifinerConfig(num_tokens=n, keep_rate=0.1,
                                        cls_token=False)
    method = sparsifiner.SparsifinerMethod(cfg, 4, 64, rngs=nnx.Rngs(0))
    graph, state = nnx.split(method)
    q = jax.ShapeDtypeStruct((1, n, 4, 64), jnp.float32)
    size, shape, prim = jaxpr_size.largest_intermediate(
        lambda s, q, k, v: nnx.merge(graph, s).plan(q, k, v).layout,
        state, q, q, q)
    self.assertLess(size, 4 * n * n, f"{prim} builds {shape}")

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

  def test_signed_basis_selects_on_the_trained_map(self):
    # basis="signed" with every coefficient kept: the selection ranks the
    # very map phase 1 fits (and which `abs` would rank differently).
    cfg = sparsifiner.SparsifinerConfig(num_tokens=_N, keep_rate=0.25,
                                        basis="signed", coef_topk=_N)
    method = sparsifiner.SparsifinerMethod(cfg, _H, _D, rngs=nnx.Rngs(0))
    q, k, _, _ = self.inputs(method)
    raw = method.approximate(q, k, sparse=False)
    np.testing.assert_allclose(method.approximate(q, k, sparse=True), raw,
                               atol=1e-6)
    want = np.argsort(-np.asarray(raw), -1, kind="stable")
    idx = np.asarray(jax.jit(method.select)(q, k))
    np.testing.assert_array_equal(
        np.sort(idx, -1), np.sort(want[..., :cfg.keys_per_row], -1))
    with self.assertRaisesRegex(ValueError, "basis must be"):
      sparsifiner.SparsifinerMethod(
          sparsifiner.SparsifinerConfig(num_tokens=_N, basis="relu"), _H,
          _D, rngs=nnx.Rngs(0))

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
