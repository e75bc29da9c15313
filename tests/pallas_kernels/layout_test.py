"""BlockLayout: constructors, conversions, transpose and validation."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse_attention
from pallas_kernels import layout as layout_lib
from pallas_kernels.layout import BlockLayout
from tests import jaxpr_size
from tests import tolerances


def random_kind_map(seed, shape, density=0.4):
  rng = np.random.default_rng(seed)
  present = rng.random(shape) < density
  full = rng.random(shape) < 0.5
  return np.where(present, np.where(full, 2, 1), 0).astype(np.int8)


def band_mask_dense(t, s, lo, hi):
  delta = np.arange(s)[None, :] - np.arange(t)[:, None]
  mask = np.ones((t, s), bool)
  if lo is not None:
    mask &= delta >= lo
  if hi is not None:
    mask &= delta <= hi
  return mask


def assert_same_layout(test, a, b):
  """Same lists, pool and static fields."""
  test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


class BlockLayoutTest(parameterized.TestCase):

  def test_from_kind_map_lists_are_sorted_and_padded(self):
    kind = np.array([[[[0, 2, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]]], np.int8)
    lay = BlockLayout.from_kind_map(kind, 16, 16)
    np.testing.assert_array_equal(lay.kv_cnt, [[[2, 0, 4]]])
    np.testing.assert_array_equal(lay.kv_idx[0, 0],
                                  [[1, 3, 3, 3], [0, 0, 0, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(lay.kv_kind[0, 0],
                                  [[2, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    self.assertTrue(lay.is_host)
    lay.validate()
    np.testing.assert_array_equal(lay.to_block_mask(), kind)

  @parameterized.parameters(0, 1, 2)
  def test_host_and_traced_constructors_agree(self, seed):
    kind = random_kind_map(seed, (2, 3, 5, 7))
    host = BlockLayout.from_kind_map(kind, 32, 16, max_kv_blocks=7)
    traced = jax.jit(lambda m: BlockLayout.from_kind_map(
        m, 32, 16, max_kv_blocks=7))(jnp.asarray(kind))
    self.assertFalse(traced.is_host)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(traced)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(traced.to_block_mask(), kind)
    self.assertIsNone(traced.max_q_blocks)
    self.assertEqual(host.max_q_blocks, int((kind != 0).sum(-2).max()))

  def test_from_block_mask_kinds(self):
    mask = np.array([[[[1, 1], [0, 1]]]], bool)
    full = np.array([[[[1, 0], [1, 1]]]], bool)
    lay = BlockLayout.from_block_mask(mask, 8, 8, full_block_mask=full)
    np.testing.assert_array_equal(lay.to_block_mask(),
                                  [[[[2, 1], [0, 2]]]])

  def test_truncation_keeps_lowest_ids(self):
    kind = np.ones((1, 1, 1, 6), np.int8)
    lay = BlockLayout.from_kind_map(kind, 8, 8, max_kv_blocks=4)
    np.testing.assert_array_equal(lay.kv_idx[0, 0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(lay.kv_cnt, [[[4]]])

  @parameterized.parameters(
      dict(t=100, s=100, window=(None, 0), offset=0),
      dict(t=64, s=160, window=(None, 0), offset=96),
      dict(t=130, s=90, window=(20, 5), offset=0),
      dict(t=50, s=50, window=(0, None), offset=-3),
  )
  def test_band_helpers_match_dense_band(self, t, s, window, offset):
    lay = BlockLayout.local(t, s, window=window, block_q=16, block_kv=32,
                            offset=offset)
    left, right = window
    lo = None if left is None else offset - left
    hi = None if right is None else offset + right
    want = band_mask_dense(t, s, lo, hi)
    np.testing.assert_array_equal(lay.to_dense_mask(t, s)[0, 0], want)
    # Full blocks are exactly the blocks entirely inside the band.
    kinds = lay.to_block_mask()[0, 0]
    for r in range(kinds.shape[0]):
      for c in range(kinds.shape[1]):
        tile = want[r * 16:(r + 1) * 16, c * 32:(c + 1) * 32]
        expected = 2 if tile.all() else 1 if tile.any() else 0
        self.assertEqual(kinds[r, c], expected, (r, c))

  def test_causal_equals_local_with_open_left(self):
    a = BlockLayout.causal(96, block_q=32, block_kv=32)
    b = BlockLayout.local(96, window=(None, 0), block_q=32, block_kv=32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)

  @parameterized.parameters(True, False)
  def test_element_mask_round_trip(self, host):
    rng = np.random.default_rng(0)
    mask = rng.random((2, 1, 70, 45)) < 0.2
    mask[0, 0, :32, :16] = True
    mask[1, 0, 32:64, :] = False
    if host:
      lay = BlockLayout.from_element_mask(mask, 32, 16)
    else:
      lay = jax.jit(lambda m: BlockLayout.from_element_mask(
          m, 32, 16, max_kv_blocks=3))(jnp.asarray(mask))
    np.testing.assert_array_equal(lay.to_dense_mask(70, 45), mask)
    kinds = np.asarray(lay.to_block_mask())
    self.assertEqual(kinds[0, 0, 0, 0], layout_lib.FULL)
    self.assertTrue(np.all(kinds[1, 0, 1] == layout_lib.EMPTY))

  def test_element_mask_dedups_tiles_on_host(self):
    mask = np.tile(np.eye(8, dtype=bool), (1, 1, 4, 4))
    lay = BlockLayout.from_element_mask(mask, 8, 8)
    self.assertEqual(lay.tiles.shape[0], 1)  # one distinct tile (identity)
    np.testing.assert_array_equal(lay.to_dense_mask(32, 32), mask)

  @parameterized.parameters(0, 1, 2)
  def test_flex_round_trip(self, seed):
    kind = random_kind_map(seed, (2, 2, 6, 9))
    lay = BlockLayout.from_kind_map(kind, 16, 16)
    flex = lay.to_flex()
    back = BlockLayout.from_flex(flex)
    assert_same_layout(self, lay, back)
    num, idx = flex.kv_num_blocks, flex.kv_indices
    full_num, full_idx = flex.full_kv_num_blocks, flex.full_kv_indices
    # Flex lists hold exactly the partial / full blocks, ascending.
    for b_, h, r in np.ndindex(2, 2, 6):
      np.testing.assert_array_equal(idx[b_, h, r, :num[b_, h, r]],
                                    np.flatnonzero(kind[b_, h, r] == 1))
      np.testing.assert_array_equal(
          full_idx[b_, h, r, :full_num[b_, h, r]],
          np.flatnonzero(kind[b_, h, r] == 2))

  def test_flex_from_traced_lists(self):
    kind = random_kind_map(3, (1, 2, 4, 5))
    flex = BlockLayout.from_kind_map(kind, 8, 8).to_flex()
    back = jax.jit(BlockLayout.from_flex)(jax.tree.map(jnp.asarray, flex))
    np.testing.assert_array_equal(back.to_block_mask(), kind)
    self.assertEqual(back.max_kv_blocks, 5)  # min(Kb, W + Wf)

  @parameterized.parameters(0, 1, 2)
  def test_transpose_under_jit(self, seed):
    kind = random_kind_map(seed, (2, 3, 5, 7))
    lay = BlockLayout.from_kind_map(jnp.asarray(kind), 16, 16,
                                    max_kv_blocks=7)
    kv_major = jax.jit(lambda l: l.transpose())(lay)
    self.assertEqual(kv_major.q_idx.shape, (2, 3, 7, 5))
    dense_t = layout_lib._scatter_rows(  # pylint: disable=protected-access
        np.asarray(kv_major.q_idx), np.asarray(kv_major.q_cnt),
        np.asarray(kv_major.q_kind), 5, 0)
    np.testing.assert_array_equal(dense_t, np.swapaxes(kind, -1, -2))
    host = BlockLayout.from_kind_map(kind, 16, 16).transpose()
    self.assertEqual(host.q_idx.shape[-1],
                     int((kind != 0).sum(-2).max()))

  def test_transpose_carries_tiles(self):
    rng = np.random.default_rng(1)
    mask = rng.random((1, 1, 32, 48)) < 0.5
    lay = BlockLayout.from_element_mask(mask, 16, 16)
    kv_major = lay.transpose()
    tile_t = np.swapaxes(np.asarray(lay.tile_map()), -1, -2)
    got = layout_lib._scatter_rows(  # pylint: disable=protected-access
        kv_major.q_idx, kv_major.q_cnt, kv_major.tile_idx, 2, -1)
    np.testing.assert_array_equal(got, tile_t)

  def test_with_kv_major_is_exact_and_survives_jit(self):
    lay = BlockLayout.local(256, window=(40, 0), block_q=32, block_kv=32)
    attached = lay.with_kv_major()
    self.assertEqual(attached.kv_major.q_idx.shape[-1], 3)  # not Qb = 8
    passed = jax.jit(lambda l: l)(attached)
    np.testing.assert_array_equal(passed.kv_major_view().q_idx,
                                  attached.kv_major.q_idx)
    self.assertEqual(lay.kv_major_view().q_idx.shape[-1], 3)

  @hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
  @hypothesis.given(qb=st.integers(1, 6), kb=st.integers(1, 6),
                    density=st.floats(0, 1), seed=st.integers(0, 99))
  def test_hypothesis_block_mask_round_trip(self, qb, kb, density, seed):
    kind = random_kind_map(seed, (1, 2, qb, kb), density)
    lay = BlockLayout.from_kind_map(kind, 8, 8)
    lay.validate()
    np.testing.assert_array_equal(lay.to_block_mask(), kind)
    np.testing.assert_allclose(lay.density(), (kind != 0).mean())

  # -- element masks with no partial block (issue 13, item 7) -----------------

  @parameterized.named_parameters(
      ("all_ones", np.ones((1, 1, 64, 48), bool), 2),
      ("all_zeros", np.zeros((1, 1, 64, 48), bool), 0),
      ("block_aligned", np.kron(np.eye(4, 3, dtype=bool),
                                np.ones((16, 16), bool))[None, None], 2),
      ("single_query", np.ones((1, 1, 1, 5), bool), 2),
  )
  def test_element_mask_without_partial_blocks(self, mask, kind):
    lay = BlockLayout.from_element_mask(mask, 16, 16)
    self.assertIsNone(lay.tiles)
    np.testing.assert_array_equal(lay.to_dense_mask(*mask.shape[2:]), mask)
    self.assertTrue(np.all(lay.kv_kind[lay.kv_kind != 0] == kind))

  # -- static capacity (issue 20, item 2) ------------------------------------

  def test_traced_constructors_require_a_capacity(self):
    kind = jnp.ones((1, 1, 4, 4), jnp.int8)
    for build in (
        lambda m: BlockLayout.from_kind_map(m, 8, 8),
        lambda m: BlockLayout.from_block_mask(m > 0, 8, 8),
        lambda m: BlockLayout.from_element_mask(
            jnp.repeat(m > 0, 8, axis=-1), 8, 8),
    ):
      with self.assertRaisesRegex(ValueError, "pass max_kv_blocks=<int>"):
        jax.jit(build)(kind)
    with self.assertRaisesRegex(ValueError, "max_kv_blocks must be a static"):
      BlockLayout.from_kind_map(np.ones((1, 1, 2, 2), np.int8), 8, 8,
                                max_kv_blocks=0)

  def test_traced_element_mask_pool_holds_listed_blocks_only(self):
    rng = np.random.default_rng(2)
    mask = rng.random((1, 2, 64, 96)) < 0.05
    lay = jax.jit(lambda m: BlockLayout.from_element_mask(
        m, 16, 16, max_kv_blocks=6))(jnp.asarray(mask))
    self.assertEqual(lay.tiles.shape, (2 * 4 * 6, 16, 16))  # not Qb * Kb
    np.testing.assert_array_equal(lay.to_dense_mask(64, 96), mask)

  # -- windows (issue 13, item 9) --------------------------------------------

  @parameterized.parameters((-5, 0), (0, -1), (1.5, 0), (3,), "ab")
  def test_local_rejects_bad_windows(self, *window):
    window = window[0] if len(window) == 1 else window
    with self.assertRaisesRegex(ValueError, "window must be"):
      BlockLayout.local(64, window=window, block_q=16, block_kv=16)

  def test_band_and_sizes_are_checked(self):
    with self.assertRaisesRegex(ValueError, "min_delta <= max_delta"):
      BlockLayout.from_band(8, 8, 4, 4, (3, 1))
    with self.assertRaisesRegex(ValueError, "block_q must be an int >= 1"):
      BlockLayout.causal(64, block_q=0)

  # -- stale kv_major (issue 13, item 5) -------------------------------------

  def test_replace_drops_the_cached_transpose(self):
    attached = BlockLayout.causal(96, block_q=32, block_kv=32).with_kv_major()
    other = BlockLayout.dense(96, 96, block_q=32, block_kv=32)
    changed = dataclasses.replace(attached, kv_idx=other.kv_idx,
                                  kv_cnt=other.kv_cnt, kv_kind=other.kv_kind)
    self.assertIsNone(changed.kv_major)
    np.testing.assert_array_equal(changed.kv_major_view().q_cnt,
                                  [[[3, 3, 3]]])
    with self.assertRaises(TypeError):  # not a constructor argument
      BlockLayout(other.kv_idx, other.kv_cnt, other.kv_kind,
                  **{"kv_major": attached.kv_major})

  @parameterized.parameters("triton", "mosaic_tpu")
  def test_replaced_lists_give_exact_dk(self, implementation):
    # The repro: a causal layout with its transpose attached, then
    # dense lists swapped in; the dK/dV pass must walk the new lists.
    attached = BlockLayout.causal(64, block_q=32, block_kv=32).with_kv_major()
    dense = BlockLayout.dense(64, 64, block_q=32, block_kv=32)
    lay = dataclasses.replace(attached, kv_idx=dense.kv_idx,
                              kv_cnt=dense.kv_cnt, kv_kind=dense.kv_kind)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, 64, 1, 16)) for key in keys)
    dk = lambda impl: jax.grad(lambda k: block_sparse_attention(
        q, k, v, lay, implementation=impl, interpret=True).sum())(k)
    np.testing.assert_allclose(dk(implementation), dk("reference"),
                               atol=tolerances.grad_atol(jnp.float32))

  def test_spliced_transpose_and_stale_capacity_are_detected(self):
    causal = BlockLayout.causal(96, block_q=32, block_kv=32).with_kv_major()
    dense = BlockLayout.dense(96, 96, block_q=32, block_kv=32)
    leaves, treedef = jax.tree.flatten(dense.with_kv_major())
    stale = jax.tree.leaves(causal.kv_major)
    spliced = jax.tree.unflatten(treedef, leaves[:3] + stale)
    with self.assertRaisesRegex(ValueError, "kv_major is not the transpose"):
      spliced.validate()
    q, k, v = (jnp.ones((1, 96, 1, 8)),) * 3
    with self.assertRaisesRegex(ValueError, "kv_major is not the transpose"):
      block_sparse_attention(q, k, v, spliced, implementation="xla")
    diagonal = BlockLayout.local(96, window=(0, 0), block_q=32, block_kv=32)
    self.assertEqual(diagonal.max_q_blocks, 1)
    grown = dataclasses.replace(diagonal, kv_idx=dense.kv_idx,
                                kv_cnt=dense.kv_cnt, kv_kind=dense.kv_kind)
    with self.assertRaisesRegex(ValueError, "max_q_blocks=1 is below"):
      grown.validate()

  # -- sort-based transpose (issue 20, item 3) -------------------------------

  @parameterized.parameters(
      dict(seed=0, shape=(1, 1, 6, 9), density=0.5),
      dict(seed=1, shape=(2, 1, 5, 7), density=0.3),
      dict(seed=2, shape=(1, 3, 7, 4), density=0.9),
      dict(seed=3, shape=(2, 2, 4, 6), density=0.0),
  )
  def test_traced_transpose_equals_host(self, seed, shape, density):
    kind = random_kind_map(seed, shape, density)
    kind[..., 1, :] = 0  # an empty query row
    host = BlockLayout.from_kind_map(kind, 16, 16)
    want = host.transpose()
    got = jax.jit(lambda l: l.transpose())(host)  # traced, same bound
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)
    # The dense definition: the kind map transposed.
    dense_t = layout_lib._scatter_rows(  # pylint: disable=protected-access
        want.q_idx, want.q_cnt, want.q_kind, shape[2], 0)
    np.testing.assert_array_equal(dense_t, np.swapaxes(kind, -1, -2))

  def test_traced_transpose_with_tiles_and_clamped_counts(self):
    rng = np.random.default_rng(4)
    mask = rng.random((2, 1, 48, 40)) < 0.3
    mask[1, 0, :16] = False
    host = BlockLayout.from_element_mask(mask, 16, 8)
    got = jax.jit(lambda l: l.transpose())(host)
    for a, b in zip(jax.tree.leaves(host.transpose()), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)
    # Counts past Kmax are clamped to Kmax, as the kernels do (the repeated
    # padding ids then count as listed, like traced duplicates).
    full_rows = dataclasses.replace(
        host, kv_cnt=np.full_like(host.kv_cnt, host.max_kv_blocks))
    want = full_rows.transpose()
    over = dataclasses.replace(host, kv_cnt=host.kv_cnt + 100)
    got = jax.jit(lambda l: l.transpose(want.q_idx.shape[-1]))(over)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)

  def test_traced_transpose_capacity(self):
    kind = jnp.asarray(random_kind_map(5, (1, 2, 8, 8), 0.3))
    bounded = jax.jit(lambda m: BlockLayout.from_kind_map(
        m, 8, 8, max_kv_blocks=8, max_q_blocks=8).transpose())(kind)
    self.assertEqual(bounded.q_idx.shape, (1, 2, 8, 8))
    explicit = jax.jit(lambda m: BlockLayout.from_kind_map(
        m, 8, 8, max_kv_blocks=8).transpose(3))(kind)
    self.assertEqual(explicit.q_idx.shape, (1, 2, 8, 3))
    host = BlockLayout.from_kind_map(np.asarray(kind), 8, 8)
    with self.assertRaisesRegex(ValueError, "max_q_blocks=1 is below"):
      host.transpose(1)
    with self.assertRaisesRegex(ValueError, "max_q_blocks=1 is below"):
      BlockLayout.from_kind_map(np.asarray(kind), 8, 8, max_q_blocks=1)

  def test_traced_transpose_builds_no_dense_block_map(self):
    # Qb = Kb = 512 at 2% density: Qb x Kb = 262144 per head.
    t, block, kmax = 8192, 16, 9
    lay = BlockLayout.local(t, window=(120, 0), block_q=block,
                            block_kv=block)
    self.assertEqual((lay.max_kv_blocks, lay.max_q_blocks), (kmax, kmax))
    traced = jax.tree.map(jnp.asarray, lay)
    size, shape, _ = jaxpr_size.largest_intermediate(
        lambda l: l.transpose(), traced)
    qb = t // block
    self.assertLessEqual(size, 2 * qb * kmax, shape)
    self.assertLess(size, qb * qb // 10)

  # -- validation ------------------------------------------------------------

  def _layout(self):
    return BlockLayout.from_kind_map(random_kind_map(0, (1, 1, 4, 4), 0.9),
                                     8, 8)

  def test_validate_rejects_out_of_range_index(self):
    lay = self._layout()
    idx = np.array(lay.kv_idx)
    idx[0, 0, 0, 0] = 9
    with self.assertRaisesRegex(ValueError, "kv_idx entries must lie in"):
      BlockLayout(idx, lay.kv_cnt, lay.kv_kind, num_kv_blocks=4, block_q=8,
                  block_kv=8).validate()

  def test_validate_rejects_unsorted_row(self):
    idx = np.array([[[[2, 1]]]], np.int32)
    with self.assertRaisesRegex(ValueError, "strictly ascending"):
      BlockLayout(idx, np.array([[[2]]], np.int32),
                  np.ones((1, 1, 1, 2), np.int8), num_kv_blocks=4).validate()

  def test_validate_rejects_bad_count_and_kind(self):
    idx = np.array([[[[0, 1]]]], np.int32)
    with self.assertRaisesRegex(ValueError, r"kv_cnt must lie in \[0, Kmax"):
      BlockLayout(idx, np.array([[[3]]], np.int32),
                  np.ones((1, 1, 1, 2), np.int8), num_kv_blocks=4).validate()
    with self.assertRaisesRegex(ValueError, "kv_kind must be PARTIAL"):
      BlockLayout(idx, np.array([[[2]]], np.int32),
                  np.array([[[[1, 5]]]], np.int8),
                  num_kv_blocks=4).validate()

  def test_validate_rejects_bad_shapes(self):
    lay = self._layout()
    with self.assertRaisesRegex(ValueError, r"kv_cnt must be \[Bl, Hl, Qb\]"):
      BlockLayout(lay.kv_idx, lay.kv_cnt[..., :2], lay.kv_kind,
                  num_kv_blocks=4).validate()
    with self.assertRaisesRegex(ValueError, "kv_idx must be"):
      BlockLayout(lay.kv_idx[0], lay.kv_cnt, lay.kv_kind,
                  num_kv_blocks=4).validate()
    with self.assertRaisesRegex(ValueError, "tiles must be"):
      BlockLayout(lay.kv_idx, lay.kv_cnt, lay.kv_kind,
                  tile_idx=np.zeros_like(lay.kv_idx),
                  tiles=np.zeros((1, 4, 4), bool), block_q=8, block_kv=8,
                  num_kv_blocks=4).validate()

  def test_constructor_errors(self):
    with self.assertRaisesRegex(ValueError, "block_mask must be boolean"):
      BlockLayout.from_block_mask(np.ones((1, 1, 2, 2), np.int32), 8, 8)
    with self.assertRaisesRegex(ValueError, r"mask must be a boolean"):
      BlockLayout.from_element_mask(np.ones((4, 4), bool), 8, 8)

  def test_pytree_round_trip_keeps_static_fields(self):
    lay = BlockLayout.causal(64, block_q=16, block_kv=32)
    leaves, treedef = jax.tree.flatten(lay)
    back = jax.tree.unflatten(treedef, leaves)
    self.assertEqual(back.band, (None, 0))
    self.assertEqual((back.block_q, back.block_kv, back.num_kv_blocks),
                     (16, 32, 2))


if __name__ == "__main__":
  absltest.main()
