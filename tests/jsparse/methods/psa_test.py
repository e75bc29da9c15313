"""PSA: pooled levels == softmax over repeat-P keys, level rules, dense."""

from __future__ import annotations

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import blade
from jsparse.methods import psa
from tests import tolerances
from tests.jsparse.methods import method_test_base as mtb

_B, _T, _H, _D = 1, 128, 2, 16
_CFG = psa.PSAConfig(block_q=32, block_kv=32, tile_kv=None)


def _expanded_reference(q, k, v, levels, config):
  """Dense softmax over explicitly built keys: level-P blocks are the
  P-pooled keys each repeated P times (no bias needed). A repeated key keeps
  the position of the token it repeats, so with `config.causal` query i sees
  copies of positions j <= i only."""
  b, s, h, d = k.shape
  bn = config.block_kv
  levels = np.asarray(levels)  # [B, H, Qb, Kb]
  causal = np.tril(np.ones((q.shape[1], s), bool)) if config.causal else True
  ks, vs, masks = [], [], []
  for level in config.levels:
    pk = k.reshape(b, s // level, level, h, d).mean(2)
    pv = v.reshape(b, s // level, level, h, d).mean(2)
    ks.append(jnp.repeat(pk, level, axis=1))
    vs.append(jnp.repeat(pv, level, axis=1))
    cols = np.repeat(levels == level, bn, -1)
    masks.append(np.repeat(cols, config.block_q, -2) & causal)
  return mtb.masked_attention(q, jnp.concatenate(ks, 1),
                              jnp.concatenate(vs, 1),
                              np.concatenate(masks, -1))


class PSATest(mtb.MethodTestBase):

  def make_method(self):
    return psa.PSAMethod(_CFG)

  def dense_method(self):
    return psa.PSAMethod(psa.PSAConfig(block_q=32, block_kv=32,
                                       thresholds=(1.0,) * 4))

  def inputs(self, method):
    return (*mtb.random_qkv(1, _B, _T, _T, _H, _H, _D), {})

  def test_matches_dense_reference(self):
    """Random level maps: op == repeat-P dense reference; values, grads."""
    q, k, v, _ = self.inputs(None)
    rng = np.random.default_rng(0)
    levels = rng.choice([0, 1, 2, 4, 8], size=(_B, _H, 4, 4))
    levels[..., 0] = 1  # no empty rows
    run = jax.jit(lambda q, k, v: psa.pyramid_plan(k, v, levels, _CFG).attend(
        q, k, v, implementation="xla"))
    ref = lambda *a: _expanded_reference(*a, levels, _CFG)
    mtb.assert_values_and_grads_close(run, ref, q, k, v)

  @parameterized.parameters("thresholdbound", "topk")
  def test_method_matches_its_levels(self, mode):
    # thresholdbound calls `plan`; topk runs one call per level.
    cfg = dataclasses.replace(_CFG, mode=mode, fractions=(0.25,) * 4)
    method = psa.PSAMethod(cfg)
    q, k, v, _ = self.inputs(method)
    plan = jax.jit(method.plan)(q, k, v)
    out = jax.jit(lambda *a: method(*a, implementation="xla"))(q, k, v)
    np.testing.assert_allclose(
        out, _expanded_reference(q, k, v, plan.aux["levels"], cfg),
        atol=tolerances.atol(jnp.float32) * 5)
    again = jax.jit(method.plan)(q, k, v)
    np.testing.assert_array_equal(plan.aux["levels"], again.aux["levels"])

  def test_thresholdbound_bands(self):
    # One row of 10 blocks, sorted masses 0.4, 0.2, 0.1, 0.1, 0.05 x 4.
    row = jnp.asarray([[0.05, 0.4, 0.05, 0.1, 0.2, 0.05, 0.1, 0.05, 0, 0]])
    cfg = psa.PSAConfig(block_kv=128, tile_kv=None,
                        thresholds=(0.5, 0.6, 0.7, 0.8),
                        min_level1_fraction=0.0)
    got = np.asarray(psa.level_map(row, cfg))[0]
    # Cumulative 0.4, 0.6, 0.7, 0.8, 0.85, ...: P=1 keeps ranks 0-1 (the
    # crossing block included), P=2 rank 2, P=4 rank 3, P=8 rank 4.
    np.testing.assert_array_equal(got, [8, 1, 0, 2, 1, 0, 4, 0, 0, 0])

  def test_topk_counts_and_tile_alignment(self):
    scores = jax.random.uniform(jax.random.key(0), (3, 40))
    cfg = psa.PSAConfig(block_kv=64, tile_kv=32, mode="topk",
                        fractions=(0.1, 0.05, 0.1, 0.2))
    got = np.asarray(psa.level_map(scores, cfg))
    # Ends int(40 * cumsum) = 4, 6, 10, 18; alignment ceil(P / 2) = 1, 1,
    # 2, 4: level 8's band [10, 18) has length 8, already aligned.
    for level, count in ((1, 4), (2, 2), (4, 4), (8, 8)):
      np.testing.assert_array_equal((got == level).sum(-1), count)
    cfg = psa.PSAConfig(block_kv=64, tile_kv=32, mode="topk",
                        fractions=(0.1, 0.05, 0.1, 0.15))
    got = np.asarray(psa.level_map(scores, cfg))
    np.testing.assert_array_equal((got == 8).sum(-1), 8)  # 6 rounded up

  @parameterized.parameters((32, 32), (32, 16))
  def test_causal_matches_dense_causal_reference(self, block_q, block_kv):
    """Causal: values and gradients of the op == causal repeat-P reference."""
    cfg = dataclasses.replace(_CFG, block_q=block_q, block_kv=block_kv,
                              mode="topk", fractions=(0.25,) * 4,
                              causal=True)
    method = psa.PSAMethod(cfg)
    q, k, v, _ = self.inputs(method)
    levels = np.asarray(jax.jit(method.plan)(q, k, v).aux["levels"])
    past, crossing = blade.causal_blocks(*levels.shape[-2:], block_q,
                                         block_kv)
    np.testing.assert_array_equal(levels[..., ~(past | crossing)], 0)
    np.testing.assert_array_equal(levels[..., crossing], 1)
    self.assertTrue(np.any(levels[..., past] > 1))  # pooled past blocks
    run = jax.jit(lambda *a: method(*a, implementation="xla"))
    ref = lambda *a: _expanded_reference(*a, levels, cfg)
    mtb.assert_values_and_grads_close(run, ref, q, k, v)

  def test_causal_needs_self_attention(self):
    method = psa.PSAMethod(dataclasses.replace(_CFG, causal=True))
    q, k, v, _ = self.inputs(method)
    with self.assertRaisesRegex(ValueError, "self-attention"):
      method.plan(q, k[:, :64], v[:, :64])

  def test_no_block_kept_gives_empty_rows(self):
    # topk keeps floor(Kb * fraction) blocks: none of a 2 x 2 grid. The call
    # takes the single-layout path and returns the empty rows' zeros.
    method = psa.PSAMethod(psa.PSAConfig(mode="topk"))
    self.assertEqual(sum(method.level_capacities(2, 2)), 0)
    q, k, v = mtb.random_qkv(0, 1, 256, 256, 2, 2, 32)
    np.testing.assert_array_equal(method(q, k, v, implementation="xla"), 0.0)

  def test_level_one_everywhere_is_dense(self):
    q, k, v, _ = self.inputs(None)
    levels = np.ones((1, 1, 4, 4), int)
    out = psa.pyramid_plan(k, v, levels, _CFG).attend(q, k, v)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v),
                               atol=tolerances.atol(jnp.float32))


if __name__ == "__main__":
  absltest.main()
