"""Mask functions and BlockLayout.from_mask_fn / from_segment_ids."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse_attention
from pallas_kernels import layout as layout_lib
from pallas_kernels import mask_fns
from pallas_kernels.layout import BlockLayout
from tests import jaxpr_size
from tests import tolerances


def dense(mask_fn, t, s):
  """The brute-force element mask [..., T, S] of a predicate."""
  return np.asarray(mask_fn(np.arange(t)[:, None], np.arange(s)[None, :]))


def brute_kinds(mask, block_q, block_kv):
  """EMPTY/PARTIAL/FULL of each block of a [..., T, S] mask, by loops."""
  t, s = mask.shape[-2:]
  qb, kb = layout_lib.cdiv(t, block_q), layout_lib.cdiv(s, block_kv)
  kinds = np.zeros(mask.shape[:-2] + (qb, kb), np.int8)
  for r, c in np.ndindex(qb, kb):
    tile = mask[..., r * block_q:(r + 1) * block_q,
                c * block_kv:(c + 1) * block_kv]
    kinds[..., r, c] = np.where(tile.all((-1, -2)), 2,
                                np.where(tile.any((-1, -2)), 1, 0))
  return kinds


def packed_ids(sizes, batch=1):
  """int32 [batch, sum(sizes)]: row b uses the sizes rotated by b."""
  rows = [np.repeat(np.arange(len(sizes)), np.roll(sizes, b))
          for b in range(batch)]
  return np.stack(rows).astype(np.int32)


SEG = np.repeat(np.arange(5), [7, 30, 1, 22, 17]).astype(np.int32)  # T=77

HELPERS = {
    "causal": lambda: mask_fns.causal,
    "window": lambda: mask_fns.sliding_window(9),
    "window_two_sided": lambda: mask_fns.sliding_window((5, 11)),
    "band_offset": lambda: mask_fns.band(None, 13),
    "prefix_lm": lambda: mask_fns.prefix_lm(20) | mask_fns.causal,
    "prefix_window": lambda: mask_fns.prefix_lm(20) | mask_fns.sliding_window(
        9),
    "chunked_causal": lambda: mask_fns.chunked(19) & mask_fns.causal,
    "document": lambda: mask_fns.document(SEG),
    "document_causal": lambda: mask_fns.causal & mask_fns.document(SEG),
    "plain_and_helper": lambda: mask_fns.causal & (
        lambda q, kv: (q + kv) % 3 != 0),
    "plain_or_helper": lambda: (lambda q, kv: kv == 2 * q) | mask_fns.band(
        -2, 2),
}


class MaskFnsTest(parameterized.TestCase):

  @parameterized.named_parameters(*HELPERS.items())
  def test_layout_matches_dense_mask_and_brute_kinds(self, make):
    mask_fn = make()
    t = s = 77  # ragged: not a multiple of either block size
    want = dense(mask_fn, t, s)
    lay = BlockLayout.from_mask_fn(mask_fn, t, s, block_q=16, block_kv=8)
    lay.validate()
    np.testing.assert_array_equal(lay.to_dense_mask(t, s)[0, 0], want)
    np.testing.assert_array_equal(lay.to_block_mask()[0, 0],
                                  brute_kinds(want, 16, 8))
    # A plain callable with the same predicate gives the same lists.
    plain = BlockLayout.from_mask_fn(lambda q, kv: mask_fn(q, kv), t, s,
                                     block_q=16, block_kv=8)
    for name in ("kv_idx", "kv_cnt", "kv_kind"):
      np.testing.assert_array_equal(getattr(lay, name), getattr(plain, name))

  @parameterized.parameters(
      ("causal", (None, 0)), ("window", (-9, 0)),
      ("band_offset", (None, 13)))
  def test_bands_alone_need_no_tiles(self, name, band):
    lay = BlockLayout.from_mask_fn(HELPERS[name](), 50, 70, block_q=16,
                                   block_kv=16)
    self.assertEqual(lay.band, band)
    self.assertIsNone(lay.tiles)

  def test_band_algebra(self):
    both = mask_fns.causal & mask_fns.sliding_window((4, 3))
    self.assertTrue(both.is_band)
    self.assertEqual(both.band, (-4, 0))
    union = mask_fns.causal | mask_fns.sliding_window((4, 3))
    self.assertTrue(union.is_band)
    self.assertEqual(union.band, (None, 3))
    apart = mask_fns.band(None, -10) | mask_fns.band(10, None)
    self.assertFalse(apart.is_band)
    want = dense(mask_fns.band(None, -10), 30, 30) | dense(
        mask_fns.band(10, None), 30, 30)
    np.testing.assert_array_equal(dense(apart, 30, 30), want)

  def test_band_and_rest_tiles_only_where_band_differs(self):
    # Blocks inside one document are described by the causal band alone.
    seg = np.repeat(np.arange(4), 32).astype(np.int32)
    lay = BlockLayout.from_mask_fn(mask_fns.causal & mask_fns.document(seg),
                                   128, 128, block_q=32, block_kv=32)
    self.assertEqual(lay.band, (None, 0))
    self.assertIsNone(lay.tiles)
    np.testing.assert_array_equal(lay.kv_cnt[0, 0], [1, 1, 1, 1])

  def test_per_batch_document_ids(self):
    seg = packed_ids([5, 40, 12, 3], batch=3)
    t = seg.shape[1]
    mask_fn = mask_fns.document(seg) & mask_fns.causal
    lay = BlockLayout.from_mask_fn(mask_fn, t, t, block_q=8, block_kv=16)
    want = dense(mask_fn, t, t)
    self.assertEqual(want.shape, (3, 1, t, t))
    self.assertEqual(lay.kv_idx.shape[:2], (3, 1))
    np.testing.assert_array_equal(lay.to_dense_mask(t, t), want)
    np.testing.assert_array_equal(lay.to_block_mask(),
                                  brute_kinds(want, 8, 16))

  def test_cross_lengths_and_tile_dedup(self):
    mask_fn = mask_fns.chunked(16) & (lambda q, kv: (kv - q) % 2 == 0)
    lay = BlockLayout.from_mask_fn(mask_fn, 64, 40, block_q=16, block_kv=16)
    np.testing.assert_array_equal(lay.to_dense_mask(64, 40)[0, 0],
                                  dense(mask_fn, 64, 40))
    self.assertLessEqual(lay.tiles.shape[0], 2)  # a checkerboard, twice

  def test_no_partial_block_has_no_pool(self):
    lay = BlockLayout.from_mask_fn(mask_fns.chunked(16), 64, 64,
                                   block_q=16, block_kv=16)
    self.assertIsNone(lay.tiles)
    np.testing.assert_array_equal(lay.kv_kind[0, 0, :, 0], [2, 2, 2, 2])

  def test_prefix_window_attention_matches_dense_t2048(self):
    # The "done means": prefix LM + causal sliding window at
    # T=2048, block 128, through the op, against jax.nn with the same mask.
    t, prefix, window = 2048, 200, 300
    mask_fn = mask_fns.prefix_lm(prefix) | mask_fns.sliding_window(window)
    lay = BlockLayout.from_mask_fn(mask_fn, t, t)
    want_mask = dense(mask_fn, t, t)
    np.testing.assert_array_equal(lay.to_block_mask()[0, 0],
                                  brute_kinds(want_mask, 128, 128))
    self.assertEqual(lay.max_kv_blocks, 6)  # prefix 2 + window 4 of Kb=16
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, t, 2, 32)) for key in keys)
    got = block_sparse_attention(q, k, v, lay, implementation="xla")
    want = jax.nn.dot_product_attention(q, k, v,
                                        mask=jnp.asarray(want_mask))
    chex.assert_trees_all_close(got, want, atol=tolerances.atol(q.dtype))

  def test_errors_name_the_argument(self):
    for call, name in (
        (lambda: mask_fns.sliding_window(-5), "window"),
        (lambda: mask_fns.sliding_window((3, -1)), "window"),
        (lambda: mask_fns.prefix_lm(-1), "prefix_len"),
        (lambda: mask_fns.chunked(0), "chunk_size"),
        (lambda: mask_fns.band(5, 1), "min_delta <= max_delta"),
        (lambda: mask_fns.document(np.array([0.5, 0.4])), "q_segment_ids"),
        (lambda: mask_fns.segment_ids_from_cu_seqlens([0, 4], 0), "seq_len"),
        (lambda: BlockLayout.from_mask_fn(3, 8, 8), "mask_fn"),
        (lambda: BlockLayout.from_mask_fn(mask_fns.causal, 0, 8), "q_len"),
        (lambda: BlockLayout.from_mask_fn(lambda q, kv: q - kv, 8, 8),
         "bool"),
        (lambda: BlockLayout.from_mask_fn(mask_fns.causal, 8, 8, block_q=0),
         "block_q"),
    ):
      with self.assertRaisesRegex(ValueError, name):
        call()

  def test_cu_seqlens_host_and_traced(self):
    cu = np.array([[0, 3, 10, 10, 12], [0, 12, 12, 12, 12]], np.int32)
    host = mask_fns.segment_ids_from_cu_seqlens(cu, 14)
    traced = jax.jit(mask_fns.segment_ids_from_cu_seqlens,
                     static_argnums=1)(jnp.asarray(cu), 14)
    np.testing.assert_array_equal(host, traced)
    np.testing.assert_array_equal(
        host[0], [0] * 3 + [1] * 7 + [3] * 2 + [4] * 2)
    np.testing.assert_array_equal(host[1], [0] * 12 + [4] * 2)


class SegmentIdsLayoutTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_lists_exactly_the_document_blocks(self, causal):
    seg = packed_ids([9, 33, 1, 20, 14], batch=2)  # T=77, ragged
    lay = BlockLayout.from_segment_ids(seg, block_q=16, block_kv=8,
                                       causal=causal)
    lay.validate()
    mask_fn = mask_fns.document(seg)
    if causal:
      mask_fn &= mask_fns.causal
    want = dense(mask_fn, seg.shape[1], seg.shape[1])
    np.testing.assert_array_equal(lay.to_block_mask(),
                                  brute_kinds(want, 16, 8))

  def test_attention_with_the_op_segment_ids(self):
    # Inside partial blocks the op's segment ids finish the job.
    seg = packed_ids([9, 33, 1, 20, 14], batch=2)
    t = seg.shape[1]
    lay = BlockLayout.from_segment_ids(seg, block_q=16, block_kv=8,
                                       causal=True)
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, t, 2, 16)) for key in keys)
    got = block_sparse_attention(q, k, v, lay, q_segment_ids=seg,
                                 kv_segment_ids=seg, implementation="xla")
    want = dense(mask_fns.document(seg) & mask_fns.causal, t, t)
    ref = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(want))
    chex.assert_trees_all_close(got, ref, atol=tolerances.atol(q.dtype))

  @parameterized.parameters(False, True)
  def test_traced_equals_host_with_document_bound(self, causal):
    sizes, block = [9, 33, 1, 20, 14], 8
    seg = packed_ids(sizes, batch=3)
    build = lambda s: BlockLayout.from_segment_ids(
        s, block_q=block, block_kv=block, causal=causal,
        max_document_len=max(sizes))
    traced = jax.jit(build)(jnp.asarray(seg))
    host = BlockLayout.from_segment_ids(seg, block_q=block, block_kv=block,
                                        causal=causal)
    np.testing.assert_array_equal(traced.to_block_mask(),
                                  host.to_block_mask())
    self.assertGreaterEqual(traced.max_kv_blocks, host.max_kv_blocks)
    self.assertGreaterEqual(traced.max_q_blocks, host.max_q_blocks)
    # The bound is safe: the traced transpose keeps every pair.
    t_traced = jax.jit(lambda l: l.transpose())(traced)
    np.testing.assert_array_equal(t_traced.q_cnt, host.transpose().q_cnt)

  def test_traced_needs_a_capacity(self):
    with self.assertRaisesRegex(ValueError, "max_kv_blocks"):
      jax.jit(lambda s: BlockLayout.from_segment_ids(s, block_q=8,
                                                     block_kv=8))(
                                                         jnp.zeros((1, 32),
                                                                   jnp.int32))
    with self.assertRaisesRegex(ValueError, "segment_ids must be an int"):
      BlockLayout.from_segment_ids(np.zeros((1, 8), np.float32))

  def test_one_compile_and_no_quadratic_intermediate(self):
    t, block, doc = 8192, 32, 256
    traces = []

    def build(seg):
      traces.append(1)
      lay = BlockLayout.from_segment_ids(seg, block_q=block, block_kv=block,
                                         causal=True, max_document_len=doc)
      return lay, lay.transpose()

    run = jax.jit(build)
    for sizes in ([256] * 32, [100, 156] * 32):
      lay, _ = run(jnp.asarray(packed_ids(sizes)))
      # L + block_q - 1 = 287 positions span at most 10 blocks of 32.
      self.assertEqual(lay.max_kv_blocks, 10)
    self.assertLen(traces, 1)
    qb = t // block
    size, shape, _ = jaxpr_size.largest_intermediate(
        build, jnp.zeros((1, t), jnp.int32))
    self.assertLess(size, qb * qb // 4, shape)  # Qb x Kb would be 65536


if __name__ == "__main__":
  absltest.main()
