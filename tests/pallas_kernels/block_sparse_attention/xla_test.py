"""The "xla" gather backend against the dense reference."""

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse_attention import api
from tests.pallas_kernels.block_sparse_attention import test_base


class XlaBlockSparseAttentionTest(test_base.BlockSparseAttentionTestBase):
  IMPLEMENTATION = "xla"

  def test_memory_is_linear_in_sequence_length(self):
    # Temp memory of a fixed-width band layout grows ~linearly with T.
    def temp_bytes(t):
      q, k, v = test_base.random_qkv(0, 1, t, t, 1, 1, 16)
      layout = BlockLayout.local(t, window=(64, 0), block_q=64, block_kv=64)
      fn = lambda q, k, v: api.block_sparse_attention(
          q, k, v, layout, implementation="xla")
      import jax
      compiled = jax.jit(fn).lower(q, k, v).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    self.assertLess(large / small, 4 * 1.5)


if __name__ == "__main__":
  absltest.main()
