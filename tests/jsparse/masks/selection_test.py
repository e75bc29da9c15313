"""Shared on-device block selection ops."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import masks
from jsparse.masks import selection


def _scores(shape, seed, ties):
  """Normal scores; with `ties`, multiples of 0.5 (incl. -0.0 and 0.0)."""
  x = jax.random.normal(jax.random.key(seed), shape)
  return jnp.round(x * 2) / 2 if ties else x


def _rows_to_dense(kv_idx, kv_cnt, row_start, row_end, r, s):
  """int [..., Qg * R, S]: how often each row lists each key."""
  kv_idx, kv_cnt, row_start, row_end = map(
      np.asarray, (kv_idx, kv_cnt, row_start, row_end))
  *lead, qg, m = kv_idx.shape
  listed = ((np.arange(m) < kv_cnt[..., None]) & (kv_idx < s))[..., None, :]
  rows = np.arange(r)[:, None]
  listed = listed & ((rows >= row_start[..., None, :])
                     & (rows < row_end[..., None, :]))
  cols = np.broadcast_to(np.where(listed, kv_idx[..., None, :], s),
                         listed.shape).reshape(*lead, qg * r, m)
  dense = np.zeros((*lead, qg * r, s + 1), int)
  lead_ix = np.indices((*lead, qg * r, m))
  np.add.at(dense, (*lead_ix[:-1], cols), 1)
  return dense[..., :s]


class SelectionTest(parameterized.TestCase):

  def test_mean_pool_ragged_tail(self):
    x = jnp.arange(10.0).reshape(1, 10, 1, 1)
    np.testing.assert_allclose(masks.mean_pool(x, 4)[0, :, 0, 0],
                               [1.5, 5.5, 8.5])

  def test_pooled_block_scores(self):
    q = jax.random.normal(jax.random.key(0), (1, 64, 4, 8))
    k = jax.random.normal(jax.random.key(1), (1, 48, 2, 8))
    got = masks.pooled_block_scores(q, k, 16, 16)
    qp = np.asarray(q).reshape(1, 4, 16, 4, 8).mean(2)
    kp = np.repeat(np.asarray(k).reshape(1, 3, 16, 2, 8).mean(2), 2, axis=2)
    want = np.einsum("bqhd,bkhd->bhqk", qp, kp) / np.sqrt(8)
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_sampled_scores_with_every_token_sampled(self):
    q = jax.random.normal(jax.random.key(2), (1, 32, 2, 8))
    k = jax.random.normal(jax.random.key(3), (1, 48, 1, 8))
    got = masks.sampled_block_scores(q, k, 16, 16, q_samples=16,
                                     kv_samples=16, key=jax.random.key(0))
    qn, kn = np.asarray(q), np.repeat(np.asarray(k), 2, axis=2)
    m = np.einsum("bthd,bshd->bhts", qn, kn).reshape(1, 2, 32, 3, 16).max(-1)
    m /= np.sqrt(8)
    s_hat = np.exp(m - m.max(-1, keepdims=True))
    want = s_hat.reshape(1, 2, 2, 16, 3).max(3)
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_topk_with_mandatory_and_allowed(self):
    scores = jnp.array([[0.1, 0.9, 0.5, 0.7, 0.3]])
    mandatory = jnp.array([[True, False, False, False, False]])
    allowed = jnp.array([[True, True, True, False, True]])
    got = masks.topk_block_mask(scores, 2, mandatory=mandatory,
                                allowed=allowed)
    np.testing.assert_array_equal(got, [[True, True, True, False, False]])

  def test_topk_never_selects_disallowed_even_when_short(self):
    scores = jnp.ones((1, 4))
    allowed = jnp.array([[True, False, False, False]])
    got = masks.topk_block_mask(scores, 3, allowed=allowed)
    np.testing.assert_array_equal(got, [[True, False, False, False]])

  @parameterized.parameters((True, [True, True, True, False]),
                            (False, [True, True, False, False]))
  def test_cumulative_mass_crossing(self, include, want):
    scores = jnp.array([[0.4, 0.3, 0.2, 0.1]])
    got = masks.cumulative_mass_mask(scores, 0.75, include_crossing=include)
    np.testing.assert_array_equal(got, [want])

  def test_cumulative_mass_clamps(self):
    scores = jnp.array([[0.97, 0.01, 0.01, 0.01]])
    got = masks.cumulative_mass_mask(scores, 0.5, min_blocks=2, max_blocks=3)
    self.assertEqual(int(got.sum()), 2)
    got = masks.cumulative_mass_mask(jnp.full((1, 4), 0.25), 1.0,
                                     max_blocks=3)
    self.assertEqual(int(got.sum()), 3)
    with self.assertRaisesRegex(ValueError, "mass must lie in"):
      masks.cumulative_mass_mask(scores, 1.5)

  def test_band_block_mask_diagonal(self):
    got = masks.band_block_mask(3, 3, 16, 16, (0, 0))
    np.testing.assert_array_equal(got, np.eye(3, dtype=bool))

  def test_selection_has_no_gradient(self):
    q = jax.random.normal(jax.random.key(4), (1, 32, 1, 8))

    def f(q):
      return masks.pooled_block_scores(q, q, 16, 16).sum()

    np.testing.assert_array_equal(jax.grad(f)(q), 0.0)


  @parameterized.parameters((37, 5, 8, True), (50, 3, 16, True),
                            (50, 60, 16, False), (23, 7, 1, True))
  def test_prefix_topk_rows_is_the_prefix_topk(self, s, k, group, ties):
    # Ragged S, ties (lower index wins), group > k, k >= S, group = 1.
    scores = _scores((2, 3, s), s + k, ties)
    kv_idx, kv_cnt, row_start, row_end = jax.jit(
        selection.prefix_topk_rows, static_argnums=(1, 2))(scores, k, group)
    self.assertEqual(kv_idx.shape[-1], group + min(k, s))
    dense = _rows_to_dense(kv_idx, kv_cnt, row_start, row_end, group,
                           s)[..., :s, :]
    self.assertLessEqual(dense.max(), 1)  # every listed key once
    np.testing.assert_array_equal(dense == 1, jax.jit(
        selection.prefix_topk_mask, static_argnums=1)(scores, k))

  def test_prefix_topk_states(self):
    scores = _scores((2, 30), 5, True)
    values, idx = selection.prefix_topk_states(scores, 6, 8)
    self.assertEqual(idx.shape, (2, 5, 6))  # ceil(30 / 8) + 1 states
    for b in range(2):
      for a in range(5):
        prefix = np.asarray(scores[b, :a * 8])
        want = np.argsort(-prefix, kind="stable")[:6]
        got = np.asarray(idx[b, a])[np.asarray(values[b, a]) > -np.inf]
        np.testing.assert_array_equal(got, want)

  def test_topk_keys_ties_and_validity(self):
    scores = jnp.array([[0.0, -0.0, 2.0, 0.0, 5.0]])
    valid = jnp.array([[True, True, True, True, False]])
    idx, cnt = selection.topk_keys(scores, 3, valid=valid)
    np.testing.assert_array_equal(idx, [[2, 0, 1]])
    np.testing.assert_array_equal(cnt, [3])
    _, cnt = selection.topk_keys(scores, 5, valid=valid)
    np.testing.assert_array_equal(cnt, [4])

  def test_block_majority_of_lists(self):
    # Blocks of 4 over 10 keys: [0, 4) gets 3 keys, [4, 8) 2 (no majority),
    # the ragged [8, 10) 2 of 2; an invalid entry does not vote.
    idx = jnp.array([[0, 1, 2, 4, 5, 8, 9, 3]])
    valid = jnp.array([[True] * 7 + [False]])
    got = selection.block_majority(idx, valid, 10, 4)
    np.testing.assert_array_equal(got, [[True, False, True]])

if __name__ == "__main__":
  absltest.main()
