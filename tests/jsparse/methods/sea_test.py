"""SEA: stretch rule, grouped top-k, sparse attention vs dense reference."""

from __future__ import annotations

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import sea
from tests import tolerances
from tests.jsparse.methods import method_test_base as mtb

_B, _T, _H, _D = 1, 64, 2, 8
_CFG = sea.SEAConfig(predictor_len=16, topk=8, block_size=16,
                     max_positions=_T, output="sparse")


class SEATest(mtb.MethodTestBase):

  TRAINS = True  # the student is fine-tuned through the sparse attention

  def make_method(self):
    return sea.SEAMethod(_CFG, _H, _D, rngs=nnx.Rngs(0))

  def dense_method(self):
    # T_M = T and a budget covering every cell: all keys kept.
    cfg = sea.SEAConfig(predictor_len=_T, topk=_T, block_size=16,
                        max_positions=_T, output="sparse")
    return sea.SEAMethod(cfg, _H, _D, rngs=nnx.Rngs(0))

  def inputs(self, method):
    q, k, self.v = mtb.random_qkv(4, _B, _T, _T, _H, _H, _D)
    return q, k, self.v, {}

  def logical_mask(self, method, q, k, kwargs):
    plan = nnx.jit(lambda m, q, k, v: m.plan(q, k, v))(method, q, k, self.v)
    return sea.element_mask(plan.aux["selected"], k.shape[1], True)

  def dense_mask(self, method, q, k, kwargs):
    return np.tril(np.ones((1, 1, _T, _T), bool))

  def test_stretch_rule_matches_loop(self):
    tm, t = 8, 20
    cells = np.asarray(sea.stretch(
        jnp.arange(tm, dtype=jnp.float32)[None, None, None, :].repeat(t, 2),
        t, True))[0, 0]
    for row in range(t):
      length = row + 1
      for j in range(length):
        want = min(max(int(np.floor((j + 0.5) * tm / length - 1e-4)), 0),
                   tm - 1)
        self.assertEqual(cells[row, j], want)

  def test_grouped_budget(self):
    est = jax.random.uniform(jax.random.key(0), (1, 3, 40, 16))
    keep = np.asarray(sea.grouped_topk(est, 4, causal=True))
    per_row = keep.sum((1, 3))[0]  # cells kept per query over heads
    want = np.clip(np.round(3 * 4 * 16 / (np.arange(40) + 1.0)), 1, 48)
    np.testing.assert_array_equal(per_row, want)
    keep = np.asarray(sea.grouped_topk(est, 4, causal=False))
    self.assertEqual(keep.sum(), 3 * 4 * 16)
    # Kept keys per row and head: k on average once rows are long.
    mask = np.asarray(sea.element_mask(
        sea.grouped_topk(est, 4, causal=True), 40, True))
    self.assertAlmostEqual(mask[:, :, 16:].sum(-1).mean(), 4, delta=1.5)

  def test_mix_aux_and_losses(self):
    method = sea.SEAMethod(
        sea.SEAConfig(predictor_len=16, topk=8, block_size=16,
                      max_positions=_T), _H, _D, rngs=nnx.Rngs(1))
    q, k, v, _ = self.inputs(method)

    @nnx.jit
    def run(m, q, k, v):
      plan = m.plan(q, k, v)
      return m(q, k, v), plan.attend(q, k, v), plan.aux

    out, sparse, aux = run(method, q, k, v)
    g = jax.nn.sigmoid(jnp.moveaxis(aux["gates"], 1, 2))
    avg = jnp.cumsum(v, 1) / jnp.arange(1, _T + 1)[None, :, None, None]
    want = g[..., 1:] * g[..., :1] * sparse + (1 - g[..., 1:]) * avg
    np.testing.assert_allclose(out, want, atol=tolerances.atol(jnp.float32))
    chex_shape = (_B, _H, _T, 16)
    self.assertEqual(aux["estimate"].shape, chex_shape)
    np.testing.assert_allclose(aux["estimate"].sum(-1), 1.0, atol=1e-5)
    teacher = jax.nn.softmax(jnp.where(
        np.tril(np.ones((_T, _T), bool)),
        jax.random.normal(jax.random.key(2), (_B, _H, _T, _T)), -jnp.inf), -1)
    grads = nnx.grad(lambda m: sea.estimator_loss(
        m.estimate(q, k, v)[0], teacher, True))(method)
    self.assertGreater(float(jnp.abs(grads.row_decoder.kernel[...]).sum()),
                       0)
    self.assertTrue(np.isfinite(float(sea.attention_loss(q, k, teacher,
                                                         True))))
    self.assertEqual(float(sea.context_loss(out, out)), 0.0)


if __name__ == "__main__":
  absltest.main()
