"""RowLayout: construction, dense view, density and validation."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import RowLayout


def brute_force_mask(idx, cnt, ranges, group_size, q_len, kv_len):
  """bool [Bl, Hl, T, S] by looping over every listed entry."""
  bl, hl, qg, kmax = idx.shape
  mask = np.zeros((bl, hl, q_len, kv_len), bool)
  for b, h, g, m in np.ndindex(bl, hl, qg, kmax):
    listed = m < min(max(cnt[b, h, g], 0), kmax)
    if not listed or not 0 <= idx[b, h, g, m] < kv_len:
      continue
    rows = range(group_size)
    if ranges:
      rows = range(ranges["row_start"][b, h, g, m],
                   ranges["row_end"][b, h, g, m])
    for r in rows:
      row = g * group_size + r
      if 0 <= r < group_size and row < q_len:
        mask[b, h, row, idx[b, h, g, m]] = True
  return mask


def random_row_ranges(seed, shape, group_size):
  """Random row ranges (some empty, some past the group) for lists `shape`."""
  rng = np.random.default_rng(seed)
  start = rng.integers(-1, group_size + 1, shape).astype(np.int32)
  end = (start + rng.integers(-1, group_size + 1, shape)).astype(np.int32)
  return dict(row_start=start, row_end=end)


def random_lists(seed, bl, hl, qg, kmax, kv_len):
  """Distinct random indices per list and random counts in [0, Kmax]."""
  rng = np.random.default_rng(seed)
  idx = np.argsort(rng.random((bl, hl, qg, kv_len)), -1)[..., :kmax]
  cnt = rng.integers(0, kmax + 1, (bl, hl, qg))
  return idx.astype(np.int32), cnt.astype(np.int32)


class RowLayoutTest(parameterized.TestCase):

  def test_from_indices_defaults_and_properties(self):
    idx = np.array([[[[3, 1], [0, 2], [4, 4]]]], np.int64)
    lay = RowLayout.from_indices(idx, num_keys=5)
    self.assertEqual(lay.kv_idx.dtype, np.int32)
    np.testing.assert_array_equal(lay.kv_cnt, [[[2, 2, 2]]])
    self.assertEqual((lay.batch_size, lay.num_heads, lay.num_groups,
                      lay.max_keys, lay.group_size, lay.num_keys),
                     (1, 1, 3, 2, 1, 5))
    self.assertTrue(lay.is_host)
    with self.assertRaisesRegex(ValueError, "must be distinct"):
      lay.validate()

  @parameterized.product(group_size=[1, 3], with_row_ranges=[False, True],
                         q_len=[7, 9])
  def test_dense_mask_matches_brute_force(self, group_size, with_row_ranges,
                                          q_len):
    qg, kv_len = -(-q_len // group_size), 11
    idx, cnt = random_lists(0, 2, 3, qg, 4, kv_len)
    ranges = (random_row_ranges(1, idx.shape, group_size)
              if with_row_ranges else {})
    lay = RowLayout.from_indices(idx, cnt, num_keys=kv_len,
                                 group_size=group_size, **ranges)
    lay.validate()
    want = brute_force_mask(idx, cnt, ranges, group_size, q_len, kv_len)
    np.testing.assert_array_equal(lay.to_dense_mask(q_len, kv_len), want)
    # Density counts the rows of the padded last group too.
    rows = qg * group_size
    listed = brute_force_mask(idx, cnt, ranges, group_size, rows, kv_len)
    np.testing.assert_allclose(lay.density(), listed.mean(), rtol=1e-6)

  def test_entries_past_the_count_are_ignored(self):
    # Past the count: out of range and repeated values are fine.
    idx = np.array([[[[2, 0, -7, 2], [1, 99, 1, 1]]]], np.int32)
    cnt = np.array([[[2, 1]]], np.int32)
    lay = RowLayout.from_indices(idx, cnt, num_keys=3)
    lay.validate()
    np.testing.assert_array_equal(
        lay.to_dense_mask(2, 3)[0, 0], [[1, 0, 1], [0, 1, 0]])

  def test_counts_are_clamped(self):
    idx = np.array([[[[0, 1], [1, 0]]]], np.int32)
    lay = RowLayout.from_indices(idx, np.array([[[5, -3]]], np.int32),
                                 num_keys=2)
    lay.validate()
    np.testing.assert_array_equal(lay.to_dense_mask(2, 2)[0, 0],
                                  [[1, 1], [0, 0]])
    self.assertAlmostEqual(float(lay.density()), 0.5)

  def test_traced_layout_is_a_pytree(self):
    idx, cnt = random_lists(2, 1, 2, 5, 3, 8)

    @jax.jit
    def build(idx, cnt):
      lay = RowLayout.from_indices(idx, cnt, num_keys=8)
      self.assertFalse(lay.is_host)
      lay.validate()  # shapes only
      return lay, lay.to_dense_mask(5, 8), lay.density()

    lay, mask, density = build(jnp.asarray(idx), jnp.asarray(cnt))
    host = RowLayout.from_indices(idx, cnt, num_keys=8)
    self.assertIsInstance(lay, RowLayout)
    self.assertEqual(lay.num_keys, 8)
    np.testing.assert_array_equal(mask, host.to_dense_mask(5, 8))
    np.testing.assert_allclose(density, host.density(), rtol=1e-6)
    leaves, treedef = jax.tree.flatten(host)
    self.assertLen(leaves, 2)  # row ranges None are no leaves
    self.assertEqual(jax.tree.unflatten(treedef, leaves).group_size, 1)

  def test_validate_rejects_out_of_range_indices(self):
    for bad in (5, -1):
      lay = RowLayout.from_indices(np.array([[[[0, bad]]]], np.int32),
                                   num_keys=4)
      with self.assertRaisesRegex(ValueError, r"in \[0, num_keys=4\) \(or "
                                  rf"equal num_keys, padding\), found \[{bad}\]"):
        lay.validate()

  def test_index_s_is_padding(self):
    # S marks padding (as traced selections write it); repeats of it are fine.
    lay = RowLayout.from_indices(np.array([[[[1, 4, 4]]]], np.int32),
                                 num_keys=4)
    lay.validate()
    np.testing.assert_array_equal(lay.to_dense_mask(1, 4)[0, 0],
                                  [[0, 1, 0, 0]])

  def test_bad_arguments(self):
    idx = np.zeros((1, 1, 2, 3), np.int32)
    cases = [
        (dict(kv_idx=idx.astype(np.float32)), "kv_idx must be an integer"),
        (dict(kv_idx=idx[0]), r"kv_idx must be \[Bl, Hl, Qg, Kmax\]"),
        (dict(kv_cnt=np.zeros((1, 1, 3), np.int32)),
         r"kv_cnt must be \[Bl, Hl, Qg\]=\(1, 1, 2\)"),
        (dict(kv_cnt=np.zeros((1, 1, 2), bool)), "kv_cnt must be an integer"),
        (dict(group_size=0), "group_size must be >= 1"),
        (dict(num_keys=0), "num_keys must be >= 1"),
        (dict(row_start=np.zeros((1, 1, 2, 2), np.int32),
              row_end=np.ones((1, 1, 2, 2), np.int32)),
         r"row_start must be int32 \[Bl, Hl, Qg, Kmax\]=\[1, 1, 2, 3\]"),
        (dict(row_start=np.zeros((1, 1, 2, 3), np.int32),
              row_end=np.ones((1, 1, 2, 3), bool)),
         "row_end must be an integer"),
        (dict(row_start=np.zeros((1, 1, 2, 3), np.int32)),
         "row_start and row_end must be given together, got only "
         "row_start"),
    ]
    for overrides, pattern in cases:
      kwargs = dict(kv_idx=idx, kv_cnt=None, num_keys=4, group_size=1)
      kwargs.update(overrides)
      with self.subTest(pattern), self.assertRaisesRegex(ValueError,
                                                         pattern):
        RowLayout.from_indices(kwargs.pop("kv_idx"), **kwargs)

  def test_dense_mask_checks_its_sizes(self):
    lay = RowLayout.from_indices(np.zeros((1, 1, 3, 2), np.int32),
                                 num_keys=5, group_size=4)
    with self.assertRaisesRegex(ValueError, "needs 4 query groups"):
      lay.to_dense_mask(13, 5)
    with self.assertRaisesRegex(ValueError, "num_keys=5"):
      lay.to_dense_mask(12, 6)


if __name__ == "__main__":
  absltest.main()
