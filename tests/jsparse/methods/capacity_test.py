"""List capacities (Kmax) of the methods' layouts.

Static methods build their layouts on the host, where Kmax is the longest
row. Dynamic methods build them under jit with the static capacity their
docstrings document, below Kb wherever the budget is, and no row is cut.
"""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import blade
from jsparse.methods import hmar
from jsparse.methods import llsa
from jsparse.methods import moa
from jsparse.methods import pemf
from jsparse.methods import psa
from jsparse.methods import radial
from jsparse.methods import setrec
from jsparse.methods import swinbert
from tests.jsparse.methods import method_test_base as mtb


def _qkv(t, heads=2, d=8, b=1, s=None):
  return mtb.random_qkv(0, b, t, t if s is None else s, heads, heads, d)


def _static_cases():
  """name -> (method, t, plan kwargs)."""
  hmar_cfg = hmar.HMARConfig(patch_nums=(1, 2, 3, 4, 5), block_q=16,
                             block_kv=16)
  setrec_cfg = setrec.SETRecConfig(block_q=8, block_kv=8)
  item_valid = jnp.asarray(np.arange(setrec_cfg.num_items) >= 3)[None]
  return {
      "hmar": (hmar.HMARMethod(hmar_cfg), hmar_cfg.seq_len, {}),
      "setrec_padded": (setrec.SETRecMethod(setrec_cfg), setrec_cfg.seq_len,
                        {"item_valid": item_valid}),
      "radial": (radial.RadialMethod(radial.RadialConfig(
          num_frames=4, tokens_per_frame=64, block_size=32)), 256, {}),
      "moa": (moa.MoAMethod(moa.MoAConfig(
          alphas=(0.0, 0.0), betas=(0.5, 0.25), block_size=16,
          sink_tokens=16, min_span=32)), 128, {}),
  }


class HostCapacityTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(n, n) for n in _static_cases()])
  def test_static_layout_is_host_with_exact_kmax(self, name):
    method, t, kwargs = _static_cases()[name]
    layout = method.plan(*_qkv(t), **kwargs).layout
    self.assertTrue(layout.is_host)
    self.assertEqual(layout.max_kv_blocks, int(layout.kv_cnt.max()))

  def test_pemf_without_point_mask_is_host(self):
    q, k, v = mtb.random_qkv(0, 2, 20, 5, 2, 2, 8)
    plan = pemf.PEMFMethod(pemf.PEMFConfig(block_q=8)).plan(
        q, k, v, visible=jnp.ones((2, 5), bool))
    self.assertTrue(plan.layout.is_host)
    self.assertEqual(plan.layout.max_kv_blocks, 1)


def _traced_layout(method, q, k, v, **kwargs):
  plan = jax.jit(lambda q, k, v: method.plan(q, k, v, **kwargs))(q, k, v)
  return plan, jax.tree.map(np.asarray, plan.layout)


def _psa_entries(levels, config):
  """Layout blocks each row lists for a (non-causal) level map."""
  top = config.levels[-1]
  return sum((np.asarray(levels) == p).sum(-1) * (top // p)
             for p in config.levels)


class TracedCapacityTest(parameterized.TestCase):

  @parameterized.parameters("topk", "thresholdbound")
  def test_psa(self, mode):
    method = psa.PSAMethod(psa.PSAConfig(mode=mode, block_q=32, block_kv=32))
    plan, layout = _traced_layout(method, *_qkv(1024))
    qb, kb = plan.aux["levels"].shape[-2:]
    self.assertEqual(layout.max_kv_blocks, method.capacity(qb, kb))
    self.assertLess(layout.max_kv_blocks, kb * 8)  # S / layout block
    entries = _psa_entries(plan.aux["levels"], method.config)
    np.testing.assert_array_equal(layout.kv_cnt, entries)  # nothing cut
    if mode == "topk":  # every row has exactly the rule's count
      np.testing.assert_array_equal(entries, layout.max_kv_blocks)

  def test_psa_thresholdbound_bound_holds_for_flat_rows(self):
    # Flat rows reach the deepest band ends the thresholds allow.
    config = psa.PSAConfig()
    scores = jnp.full((1, 1, 4, 64), 1 / 64)
    levels = jax.jit(psa.level_map, static_argnums=1)(scores, config)
    entries = _psa_entries(levels, config)
    capacity = psa.PSAMethod(config).capacity(4, 64)
    self.assertTrue(np.all(entries <= capacity))
    self.assertGreater(entries.min(), 0.9 * capacity)

  def test_psa_causal(self):
    method = psa.PSAMethod(psa.PSAConfig(mode="topk", block_q=32,
                                         block_kv=32, causal=True))
    plan, layout = _traced_layout(method, *_qkv(1024))
    qb, kb = plan.aux["levels"].shape[-2:]
    self.assertEqual(layout.max_kv_blocks, method.capacity(qb, kb))
    # Causal rows list the rule's blocks or fewer (future ones dropped);
    # the last rows, whose past is everything, list exactly the capacity.
    self.assertTrue(np.all(layout.kv_cnt <= layout.max_kv_blocks))
    np.testing.assert_array_equal(layout.kv_cnt[..., -1],
                                  layout.max_kv_blocks)

  @parameterized.parameters(False, True)
  def test_blade(self, causal):
    method = blade.BladeMethod(blade.BladeConfig(
        block_size=32, causal=causal, global_branch=not causal))
    plan, layout = _traced_layout(method, *_qkv(1024))
    kb = plan.aux["block_mask"].shape[-1]
    pooled = 0 if causal else 2  # ceil(1024 / 30 / 32) pooled blocks
    self.assertEqual(layout.max_kv_blocks, method.capacity(kb) + pooled)
    self.assertEqual(method.capacity(kb), int(0.17 * kb))
    np.testing.assert_array_equal(
        layout.kv_cnt, np.asarray(plan.aux["block_mask"]).sum(-1) + pooled)

  def test_llsa(self):
    plan, layout = _traced_layout(llsa.LLSAMethod(), *_qkv(1024))
    # 8 fine picks + every level-1 pooled block (64 keys of 16).
    self.assertEqual(layout.max_kv_blocks, 8 + 4)
    self.assertEqual(layout.num_kv_blocks, 64 + 4)
    np.testing.assert_array_equal(layout.kv_cnt, 12)
    self.assertLen(plan.aux["picks"], 1)

  def test_learned_masks_have_kb_slots(self):
    # SwinBERT's hard mask is learned (no budget): Kmax = Kb.
    config = swinbert.SwinBERTConfig(num_caption=8, num_video=24,
                                     block_size=8)
    method = swinbert.SwinBERTMethod(config, rngs=nnx.Rngs(0))
    _, layout = _traced_layout(method, *_qkv(32), hard=True)
    self.assertEqual(layout.max_kv_blocks, layout.num_kv_blocks)
    # PEMF's point mask: one kv block holds all points.
    q, k, v = mtb.random_qkv(0, 2, 20, 5, 2, 2, 8)
    _, layout = _traced_layout(
        pemf.PEMFMethod(pemf.PEMFConfig(block_q=8)), q, k, v,
        visible=jnp.ones((2, 5), bool), allowed=jnp.ones((2, 20, 5), bool))
    self.assertEqual(layout.max_kv_blocks, 1)


if __name__ == "__main__":
  absltest.main()
