"""The "mosaic_gpu" forward: CPU lowering for an abstract H100, schedule.

No GPU has run this kernel. Without one the kernel can only be lowered (the
Mosaic GPU interpreter cannot run wgmma pipelines); the value test is marked
`gpu` and skipped elsewhere.
"""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import api
from pallas_kernels.block_sparse_attention import pallas_mosaic_gpu
from pallas_kernels.block_sparse_attention import tile_math
from tests import tolerances
from tests.pallas_kernels.block_sparse_attention import test_base

_H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
_MOSAIC_GPU_CALL = "mosaic_gpu_v2"


def _spec(t, s, d, *, band=None, causal=False):
  return tile_math.MaskSpec(q_len=t, kv_len=s, kv_len_padded=s, band=band,
                            has_segments=False, has_tiles=False,
                            sm_scale=d ** -0.5, softcap=None, causal=causal)


class LoweringTest(parameterized.TestCase):
  """Exports for CUDA with an abstract H100: lowering errors fail CI."""

  @parameterized.product(dtype=[jnp.bfloat16, jnp.float16],
                         head_dim=[64, 128])
  def test_exports_for_h100(self, dtype, head_dim):
    b, hq, hkv = 2, 4, 2
    if head_dim == 128:  # Causal, a windowed layout (band), ragged T and S.
      t, s, causal = 300, 320, True
      layout = BlockLayout.local(t, s, window=(200, 0), block_q=128,
                                 block_kv=128)
    else:  # Nothing to mask: the masked loop is traced without a mask.
      t, s, causal = 256, 256, False
      layout = BlockLayout.dense(t, s, block_q=128, block_kv=64)

    def fn(q, k, v):
      return block_sparse_attention(q, k, v, layout, causal=causal,
                                    return_lse=True,
                                    implementation="mosaic_gpu")

    args = (jax.ShapeDtypeStruct((b, t, hq, head_dim), dtype),
            jax.ShapeDtypeStruct((b, s, hkv, head_dim), dtype),
            jax.ShapeDtypeStruct((b, s, hkv, head_dim), dtype))
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
        abstract_device=_H100)
    # The CPU host cannot choose the backend; lowering for CUDA can.
    with (mock.patch.object(pallas_mosaic_gpu, "unavailable_reason",
                            return_value=None),
          jax.sharding.use_abstract_mesh(mesh)):
      exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    self.assertEqual(exported.mlir_module().count(_MOSAIC_GPU_CALL), 1)
    out, lse = exported.out_avals
    self.assertEqual((out.shape, out.dtype), ((b, t, hq, head_dim), dtype))
    self.assertEqual((lse.shape, lse.dtype), ((b, hq, t), jnp.float32))


class ScheduleTest(absltest.TestCase):

  def test_masked_blocks_first_hidden_dropped(self):
    # Row 0 lists kv block 0 (FULL, but cut by the causal diagonal); row 1
    # lists 0 (FULL), 1 (PARTIAL, the diagonal) and 2 (above the diagonal:
    # dropped under causal=True).
    present = np.zeros((1, 1, 2, 3), bool)
    present[0, 0, 1] = True
    present[0, 0, 0, 0] = True
    full = np.zeros_like(present)
    full[0, 0, :, 0] = True
    layout = BlockLayout.from_block_mask(present, 64, 64,
                                         full_block_mask=full)
    spec = _spec(128, 192, 64, causal=True)
    codes, counts = pallas_mosaic_gpu.schedule(layout, spec, jnp.int32(0))
    np.testing.assert_array_equal(counts[0, 0], [[1, 1], [1, 2]])
    # Masked: block 1 (PARTIAL, code 3); unmasked: block 0 (FULL, code 0).
    np.testing.assert_array_equal(codes[0, 0, 1, :2], [3, 0])

  def test_ragged_last_block_is_masked(self):
    layout = BlockLayout.dense(100, 100, block_q=64, block_kv=64)
    spec = tile_math.MaskSpec(q_len=100, kv_len=100, kv_len_padded=128,
                              band=None, has_segments=False,
                              has_tiles=False, sm_scale=1.0, softcap=None)
    codes, counts = pallas_mosaic_gpu.schedule(layout, spec, None)
    np.testing.assert_array_equal(counts[0, 0], [[1, 2], [1, 2]])
    np.testing.assert_array_equal(codes[0, 0, :, 0] // 2, [1, 1])


class SupportTest(absltest.TestCase):

  def test_unavailable_without_gpu_and_says_unverified(self):
    reason = pallas_mosaic_gpu.unavailable_reason("cpu", True)
    self.assertIn("sm90", reason)
    self.assertIn("unverified", reason)
    self.assertIsNone(pallas_mosaic_gpu.unavailable_reason("gpu", False))
    self.assertNotIn("mosaic_gpu", api.PREFERENCE["gpu"])

  def test_unsupported_inputs_raise(self):
    layout = BlockLayout.dense(128, 128, block_q=128, block_kv=128)
    q = jnp.zeros((1, 128, 2, 64), jnp.float32)
    with self.assertRaisesRegex(NotImplementedError, "bfloat16 or float16"):
      pallas_mosaic_gpu.forward(q, q, q, None, None, None, layout,
                                _spec(128, 128, 64))
    q = q.astype(jnp.bfloat16)
    bias = jnp.zeros((1, 2, 128), jnp.bfloat16)
    with self.assertRaisesRegex(NotImplementedError, "bias_k"):
      pallas_mosaic_gpu.forward(q, q, q, bias, None, None, layout,
                                _spec(128, 128, 64))
    small = BlockLayout.dense(128, 128, block_q=64, block_kv=64)
    with self.assertRaisesRegex(NotImplementedError, "block_q == 128"):
      pallas_mosaic_gpu.forward(q, q, q, None, None, None, small,
                                _spec(128, 128, 64))

  def test_backward_raises(self):
    with self.assertRaisesRegex(NotImplementedError, "forward pass only"):
      pallas_mosaic_gpu.backward(*([None] * 12))


@pytest.mark.gpu
@absltest.skipIf(jax.default_backend() != "gpu", "needs an sm90 GPU")
class GpuValuesTest(parameterized.TestCase):
  """Values against the dense reference; run by eval/gpu_check.py."""

  @parameterized.product(dtype=[jnp.bfloat16, jnp.float16],
                         head_dim=[64, 128], causal=[False, True])
  def test_matches_reference(self, dtype, head_dim, causal):
    b, t, s, hq, hkv = 2, 300, 320, 4, 2
    q, k, v = test_base.random_qkv(0, b, t, s, hq, hkv, head_dim, dtype)
    layout = test_base.random_layout(0, b, hkv, t, s, 128, 128,
                                     empty_rows=True)
    got, got_lse = block_sparse_attention(
        q, k, v, layout, causal=causal, return_lse=True,
        implementation="mosaic_gpu")
    want, want_lse = block_sparse_attention(
        q, k, v, layout, causal=causal, return_lse=True,
        implementation="reference")
    tol = tolerances.atol(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32), atol=tol)
    np.testing.assert_allclose(got_lse, want_lse, atol=tol)


if __name__ == "__main__":
  absltest.main()
