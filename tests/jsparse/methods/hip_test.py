"""HiP: tree search on planted data, both paths vs the dense union mask."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import hip
from tests import jaxpr_size
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


def brute_force_search(q, k, config: hip.HiPConfig, q_offset: int):
  """The tree search of the spec, one (batch, head, query block) at a time.

  Returns:
    int [B, Hq, Qb, K] selected block ids, ascending, -1 past the valid ones.
  """
  q, k = np.asarray(q), np.asarray(k)
  b, t, hq, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk, nk = config.block_q, config.block_k, config.num_blocks
  qb = -(-t // bq)
  out = np.full((b, hq, qb, nk), -1)
  for bi, hi, a in np.ndindex(b, hq, qb):
    last = q_offset + min((a + 1) * bq, t)
    n = -(-max(last - config.window - config.sink, 0) // bk)
    start = np.arange(nk) * n // nk
    size = (np.arange(1, nk + 1) * n // nk) - start
    rows = np.minimum(a * bq + np.arange(0, bq, config.query_stride), t - 1)
    queries = q[bi, rows, hi]
    while size.max(initial=0) > 1:
      c_start = np.concatenate([start, start + size // 2])
      c_size = np.concatenate([size // 2, size - size // 2])
      rep = c_start + (c_size // 2 if config.representative == "center"
                       else 0)
      tok = np.minimum(config.sink + rep[:, None] * bk + np.arange(bk), s - 1)
      keys = k[bi, tok, hi // (hq // hkv)]  # [2K, bk, D]
      score = np.einsum("id,cjd->cij", queries, keys).max((1, 2))
      score = np.where(c_size > 0, score, -np.inf)
      # The K best, ties to the lower slot, kept in slot order.
      pick = np.sort(np.argsort(-score, kind="stable")[:nk])
      start, size = c_start[pick], c_size[pick]
    ids = np.sort(start[size > 0])
    out[bi, hi, a, :ids.size] = ids
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

  def test_plan_well_formed(self):
    # RowLayout: a static list length set by the budget, distinct keys.
    method = self.make_method()
    q, k, v, kwargs = self.inputs(method)
    layout = jax.jit(lambda q, k, v: method.plan(q, k, v, **kwargs).layout)(
        q, k, v)
    cfg = self.CONFIG
    self.assertEqual(layout.group_size, cfg.block_q)
    self.assertEqual(layout.max_keys, cfg.sink + cfg.budget + cfg.window
                     + cfg.block_q - 1)
    idx = np.asarray(layout.kv_idx)
    listed = np.asarray(layout.listed()).any(-2)
    keyed = np.where(listed, idx, -1 - np.arange(idx.shape[-1]))
    self.assertFalse(np.any(np.diff(np.sort(keyed, -1), axis=-1) == 0))


class HiPBlockTest(HiPGatherTest):
  CONFIG = _BLOCK
  TRAINS = False
  test_plan_well_formed = mtb.MethodTestBase.test_plan_well_formed

  def test_uses_block_path(self):
    self.assertTrue(self.CONFIG.use_block_path())
    self.assertFalse(_GATHER.use_block_path())


class HiPSearchTest(parameterized.TestCase):

  @parameterized.parameters(
      (_GATHER, 256, 256, 4, 2),
      (hip.HiPConfig(budget=16, block_q=16, block_k=4, sink=3, window=20,
                     representative="first"), 200, 300, 2, 1))
  def test_matches_brute_force(self, config, t, s, hq, hkv):
    # Small integers: exact dot products, so ties are broken the same way.
    kq, kk = jax.random.split(jax.random.key(t + s))
    q = jax.random.randint(kq, (2, t, hq, 8), -2, 3).astype(jnp.float32)
    k = jax.random.randint(kk, (2, s, hkv, 8), -2, 3).astype(jnp.float32)
    mask = jax.jit(lambda q, k: hip.search(q, k, config, q_offset=s - t))(
        q, k)
    got = np.where(mask.valid, mask.block_ids, -1)
    np.testing.assert_array_equal(got, brute_force_search(q, k, config,
                                                          s - t))

  def test_plan_memory_is_t_times_kmax(self):
    t, cfg = 4096, hip.HiPConfig()
    method = hip.HiPMethod(cfg)
    q, k = (jax.ShapeDtypeStruct((1, t, h, 16), jnp.float32) for h in (2, 1))
    size, shape, prim = jaxpr_size.largest_intermediate(
        lambda q, k: method.plan(q, k, k).layout, q, k)
    # At most the row mask: T x Kmax per query head, Kmax constant in T.
    kmax = cfg.sink + cfg.budget + cfg.window + cfg.block_q - 1
    self.assertLessEqual(size, 2 * t * kmax, f"{prim} {shape}")

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
