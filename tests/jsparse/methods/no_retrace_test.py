"""Dynamic methods trace once per shape, never once per batch of data.

Each method is built as `eval/bench_methods.py: make_case` builds it, at a
small length, and called under `jax.jit` on fresh random q, k, v.
"""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax

from eval import bench_methods
from tests.jsparse.methods import method_test_base

DYNAMIC = ("hip", "sea", "psa", "blade", "llsa", "dma", "sparsifiner")
# Methods whose configuration does not depend on the length.
LENGTH_FREE = ("hip", "psa", "blade", "llsa")
T, H, D = 256, 2, 32
# PSA keeps no block of a 2 x 2 block grid at T = 256 (level capacities all
# 0); at 4 x 4 it runs a level.
LENGTH = {"psa": 512}
NUM_BATCHES = 3


def _jitted(method, max_traces):
  fn = chex.assert_max_traces(lambda q, k, v: method(q, k, v),
                              n=max_traces)
  return jax.jit(fn)


def _case(name):
  t = LENGTH.get(name, T)
  return bench_methods.make_case(name, t, H, D), t


def _batch(seed, t):
  return method_test_base.random_qkv(seed, 1, t, t, H, H, D)


class NoRetraceTest(parameterized.TestCase):

  def tearDown(self):
    chex.clear_trace_counter()
    super().tearDown()

  @parameterized.named_parameters((n, n) for n in DYNAMIC)
  def test_traces_once_across_batches(self, name):
    case, t = _case(name)
    run = _jitted(case.method, max_traces=1)
    for seed in range(NUM_BATCHES):
      out = run(*_batch(seed, t))
      chex.assert_shape(out, (1, t, H, D))
      chex.assert_tree_all_finite(out)
    self.assertEqual(run._cache_size(), 1)

  @parameterized.named_parameters((n, n) for n in LENGTH_FREE)
  def test_retraces_once_per_length(self, name):
    case, t = _case(name)
    lengths = (t, 2 * t)
    run = _jitted(case.method, max_traces=len(lengths))
    for length in lengths:
      for seed in range(NUM_BATCHES):
        chex.assert_shape(run(*_batch(seed, length)), (1, length, H, D))
    self.assertEqual(run._cache_size(), len(lengths))


if __name__ == "__main__":
  absltest.main()
