"""Row-sparse attention (a RowLayout through the op) against dense oracles."""

import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import base
from pallas_kernels import RowLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import row_sparse
from tests import jaxpr_size
from tests import tolerances
from tests.pallas_kernels import row_layout_test
from tests.pallas_kernels.block_sparse_attention import test_base


def random_qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32):
  """q [B, T, Hq, D], k and v [B, S, Hkv, D] drawn by NumPy.

  (jax.random compiles anew for every shape, seconds each on this CPU.)
  """
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))


def random_bias(seed, bb, hb, s):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((bb, hb, s), np.float32))


def random_row_layout(seed, bl, hl, t, s, kmax, group_size=1,
                      row_ranges=False, empty_groups=0):
  """Host layout with distinct random keys; the first groups may be empty."""
  qg = -(-t // group_size)
  idx, cnt = row_layout_test.random_lists(seed, bl, hl, qg, kmax, s)
  cnt[:, :, :empty_groups] = 0
  ranges = {}
  if row_ranges:
    ranges = row_layout_test.random_row_ranges(seed + 1, idx.shape,
                                               group_size)
  return RowLayout.from_indices(idx, cnt, num_keys=s, group_size=group_size,
                                **ranges)


class RowSparseAttentionTest(parameterized.TestCase):
  """The gather path ("xla") against the dense reference on the same lists.

  Tests comparing with the reference share q's shape [2, 37, 4, 8], so the
  random cotangents of `assert_matches_reference` compile once.
  """

  IMPLEMENTATION = "xla"
  INTERPRET = False
  # The backend-independent checks of the block op, reused as they are
  # (not by inheritance, which would rerun its block-layout tests).
  attention = test_base.BlockSparseAttentionTestBase.attention
  reference = test_base.BlockSparseAttentionTestBase.reference
  assert_matches_reference = (
      test_base.BlockSparseAttentionTestBase.assert_matches_reference)
  assert_bf16_error_bounded = (
      test_base.BlockSparseAttentionTestBase.assert_bf16_error_bounded)

  # Every layout head count, group sizes with row ranges, and every bias
  # shape: [B|1, Hq|Hkv|1, S] (Hkv with per-q-head lists is repeated).
  # Per-q-head lists of group 1 put the keys first (`_rows_dot_keys`).
  @parameterized.parameters(
      ("shared", 1, jnp.float32, (1, 1)), ("kv", 4, jnp.float32, (2, 2)),
      ("q", 4, jnp.float32, (1, 2)), ("q", 1, jnp.bfloat16, (2, 4)),
      ("kv", 4, jnp.bfloat16, (1, 4)), ("q", 1, jnp.float32, (1, 4)))
  def test_random_lists(self, heads, group_size, dtype, bias_shape):
    b, t, s, hq, hkv, d = 2, 37, 29, 4, 2, 8
    q, k, v = random_qkv(0, b, t, s, hq, hkv, d, dtype)
    layout = random_row_layout(1, b, test_base.layout_heads(heads, hq, hkv),
                               t, s, 7, group_size, row_ranges=group_size > 1,
                               empty_groups=1)
    bias = random_bias(2, *bias_shape, s)
    self.assert_matches_reference(q, k, v, layout, bias_k=bias.astype(dtype))

  def test_negative_causal_offset(self):
    # Positive offset: test_many_chunks; zero: test_segment_ids_and_softcap.
    q, k, v = random_qkv(6, 2, 37, 48, 4, 1, 8)
    layout = random_row_layout(7, 1, 1, 37, 48, 12)
    self.assert_matches_reference(q, k, v, layout, causal=True,
                                  causal_offset=-6)

  def test_segment_ids_and_softcap(self):
    b, t, s = 2, 37, 37
    q, k, v = random_qkv(8, b, t, s, 4, 2, 8)
    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=-1).astype(np.int32)
    layout = random_row_layout(9, b, 2, t, s, 10, group_size=2)
    self.assert_matches_reference(3.0 * q, k, v, layout, q_segment_ids=seg,
                                  kv_segment_ids=seg, causal=True,
                                  softcap=4.0, sm_scale=0.5)

  def test_many_chunks(self):
    # A tiny chunk budget splits the groups over many scan steps.
    q, k, v = random_qkv(10, 2, 37, 33, 4, 1, 8)
    layout = random_row_layout(11, 2, 1, 37, 33, 6, group_size=2,
                               row_ranges=True)
    bias = random_bias(12, 2, 1, 33)
    geo = row_sparse._geometry(q, k, layout, None)
    self.assertEqual(geo.num_chunks, 1)
    with mock.patch.object(row_sparse, "_CHUNK_ELEMENTS", 500):
      geo = row_sparse._geometry(q, k, layout, None)
      self.assertEqual((geo.num_chunks, geo.chunk), (4, 5))
      self.assert_matches_reference(q, k, v, layout, bias_k=bias,
                                    causal=True, causal_offset=3)

  @parameterized.named_parameters(
      # Two of the four (batch, head) slabs per step, each slab in 10 steps.
      ("row_chunks", 160, 4, (10, 2, 2)),
      # A slab's whole rows in one step, two slabs per step.
      ("whole_slabs", 3200, 4, (1, 19, 2)),
  )
  def test_slabs_per_step(self, chunk_elements, min_lists, want):
    # Lists of kv heads with GQA, broadcast over the batch: each step takes
    # its slabs' lists, keys and bias at their own (batch, head).
    q, k, v = random_qkv(10, 2, 37, 33, 4, 2, 8)
    layout = random_row_layout(11, 1, 2, 37, 33, 5, group_size=2,
                               row_ranges=True, empty_groups=2)
    bias = random_bias(12, 2, 4, 33)
    q_seg = np.repeat(np.arange(2, dtype=np.int32), [20, 17])[None]
    q_seg = np.concatenate([q_seg, q_seg[:, ::-1]])
    kv_seg = q_seg[:, :33]
    with mock.patch.multiple(row_sparse, _CHUNK_ELEMENTS=chunk_elements,
                             _MIN_STEP_LISTS=min_lists):
      geo = row_sparse._geometry(q, k, layout, None)
      self.assertEqual((geo.num_chunks, geo.chunk, geo.slabs), want)
      self.assert_matches_reference(q, k, v, layout, bias_k=bias,
                                    q_segment_ids=q_seg,
                                    kv_segment_ids=kv_seg, causal=True)

  def test_equals_dot_product_attention(self):
    # Every row lists its own position, so no row is empty (jax.nn gives
    # empty rows the mean of v, not 0).
    b, t, hq, hkv = 1, 48, 4, 2
    q, k, v = random_qkv(13, b, t, t, hq, hkv, 16)
    rng = np.random.default_rng(14)
    idx = np.stack([
        np.concatenate([[i], rng.permutation(np.delete(np.arange(t), i))[:10]])
        for i in range(t)])
    layout = RowLayout.from_indices(idx[None, None], num_keys=t)
    out = jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, layout, causal=True))(q, k, v)
    mask = layout.to_dense_mask(t, t)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    chex.assert_trees_all_close(out, want, atol=tolerances.atol(q.dtype))

  def test_empty_rows_and_nan(self):
    t = s = 16
    q, k, v = random_qkv(15, 1, t, s, 1, 1, 8)
    # Keys 3, 7, 11, 15 and causal offset -1: rows 0..3 see nothing.
    idx = np.tile(np.arange(4, dtype=np.int32) * 4 + 3, (1, 1, t, 1))
    layout = RowLayout.from_indices(idx, num_keys=s)

    @jax.jit
    def run(q):
      def loss(q, k, v):
        out, lse = block_sparse_attention(q, k, v, layout, causal=True,
                                          causal_offset=-1, return_lse=True)
        return jnp.sum(out), (out, lse)
      return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    grads, (out, lse) = run(q)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[0][0, :4], 0.0)
    np.testing.assert_array_equal(out[0, :4], 0.0)
    self.assertTrue(np.isneginf(lse[0, 0, :4]).all())
    _, (out, lse) = run(q.at[0, 9, 0, 2].set(jnp.nan))
    nan_rows = np.isnan(np.asarray(out)).any(-1)[0, :, 0]
    np.testing.assert_array_equal(nan_rows, np.arange(t) == 9)
    np.testing.assert_array_equal(np.isnan(lse[0, 0]), np.arange(t) == 9)
    np.testing.assert_array_equal(out[0, :4], 0.0)

  def test_every_implementation_runs_the_gather_path(self):
    q, k, v = random_qkv(16, 1, 20, 20, 2, 2, 8)
    layout = random_row_layout(17, 1, 2, 20, 20, 5)
    run = jax.jit(lambda impl: block_sparse_attention(
        q, k, v, layout, implementation=impl, interpret=True),
                  static_argnums=0)
    want = run("xla")
    for impl in (None, "triton", "mosaic_tpu"):
      chex.assert_trees_all_equal(run(impl), want)

  def test_second_order(self):
    q, k, v = random_qkv(18, 1, 12, 10, 2, 1, 4)
    layout = random_row_layout(19, 1, 1, 12, 10, 4, group_size=3,
                               row_ranges=True)
    bias = random_bias(20, 1, 1, 10)

    @functools.partial(jax.jit, static_argnums=0)
    def grad_norm_grad(impl, *args):
      def loss(q, k, v, bias):
        return jnp.sum(jnp.sin(block_sparse_attention(
            q, k, v, layout, bias_k=bias, causal=True, causal_offset=2,
            implementation=impl)))
      grads = jax.grad(loss, argnums=(0, 1, 2, 3))
      return jax.grad(lambda *a: sum(jnp.sum(g**2) for g in grads(*a)),
                      argnums=(0, 1, 2, 3))(*args)

    chex.assert_trees_all_close(grad_norm_grad("xla", q, k, v, bias),
                                grad_norm_grad("reference", q, k, v, bias),
                                atol=1e-4, rtol=1e-4)

  def test_traced_layout_clamps_counts_and_counts_repeats_twice(self):
    t = s = 12
    q, k, v = random_qkv(21, 1, t, s, 2, 2, 8)
    idx, cnt = row_layout_test.random_lists(22, 1, 2, t, 5, s)
    cnt[0, 0, :3] = [9, -1, 0]
    idx[0, 1, 4], cnt[0, 1, 4] = [7, 7, 1, 2, 3], 5  # key 7 listed twice
    idx_once, cnt_once = idx.copy(), np.clip(cnt, 0, 5)
    idx_once[0, 1, 4], cnt_once[0, 1, 4] = [7, 1, 2, 3, 0], 4

    @jax.jit
    def run(idx, cnt, bias):
      layout = RowLayout.from_indices(idx, cnt, num_keys=s)
      return block_sparse_attention(q, k, v, layout, bias_k=bias)

    no_bias = jnp.zeros((1, 2, s))
    got = run(idx, cnt, no_bias)
    want = run(idx_once, cnt_once, no_bias)
    # Listed twice is listed once with twice the weight: a bias of log 2.
    twice = run(idx_once, cnt_once, no_bias.at[0, 1, 7].set(np.log(2.0)))
    want = want.at[:, 4, 1].set(twice[:, 4, 1])
    chex.assert_trees_all_close(got, want, atol=tolerances.atol(q.dtype))

  def test_no_intermediate_of_size_t_times_s(self):
    t = s = 4096
    q, k, v = random_qkv(23, 1, t, s, 2, 2, 32)
    # Row i lists keys (i + 61 m) % S, m < 64: distinct, built in O(T k).
    idx = (np.arange(t)[:, None] + 61 * np.arange(64)) % s
    layout = RowLayout.from_indices(np.tile(idx, (1, 2, 1, 1)), num_keys=s)
    bias = jnp.zeros((1, 2, s))

    def fwd_bwd(q, k, v, bias):
      def loss(q, k, v, bias):
        out, lse = block_sparse_attention(q, k, v, layout, bias_k=bias,
                                          causal=True, return_lse=True)
        return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))
      return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    size, shape, primitive = jaxpr_size.largest_intermediate(fwd_bwd, q, k, v,
                                                             bias)
    self.assertLess(size, t * s, f"{primitive} builds {shape}")
    # Bounded by one chunk's work, whatever T.
    self.assertLessEqual(size, row_sparse._CHUNK_ELEMENTS)

  def test_bad_arguments(self):
    q, k, v = random_qkv(25, 2, 10, 12, 4, 2, 8)
    good = random_row_layout(26, 1, 1, 10, 12, 3)
    cases = [
        (random_row_layout(26, 1, 1, 13, 12, 3, group_size=3), {},
         r"Qg=5 query groups but T=10 with group_size=3 needs "
         r"ceil\(T / group_size\)=4"),
        (random_row_layout(26, 1, 1, 10, 11, 3), {},
         "num_keys=11 but k has S=12"),
        (random_row_layout(26, 3, 1, 10, 12, 3), {},
         "batch dim must be 1 or B=2, got 3"),
        (random_row_layout(26, 1, 3, 10, 12, 3), {},
         "head dim must be 1, Hkv=2 or Hq=4, got 3"),
        (RowLayout.from_indices(np.full((1, 1, 10, 1), 13, np.int32),
                                num_keys=12), {},
         r"num_keys=12\) \(or equal num_keys, padding\), found \[13, "),
        (good, dict(implementation="cuda"), "implementation must be one of"),
        (good, dict(bias_k=jnp.zeros((1, 3, 12))), r"bias_k must be \[B\|1"),
        (good, dict(bias_k=jnp.zeros((1, 1, 13))), r"bias_k must be \[B\|1"),
        (good, dict(q_segment_ids=jnp.zeros((2, 10), jnp.int32),
                    kv_segment_ids=jnp.zeros((2, 11), jnp.int32)),
         r"\[B, S\] = \[2, 12\]"),
    ]
    for layout, kwargs, pattern in cases:
      with self.subTest(pattern), self.assertRaisesRegex(ValueError,
                                                         pattern):
        block_sparse_attention(q, k, v, layout, **kwargs)
    # A traced sm_scale is folded into q, as for block layouts.
    traced = jax.jit(lambda s: block_sparse_attention(q, k, v, good,
                                                      sm_scale=s))(0.5)
    np.testing.assert_allclose(
        traced, block_sparse_attention(q, k, v, good, sm_scale=0.5),
        atol=tolerances.atol(jnp.float32))


class SparsePlanRowLayoutTest(absltest.TestCase):

  def test_attend_with_extra_keys(self):
    # S = 13 is no block multiple: only BlockLayouts need that.
    b, t, s, extra = 1, 9, 13, 3
    q, k, v = random_qkv(27, b, t, s, 2, 1, 8)
    _, ek, ev = random_qkv(28, b, extra, extra, 1, 1, 8)
    layout = random_row_layout(29, 1, 1, t, s + extra, 5)
    plan = base.SparsePlan(layout=layout, extra_k=ek, extra_v=ev)
    got = jax.jit(plan.attend)(q, k, v)
    want = jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, layout))(q, jnp.concatenate([k, ek], 1),
                          jnp.concatenate([v, ev], 1))
    chex.assert_trees_all_close(got, want)


if __name__ == "__main__":
  absltest.main()
