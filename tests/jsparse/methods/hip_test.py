"""HiP: tree search on planted data, both paths vs the dense union mask."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import hip
from tests.jsparse.methods import method_test_base as mtb

_B, _T, _HQ, _HKV, _D = 1, 256, 4, 2, 16
_GATHER = hip.HiPConfig(budget=32, block_q=32, block_k=2, sink=4, window=40)
_BLOCK = hip.HiPConfig(budget=32, block_q=32, block_k=16, sink=16,
                       window=48)


def union_mask(mask: hip.HiPMask, config: hip.HiPConfig, t: int, s: int):
  """bool [B, Hq, T, S]: sink | selected tokens | window, causal (loops)."""
  ids, valid = np.asarray(mask.block_ids), np.asarray(mask.valid)
  b, h = ids.shape[:2]
  out = np.zeros((b, h, t, s), bool)
  for r in range(t):
    pos = s - t + r
    out[:, :, r, :min(config.sink, pos + 1)] = True
    out[:, :, r, max(pos - config.window + 1, 0):pos + 1] = True
    a = r // config.block_q
    for bi in range(b):
      for hi in range(h):
        for m in ids[bi, hi, a][valid[bi, hi, a]]:
          lo = config.sink + m * config.block_k
          out[bi, hi, r, lo:min(lo + config.block_k, pos + 1)] = True
  return out


class HiPGatherTest(mtb.MethodTestBase):

  CONFIG = _GATHER
  TRAINS = True  # healing: gradients through the gathered attention

  def make_method(self):
    return hip.HiPMethod(self.CONFIG)

  def inputs(self, method):
    return (*mtb.random_qkv(2, _B, _T, _T, _HQ, _HKV, _D), {})

  def logical_mask(self, method, q, k, kwargs):
    mask = jax.jit(lambda q, k: hip.search(q, k, method.config))(q, k)
    return union_mask(mask, method.config, q.shape[1], k.shape[1])

  def dense_method(self):
    # Budget beyond the sequence: every searchable block is selected.
    return hip.HiPMethod(
        hip.HiPConfig(**{**self.CONFIG.__dict__, "budget": 4 * _T}))

  def dense_mask(self, method, q, k, kwargs):
    return np.tril(np.ones((1, 1, _T, _T), bool))


class HiPBlockTest(HiPGatherTest):
  CONFIG = _BLOCK
  TRAINS = False

  def test_uses_block_path(self):
    self.assertTrue(self.CONFIG.use_block_path())
    self.assertFalse(_GATHER.use_block_path())


class HiPSearchTest(parameterized.TestCase):

  @parameterized.parameters("center", "first")
  def test_monotone_scores_give_exact_topk(self, representative):
    # Key-block score increasing with position: the true top-K are the last
    # K blocks of each query block's search range.
    cfg = hip.HiPConfig(budget=8, block_q=16, block_k=2, sink=0, window=16,
                        representative=representative)
    t, d = 256, 4
    q = jnp.ones((1, t, 1, d))
    k = jnp.broadcast_to(jnp.linspace(0.0, 1.0, t)[None, :, None, None],
                         (1, t, 1, d))
    mask = hip.search(q, k, cfg)
    for a in range(t // cfg.block_q):
      n = -(-((a + 1) * cfg.block_q - cfg.window) // cfg.block_k)
      want = np.arange(max(n - cfg.num_blocks, 0), max(n, 0))
      got = np.asarray(mask.block_ids[0, 0, a])[
          np.asarray(mask.valid[0, 0, a])]
      np.testing.assert_array_equal(got, want)

  def test_planted_peaks_are_found(self):
    # Attention locality: one smooth bump of distinct height per initial
    # node (136 blocks, K = 4), narrow enough that the true top-4 blocks
    # are the bump centres.
    cfg = hip.HiPConfig(budget=8, block_q=16, block_k=2, sink=0, window=16)
    t, d = 288, 4
    blocks = np.arange((t - cfg.window) // cfg.block_k)
    centres, heights = [20, 50, 90, 120], [1.0, 0.9, 0.95, 0.92]
    score = np.max([h * np.exp(-((blocks - c) / 2.0) ** 2)
                    for c, h in zip(centres, heights)], axis=0)
    per_token = np.zeros(t)
    per_token[:blocks.size * 2] = np.repeat(score, 2)
    k = jnp.asarray(per_token)[None, :, None, None] * jnp.ones((1, t, 1, d))
    q = jnp.ones((1, t, 1, d))
    mask = hip.search(q, k, cfg)
    last = np.asarray(mask.block_ids[0, 0, -1])[np.asarray(
        mask.valid[0, 0, -1])]
    np.testing.assert_array_equal(last, centres)

  def test_decode_reuses_mask_between_refreshes(self):
    cfg = hip.HiPConfig(budget=8, block_q=16, block_k=2, sink=2, window=16,
                        refresh_every=4)
    method = hip.HiPMethod(cfg)
    q, k, v = mtb.random_qkv(3, 1, 1, 128, 2, 2, 8)
    step = jax.jit(lambda i, m: method.decode_plan(q, k, v, index=i, mask=m))
    first = jax.jit(lambda i: method.decode_plan(q, k, v, index=i))(
        jnp.int32(100))
    decode_cfg = hip.HiPConfig(**{**cfg.__dict__, "block_q": 1,
                                  "query_stride": 1})
    for index, reused in ((101, True), (104, False)):
      plan = step(jnp.int32(index), first.aux["mask"])
      want = first.aux["mask"] if reused else hip.search(
          q, k, decode_cfg, q_offset=index)
      np.testing.assert_array_equal(plan.aux["mask"].block_ids,
                                    want.block_ids)
      ref = mtb.masked_attention(
          q, k[:, :index + 1], v[:, :index + 1],
          union_mask(plan.aux["mask"], decode_cfg, 1, index + 1))
      np.testing.assert_allclose(plan.attend(q, k, v), ref, atol=1e-4)


if __name__ == "__main__":
  absltest.main()
