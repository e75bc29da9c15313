"""Sort-free exact top-n against a stable sort."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.masks import top_n


def _tied_scores(rows, cols, seed):
  """Multiples of 0.5 (many ties) with rows of 0.0, -0.0, -inf and inf."""
  rng = np.random.default_rng(seed)
  x = (rng.integers(-3, 4, (rows, cols)) / 2).astype(np.float32)
  x[0], x[1, :5], x[2], x[3, ::2] = 0.0, -0.0, -np.inf, np.inf
  return x


class TopNTest(absltest.TestCase):

  def test_mask_matches_stable_sort(self):
    x = _tied_scores(40, 37, 0)
    n = np.random.default_rng(1).integers(-2, 40, 40)
    got = np.asarray(top_n.top_n_mask(jnp.asarray(x), jnp.asarray(n)))
    for r in range(40):
      want = np.zeros(37, bool)
      want[np.argsort(-x[r], kind="stable")[:max(n[r], 0)]] = True
      np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}")

  def test_indices_are_top_k_in_index_order(self):
    for x in (_tied_scores(24, 70, 2),
              np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 512)))):
      for n in (0, 1, 33, x.shape[-1] // 2, x.shape[-1]):
        got = np.asarray(jax.jit(top_n.top_n_indices, static_argnums=1)(
            jnp.asarray(x), n))
        want = np.sort(np.argsort(-x, -1, kind="stable")[..., :n], -1)
        np.testing.assert_array_equal(got, want, err_msg=f"n={n}")
        self.assertEqual(got.dtype, jnp.int32)

  def test_indices_reject_n_out_of_range(self):
    with self.assertRaisesRegex(ValueError, r"n must be in \[0, 8\]"):
      top_n.top_n_indices(jnp.zeros((2, 8)), 9)

  def test_nth_set_finds_each_rank(self):
    rng = np.random.default_rng(3)
    mask = rng.random((6, 100)) < 0.3
    which = np.arange(40)[None]
    pos, count = top_n.nth_set(jnp.asarray(mask), jnp.asarray(which))
    np.testing.assert_array_equal(count, mask.sum(-1))
    for r in range(6):
      want = np.flatnonzero(mask[r])
      np.testing.assert_array_equal(np.asarray(pos[r, :want.size]),
                                    want[:40])


if __name__ == "__main__":
  absltest.main()
