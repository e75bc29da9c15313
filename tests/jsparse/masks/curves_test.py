"""Gilbert curve order: a permutation with (near) unit steps."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from jsparse.masks import curves


class GilbertTest(parameterized.TestCase):

  @parameterized.parameters((4, 4, 4), (8, 16, 16), (6, 10, 14), (5, 7),
                            (1, 1, 9), (13, 30, 45), (3, 3, 3))
  def test_permutation_with_short_steps(self, *shape):
    perm, inverse = curves.gilbert_order(shape)
    n = int(np.prod(shape))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    np.testing.assert_array_equal(perm[inverse], np.arange(n))
    sides = (1,) * (3 - len(shape)) + shape
    coords = np.stack(np.unravel_index(perm, sides), 1)
    steps = np.abs(np.diff(coords, axis=0)).sum(1)
    if all(s % 2 == 0 or s == 1 for s in shape):
      self.assertEqual(steps.max(), 1)  # a true Hamiltonian path
    else:
      self.assertLessEqual(steps.max(), 2)  # rare diagonal steps (odd)

  def test_blocks_are_compact(self):
    # 64 consecutive curve tokens of an 8x16x16 grid form a 4x4x4 cube.
    perm, _ = curves.gilbert_order((8, 16, 16))
    coords = np.stack(np.unravel_index(perm, (8, 16, 16)), 1)
    for start in range(0, perm.size, 64):
      extent = np.ptp(coords[start:start + 64], axis=0) + 1
      self.assertEqual(int(np.prod(extent)), 64)

  def test_rearrange_round_trip_with_prefix(self):
    perm, inverse = curves.gilbert_order((2, 4, 4))
    x = jnp.arange(3 + 32 + 2)[None, :, None]
    y = curves.rearrange(x, perm, num_prefix=3)
    np.testing.assert_array_equal(y[0, 3:35, 0], 3 + perm)
    np.testing.assert_array_equal(y[0, :3, 0], [0, 1, 2])
    np.testing.assert_array_equal(
        curves.rearrange(y, inverse, num_prefix=3), x)


if __name__ == "__main__":
  absltest.main()
