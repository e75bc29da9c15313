"""LLSA against an explicit dense reference over raw + pooled keys."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from jsparse.methods import llsa
from tests import tolerances


def _pool(x, bs):
  """[B, N, H, D] -> [B, N / bs, H, D] by reshape-mean."""
  b, n, h, d = x.shape
  return x.reshape(b, n // bs, bs, h, d).mean(2)


def _naive_picks(q_levels, k_levels, topk, bs):
  """Hierarchical top-k with dense masked score matrices (NumPy)."""
  def scores(q, k):
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    return np.einsum("bqhd,bkhd->bhqk", q, k)

  def top(s, k):
    return np.argsort(-s, axis=-1, kind="stable")[..., :k]

  levels = len(q_levels)
  picks = [None] * levels
  picks[-1] = top(scores(q_levels[-1], k_levels[-1]), topk[-1])
  for lvl in range(levels - 2, -1, -1):
    s = scores(q_levels[lvl], k_levels[lvl])
    allowed = np.zeros(s.shape, bool)
    parent = picks[lvl + 1]
    m = np.arange(s.shape[2])
    for slot in range(parent.shape[-1]):
      coarse = parent[:, :, m // bs, slot]  # [B, H, M]
      for child in range(bs):
        np.put_along_axis(allowed, (coarse * bs + child)[..., None], True,
                          axis=-1)
    picks[lvl] = top(np.where(allowed, s, -np.inf), topk[lvl])
  return picks


def _reference(q, k, v, picks, bs):
  """Dense softmax over [k ; k_1 ; ... ; k_L] with the LLSA visibility.

  Query token i (block m = i // bs) sees the raw keys of its level-1 picks,
  the pooled level-l children of the level-(l+1) picks of its ancestor, and
  all level-L keys; level-l keys carry + l * log(bs).
  """
  levels = len(picks)
  b, n, hq, d = q.shape
  ks, vs, bias, masks = [k], [v], [np.zeros(n)], []
  pk, pv = k, v
  for lvl in range(1, levels + 1):
    pk, pv = _pool(pk, bs), _pool(pv, bs)
    ks.append(pk)
    vs.append(pv)
    bias.append(np.full(pk.shape[1], lvl * np.log(bs)))
  m = np.arange(n) // bs  # query block of each token
  for lvl in range(levels):
    size = ks[lvl].shape[1]
    mask = np.zeros((b, hq, n, size), bool)
    chosen = np.asarray(picks[lvl])[:, :, m // bs**lvl]  # [B, H, N, K]
    for slot in range(chosen.shape[-1]):
      for child in range(bs):
        np.put_along_axis(mask, (chosen[..., slot] * bs + child)[..., None],
                          True, axis=-1)
    masks.append(mask)
  masks.append(np.ones((b, hq, n, ks[-1].shape[1]), bool))
  mask = np.concatenate(masks, -1)
  kk = jnp.repeat(jnp.concatenate(ks, 1), hq // k.shape[2], axis=2)
  vv = jnp.repeat(jnp.concatenate(vs, 1), hq // k.shape[2], axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(d)
  s = jnp.where(mask, s + np.concatenate(bias)[None, None, None], -jnp.inf)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), vv)


def _inputs(seed, n, hq=2, hkv=2, d=16, b=1):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, n, hq, d)),
          jax.random.normal(kk, (b, n, hkv, d)),
          jax.random.normal(kv, (b, n, hkv, d)))


class LLSATest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_call_matches_reference_with_and_without_jit(self):
    # GQA, three levels; the picks come from the jitted plan.
    method = llsa.LLSAMethod(llsa.LLSAConfig(num_levels=3, block_size=4,
                                             topk=(3, 2, 2)))
    q, k, v = _inputs(0, 256, 4, 2, 16)
    picks = jax.jit(method.plan)(q, k, v).aux["picks"]
    got = self.variant(lambda q, k, v: method(q, k, v,
                                              implementation="xla"))(q, k, v)
    want = _reference(q, k, v, [np.asarray(p) for p in picks], 4)
    chex.assert_shape(got, q.shape)
    chex.assert_trees_all_close(got, want, atol=tolerances.atol(q.dtype),
                                rtol=tolerances.atol(q.dtype))

  @parameterized.named_parameters(
      ("l1", 512, 16, 1, 4, 2, 2, 32, "lse"),
      ("l2", 1024, 16, 2, (4, 2), 2, 2, 16, "lse"),
      ("l3_gqa", 256, 4, 3, (3, 2, 2), 4, 2, 16, "lse"),
      ("l2_single", 1024, 16, 2, (4, 2), 2, 2, 16, "single"),
  )
  def test_matches_reference_values_and_grads(self, n, bs, levels, topk, hq,
                                              hkv, d, merge):
    method = llsa.LLSAMethod(llsa.LLSAConfig(num_levels=levels,
                                             block_size=bs, topk=topk,
                                             merge=merge))
    q, k, v = _inputs(0, n, hq, hkv, d)
    plan = jax.jit(method.plan)(q, k, v)
    jax.tree.map(np.asarray, plan.layout).validate()
    q_levels, k_levels = [q], [k]
    for _ in range(levels):
      q_levels.append(_pool(q_levels[-1], bs))
      k_levels.append(_pool(k_levels[-1], bs))
    topks = method.config.topk_per_level(levels)
    want = _naive_picks([np.asarray(x) for x in q_levels[1:]],
                        [np.asarray(x) for x in k_levels[1:]], topks, bs)
    for got, ref in zip(plan.aux["picks"], want):
      np.testing.assert_array_equal(np.sort(got, -1), np.sort(ref, -1))

    run = jax.jit(lambda q, k, v: method(q, k, v, implementation="xla"))
    ref_fn = jax.jit(lambda q, k, v: _reference(q, k, v, want, bs))
    out = run(q, k, v)
    atol = tolerances.atol(jnp.float32)
    np.testing.assert_allclose(out, ref_fn(q, k, v), atol=atol, rtol=atol)
    cot = jax.random.normal(jax.random.key(1), out.shape)
    g_op = jax.jit(jax.grad(lambda *a: jnp.vdot(run(*a), cot),
                            (0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.vdot(ref_fn(*a), cot),
                             (0, 1, 2)))(q, k, v)
    for a, b in zip(g_op, g_ref):
      np.testing.assert_allclose(a, b, atol=tolerances.grad_atol(jnp.float32),
                                 rtol=tolerances.grad_atol(jnp.float32))

  @parameterized.named_parameters(("l1", 256, 1), ("l2", 256, 2))
  def test_full_topk_is_dense_over_raw_and_pooled(self, n, levels):
    bs = 16
    topk = tuple(n // bs**lvl for lvl in range(1, levels + 1))
    method = llsa.LLSAMethod(llsa.LLSAConfig(num_levels=levels, topk=topk))
    q, k, v = _inputs(2, n)
    out = jax.jit(lambda q, k, v: method(q, k, v, implementation="xla"))(
        q, k, v)
    ks, vs, bias = [k], [v], [np.zeros(n)]
    for lvl in range(1, levels + 1):
      ks.append(_pool(ks[-1], bs))
      vs.append(_pool(vs[-1], bs))
      bias.append(np.full(n // bs**lvl, lvl * np.log(bs)))
    s = jnp.einsum("bthd,bshd->bhts", q, jnp.concatenate(ks, 1)) / 4.0
    p = jax.nn.softmax(s + np.concatenate(bias)[None, None, None], -1)
    ref = jnp.einsum("bhts,bshd->bthd", p, jnp.concatenate(vs, 1))
    atol = tolerances.atol(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=atol)

  def test_no_gradient_reaches_the_selection(self):
    method = llsa.LLSAMethod(llsa.LLSAConfig(num_levels=1, topk=2))
    q, k, v = _inputs(3, 256)
    # The picks are integer and cut from the graph: grad of a function of
    # the pooled scores alone through the plan is zero.
    grads = jax.jit(jax.grad(lambda q: jnp.sum(
        method.plan(q, k, v).aux["picks"][0].astype(jnp.float32))))(q)
    np.testing.assert_array_equal(grads, 0.0)

  def test_zorder_round_trip_and_patches(self):
    for side in (1, 2, 8, 32):
      perm, inverse = llsa.zorder_permutation(side)
      np.testing.assert_array_equal(perm[inverse], np.arange(side * side))
      np.testing.assert_array_equal(np.sort(perm), np.arange(side * side))
    perm, _ = llsa.zorder_permutation(32)
    rows, cols = np.divmod(perm, 32)
    # Block 0 (16 tokens) is the 4x4 patch (0..3) x (0..3); every 256-token
    # block is a 16x16 patch.
    self.assertEqual(set(zip(rows[:16], cols[:16])),
                     {(r, c) for r in range(4) for c in range(4)})
    for block in range(4):
      r = rows[256 * block:256 * (block + 1)]
      c = cols[256 * block:256 * (block + 1)]
      self.assertEqual((r.max() - r.min(), c.max() - c.min()), (15, 15))
    with self.assertRaises(ValueError):
      llsa.zorder_permutation(12)

  def test_layout_and_extras(self):
    method = llsa.LLSAMethod(llsa.LLSAConfig(num_levels=2, topk=(8, 2)))
    q, k, v = _inputs(4, 1024)
    plan = jax.jit(method.plan)(q, k, v)
    layout = plan.layout
    # 8 fine blocks, 2 level-1 blocks, 1 (ragged) level-2 block.
    self.assertEqual(layout.kv_idx.shape, (1, 2, 64, 11))
    self.assertEqual(layout.num_kv_blocks, 64 + 4 + 1)
    self.assertEqual(plan.extra_k.shape, (1, 64 + 4, 2, 16))
    idx = np.asarray(layout.kv_idx)
    self.assertTrue(np.all(np.diff(idx, axis=-1) > 0))
    bias = np.asarray(plan.bias_k)[0, 0]
    np.testing.assert_allclose(bias[:1024], 0.0)
    np.testing.assert_allclose(bias[1024:1088], np.log(16), rtol=1e-6)
    np.testing.assert_allclose(bias[1088:], np.log(256), rtol=1e-6)

  def test_auto_levels_and_errors(self):
    config = llsa.LLSAConfig()
    self.assertEqual(config.levels(1024), 1)
    self.assertEqual(config.levels(16384), 2)
    self.assertIs(jsparse.METHODS["llsa"], llsa.LLSAMethod)
    q, k, v = _inputs(5, 1000)
    with self.assertRaisesRegex(ValueError, "divisible"):
      jax.eval_shape(llsa.LLSAMethod().plan, q, k, v)
    with self.assertRaisesRegex(ValueError, "entries"):
      llsa.LLSAConfig(topk=(1, 2)).topk_per_level(1)


if __name__ == "__main__":
  absltest.main()
