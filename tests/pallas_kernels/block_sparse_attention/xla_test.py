"""The "xla" gather backend against the dense reference."""

import dataclasses
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from eval import matmul_flops
from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse_attention import api
from pallas_kernels.block_sparse_attention import xla
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

  def test_memory_of_a_fixed_density_is_chunked(self):
    # A layout of constant density lists T/8 kv blocks per query block, so
    # its one-shot gather grows 4x per doubling of T; chunks of query blocks
    # keep one chunk's work bounded and the growth near 2x.
    def temp_bytes(t):
      q, k, v = test_base.random_qkv(0, 1, t, t, 1, 1, 16)
      layout = test_base.random_layout(1, 1, 1, t, t, 64, 64, density=0.125)
      fn = lambda q, k, v: api.block_sparse_attention(
          q, k, v, layout, implementation="xla")
      with mock.patch.object(xla, "_CHUNK_ELEMENTS", 1 << 16):
        compiled = jax.jit(fn).lower(q, k, v).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    self.assertLess(temp_bytes(4096) / temp_bytes(2048), 2.6)

  def test_rows_of_a_causal_layout_are_gathered_in_ranges(self):
    # Four ranges of query blocks, each with its own longest row: 10/16 of
    # the slots of one Kmax for every row; values and gradients unchanged
    # (the reference checks), and uniform rows are not split.
    t = 1024
    causal = BlockLayout.causal(t, t, block_q=64, block_kv=64)
    (name, splits), = xla.host_layout_options(causal)
    self.assertEqual((name, splits), ("row_splits", ((0, 4, 4), (4, 8, 8),
                                                     (8, 12, 12),
                                                     (12, 16, 16))))
    self.assertEqual(xla.host_layout_options(BlockLayout.dense(t, t)), ())
    q, k, v = test_base.random_qkv(0, 1, t, t, 2, 1, 16)

    def flops(layout):
      return matmul_flops.matmul_flops(
          lambda q, k, v: api.block_sparse_attention(
              q, k, v, layout, causal=True, implementation="xla"),
          q, k, v).flops

    unsplit = dataclasses.replace(causal, kv_idx=jnp.asarray(causal.kv_idx))
    self.assertAlmostEqual(flops(causal) / flops(unsplit), 10 / 16)
    self.assert_matches_reference(q[:, :300], k[:, :300], v[:, :300],
                                  BlockLayout.causal(300, 300, block_q=32,
                                                     block_kv=32),
                                  causal=True)

  @parameterized.named_parameters(
      ("gqa_causal_bias_empty_rows", "mixed"), ("segments", "segments"),
      ("tiles_per_q_head_bf16", "tiles"))
  def test_many_query_block_chunks(self, case):
    # One query block per chunk (and a padded last chunk) changes nothing.
    kwargs = {}
    if case == "mixed":
      b, t, s, hq, hkv = 2, 80, 72, 4, 2
      layout = test_base.random_layout(34, 1, hkv, t, s, 16, 32,
                                       empty_rows=True)
      kwargs = dict(causal=True, bias_k=jax.random.normal(
          jax.random.key(33), (b, 1, s)))
    elif case == "segments":
      b, t, s, hq, hkv = 2, 160, 160, 2, 2
      seg = np.sort(np.random.default_rng(0).integers(0, 4, (b, t)),
                    axis=-1).astype(np.int32)
      layout = test_base.random_layout(7, 1, 1, t, s, 32, 32, density=0.8,
                                       full_fraction=0.0)
      kwargs = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=True)
    else:
      b, t, s, hq, hkv = 1, 100, 120, 4, 2
      mask = np.random.default_rng(3).random((1, hq, t, s)) < 0.3
      mask[:, :, :, :40] = True
      layout = BlockLayout.from_element_mask(mask, 32, 32)
    dtype = jnp.bfloat16 if case == "tiles" else jnp.float32
    q, k, v = test_base.random_qkv(32, b, t, s, hq, hkv, 16, dtype)
    with mock.patch.object(xla, "_CHUNK_ELEMENTS", 1):
      self.assert_matches_reference(q, k, v, layout, **kwargs)


if __name__ == "__main__":
  absltest.main()
