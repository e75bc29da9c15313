"""BLADE ASA: mask rule, LSE merge == single softmax, dense reference."""

from __future__ import annotations

import dataclasses

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import selection
from jsparse.methods import blade
from tests import tolerances
from tests.jsparse.methods import method_test_base as mtb

_B, _T, _H, _D = 1, 128, 2, 16
_CFG = blade.BladeConfig(block_size=32, samples=8, pool_size=8,
                         max_fraction=0.5)


def _union_reference(q, k, v, block_mask, config):
  """Dense softmax over [K masked by M ; K_pooled + ln n]."""
  b = config.block_size
  elem = np.repeat(np.repeat(np.asarray(block_mask), b, -2), b, -1)
  kp = selection.mean_pool(k, config.pool_size)
  vp = selection.mean_pool(v, config.pool_size)
  mask = np.concatenate(
      [elem, np.ones(elem.shape[:-1] + (kp.shape[1],), bool)], -1)
  bias = blade.kv_bias(k.shape[1], config.pool_size)[:, :, None, :]
  return mtb.masked_attention(q, jnp.concatenate([k, kp], 1),
                              jnp.concatenate([v, vp], 1), mask, bias)


class BladeTest(mtb.MethodTestBase):

  TRAINS = False  # gradients: test_matches_dense_reference

  def make_method(self):
    return blade.BladeMethod(_CFG)

  def dense_method(self):
    return blade.BladeMethod(blade.BladeConfig(
        block_size=32, samples=8, min_fraction=1.0, max_fraction=1.0,
        global_branch=False))

  def inputs(self, method):
    return (*mtb.random_qkv(0, _B, _T, _T, _H, _H, _D), {})

  def test_matches_dense_reference(self):
    """The method == dense softmax over the explicit union; values, grads."""
    method = self.make_method()
    q, k, v, _ = self.inputs(method)
    mask = method.block_mask(q, k)[0]
    run = jax.jit(lambda *a: method(*a, implementation="xla"))
    ref = lambda *a: _union_reference(*a, mask, _CFG)
    mtb.assert_values_and_grads_close(run, ref, q, k, v)

  def test_lse_merge_equals_single_call(self):
    q, k, v, _ = self.inputs(None)
    single = blade.BladeMethod(dataclasses.replace(_CFG, merge="single"))
    merged = blade.BladeMethod(dataclasses.replace(_CFG, merge="lse"))
    np.testing.assert_allclose(
        jax.jit(lambda *a: merged(*a, implementation="xla"))(q, k, v),
        jax.jit(lambda *a: single(*a, implementation="xla"))(q, k, v),
        atol=tolerances.atol(jnp.float32))
    # The merge's gradient flows through the op's log-sum-exp.
    cot = jax.random.normal(jax.random.key(4), q.shape)
    grads = [jax.jit(jax.grad(
        lambda *a, m=m: jnp.vdot(m(*a, implementation="xla"), cot),
        (0, 1, 2)))(q, k, v) for m in (merged, single)]
    for a, b in zip(*grads):
      np.testing.assert_allclose(a, b, atol=tolerances.grad_atol(
          jnp.float32) * 5)

  def test_causal_matches_dense_causal_reference(self):
    """Causal, no global branch: op == dense causal masked attention."""
    cfg = dataclasses.replace(_CFG, causal=True, global_branch=False)
    method = blade.BladeMethod(cfg)
    q, k, v, _ = self.inputs(method)
    mask = np.asarray(method.block_mask(q, k)[0])
    qb, kb = mask.shape[-2:]
    past, crossing = blade.causal_blocks(qb, kb, cfg.block_size,
                                         cfg.block_size)
    np.testing.assert_array_equal(mask[..., ~(past | crossing)], False)
    np.testing.assert_array_equal(mask[..., crossing], True)
    self.assertTrue(np.any(mask[..., past]))
    b = cfg.block_size
    elem = np.repeat(np.repeat(mask, b, -2), b, -1)
    elem &= np.tril(np.ones((_T, _T), bool))
    run = jax.jit(lambda *a: method(*a, implementation="xla"))
    ref = lambda *a: mtb.masked_attention(*a, elem)
    mtb.assert_values_and_grads_close(run, ref, q, k, v)

  def test_causal_has_no_global_branch(self):
    with self.assertRaisesRegex(ValueError, "global_branch=False"):
      blade.BladeMethod(dataclasses.replace(_CFG, causal=True))

  def test_mask_rule_and_clamps(self):
    # 20 blocks; row 0 holds 96% of its mass in 3 blocks, row 1 is flat.
    scores = np.full((2, 20), 1.0, np.float32)
    scores[0] = 0.04 / 17
    scores[0, [3, 7, 11]] = [0.5, 0.3, 0.16]
    scores = jnp.asarray(scores / scores.sum(-1, keepdims=True))
    lo, hi = blade.BladeConfig(min_fraction=0.05,
                               max_fraction=0.17).block_budget(20)
    self.assertEqual((lo, hi), (1, 3))
    keep = selection.cumulative_mass_mask(scores, 0.95, min_blocks=lo,
                                          max_blocks=hi,
                                          include_crossing=False)
    # Row 0: 0.5 + 0.3 < 0.95, crossing at the third block (excluded).
    np.testing.assert_array_equal(np.flatnonzero(keep[0]), [3, 7])
    # Row 1: 95% of a flat row needs 19 blocks, clamped to 3.
    self.assertEqual(int(keep[1].sum()), 3)

  def test_deterministic_and_sparsity(self):
    method = self.make_method()
    q, k, v, _ = self.inputs(method)
    plan_fn = jax.jit(method.plan)
    a, b = plan_fn(q, k, v), plan_fn(q, k, v)
    np.testing.assert_array_equal(a.layout.kv_idx, b.layout.kv_idx)
    sparsity = 1 - float(a.aux["block_mask"].mean()) - 1 / _CFG.pool_size
    self.assertAlmostEqual(float(a.aux["sparsity"]), sparsity, places=6)


if __name__ == "__main__":
  absltest.main()
