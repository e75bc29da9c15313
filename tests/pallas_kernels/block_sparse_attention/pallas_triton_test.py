"""The "triton" backend in Pallas interpret mode, and its Triton lowering."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
# Private: parse the exported module and the Triton kernels it embeds.
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as triton_lowering
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse_attention import api
from pallas_kernels.block_sparse_attention import config
from pallas_kernels.block_sparse_attention import pallas_triton
from pallas_kernels.block_sparse_attention import pallas_triton_vjp
from tests.pallas_kernels.block_sparse_attention import test_base

_H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
_TRITON_CALL = "__gpu$xla.gpu.triton"
# Base-class products re-parameterized below with covering subsets: interpret
# mode compiles three kernels per case.
_TRIMMED = ("test_random_layout", "test_block_sizes_and_causal",
            "test_causal_offset", "test_bias_k")


class PallasTritonTest(test_base.BlockSparseAttentionTestBase):
  IMPLEMENTATION = "triton"
  INTERPRET = True

  @parameterized.named_parameters(
      ("shared_bf16", (1, 256, 256, 2, 2, 32), "shared", jnp.bfloat16),
      ("gqa_kv_heads_ragged", (2, 200, 328, 4, 2, 16), "kv", jnp.float32),
      ("gqa_q_heads_d8", (1, 130, 70, 6, 2, 8), "q", jnp.bfloat16),
  )
  def test_random_layout_subset(self, shape, heads, dtype):
    b, t, s, hq, hkv, d = shape
    q, k, v = test_base.random_qkv(0, b, t, s, hq, hkv, d, dtype)
    layout = test_base.random_layout(
        1, b, test_base.layout_heads(heads, hq, hkv), t, s, 64, 64)
    self.assert_matches_reference(q, k, v, layout)

  @parameterized.parameters((False, (32, 64)), (True, (64, 32)))
  def test_block_sizes_and_causal_subset(self, causal, block):
    q, k, v = test_base.random_qkv(1, 1, 192, 192, 2, 1, 16)
    layout = test_base.random_layout(2, 1, 1, 192, 192, *block, density=0.7)
    self.assert_matches_reference(q, k, v, layout, causal=causal)

  def test_causal_offset_subset(self):
    q, k, v = test_base.random_qkv(2, 1, 96, 160, 2, 2, 16)
    layout = BlockLayout.causal(96, 160, block_q=32, block_kv=32, offset=-40)
    self.assert_matches_reference(q, k, v, layout)

  @parameterized.parameters(((1, 1), jnp.float32), ((2, 4), jnp.bfloat16),
                            ((1, 2), jnp.float32))
  def test_bias_k_subset(self, bias_shape, dtype):
    b, t, s, hq, hkv, d = 2, 128, 96, 4, 2, 16
    q, k, v = test_base.random_qkv(3, b, t, s, hq, hkv, d, dtype)
    bias = jax.random.normal(jax.random.key(4), (*bias_shape, s)).astype(dtype)
    layout = test_base.random_layout(5, 1, hkv, t, s, 32, 32, density=0.6)
    self.assert_matches_reference(q, k, v, layout, bias_k=bias)

  @hypothesis.settings(max_examples=2, deadline=None, derandomize=True)
  @hypothesis.given(
      t=st.integers(1, 130), s=st.integers(1, 130),
      block_q=st.sampled_from([16, 32]), block_kv=st.sampled_from([16, 32]),
      group=st.sampled_from([1, 2]), causal=st.booleans(),
      seed=st.integers(0, 1000))
  def test_hypothesis_shapes(self, t, s, block_q, block_kv, group, causal,
                             seed):
    q, k, v = test_base.random_qkv(seed, 1, t, s, 2 * group, 2, 8)
    layout = test_base.random_layout(seed, 1, 2, t, s, block_q, block_kv,
                                     density=0.6)
    self.assert_matches_reference(q, k, v, layout, causal=causal)

  def test_sub_tiles(self):
    # Programs own 16-row/16-key slabs of 32x64 layout blocks and walk them
    # in 16-wide chunks: exercises slab/chunk offsets into tiles and masks.
    small = config.TritonConfig(
        block_q=16, block_kv=16, dq_block_q=16, dq_block_kv=16,
        dkv_block_kv=16, dkv_block_q=16)
    b, t, s, hq, hkv = 1, 80, 120, 4, 2
    rng = np.random.default_rng(5)
    mask = rng.random((b, hq, t, s)) < 0.4
    mask[..., :50] = True
    layout = BlockLayout.from_element_mask(mask, 32, 64)
    q, k, v = test_base.random_qkv(21, b, t, s, hq, hkv, 16)
    seg = np.repeat(np.arange(4), 32)[None, :t].astype(np.int32)
    kv_seg = np.repeat(np.arange(4), 32)[None, :s].astype(np.int32)
    bias = jax.random.normal(jax.random.key(6), (b, hq, s))
    with mock.patch.object(pallas_triton, "kernel_config",
                           return_value=small):
      self.assert_matches_reference(q, k, v, layout, bias_k=bias,
                                    q_segment_ids=seg, kv_segment_ids=kv_seg,
                                    causal=True)

  @parameterized.parameters((1, 1, "shared"), (4, 2, "q"), (264, 4, "q"))
  def test_gqa_dkv_splits(self, min_programs, splits, heads):
    # Group 4 on 2 dK/dV programs (2 kv slabs x 1 x 1): the group summed by
    # one program, split over two, or over four (one q head each).
    b, t, s, hq, hkv = 1, 64, 64, 4, 1
    q, k, v = test_base.random_qkv(9, b, t, s, hq, hkv, 16)
    hl = test_base.layout_heads(heads, hq, hkv)
    layout = test_base.random_layout(10, 1, hl, t, s, 32, 32, density=0.7)
    bias = jax.random.normal(jax.random.key(11), (1, hl, s))
    with mock.patch.object(pallas_triton_vjp, "_MIN_DKV_PROGRAMS",
                           min_programs):
      self.assertEqual(pallas_triton_vjp.dkv_splits(2, hq), splits)
      self.assert_matches_reference(q, k, v, layout, bias_k=bias,
                                    causal=True)

  def test_dkv_splits_heuristic(self):
    # MQA, B=1, T=4k, 64-key slabs: 64 programs, split to 8 x 64 = 512.
    self.assertEqual(pallas_triton_vjp.dkv_splits(64, 8), 8)
    self.assertEqual(pallas_triton_vjp.dkv_splits(64, 12), 6)
    self.assertEqual(pallas_triton_vjp.dkv_splits(200, 4), 2)
    self.assertEqual(pallas_triton_vjp.dkv_splits(512, 8), 1)
    self.assertEqual(pallas_triton_vjp.dkv_splits(1, 1), 1)

  def test_block_size_must_be_power_of_two(self):
    q, k, v = test_base.random_qkv(0, 1, 48, 48, 1, 1, 16)
    layout = BlockLayout.dense(48, 48, block_q=24, block_kv=16)
    with self.assertRaisesRegex(ValueError, "block_q"):
      self.attention(q, k, v, layout)

  def test_unavailable_reason(self):
    self.assertIsNone(pallas_triton.unavailable_reason("gpu", False))
    self.assertIsNone(pallas_triton.unavailable_reason("cpu", True))
    self.assertIn("GPU", pallas_triton.unavailable_reason("cpu", False))
    self.assertIn("triton",
                  api.available_implementations("cpu", interpret=True))
    self.assertNotIn("triton", api.available_implementations("cpu"))


def _drop_inherited(cls, prefixes):
  """Hides the base class's generated cases re-parameterized in `cls`."""
  for name in dir(test_base.BlockSparseAttentionTestBase):
    for prefix in prefixes:
      if name.startswith(prefix) and name[len(prefix):].isdigit():
        setattr(cls, name, None)


_drop_inherited(PallasTritonTest, _TRIMMED)


def _export_for_h100(fn, *args):
  """Exports jit(fn) for CUDA on an abstract H100; returns the MLIR text."""
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
      abstract_device=_H100)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
    )(*args)
  return exported.mlir_module()


def _triton_kernels(module_text):
  """The Triton IR (tt dialect text) of each Triton call in a module.

  Pallas stores each kernel as MLIR bytecode in the "ir" entry of the call's
  backend config.
  """
  payloads = []

  def visit(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          attrs = child.operation.attributes
          if (child.operation.name == "stablehlo.custom_call"
              and ir.StringAttr(attrs["call_target_name"]).value
              == _TRITON_CALL):
            config = ir.DictAttr(attrs["mhlo.backend_config"])
            payloads.append(ir.StringAttr(config["ir"]).value_bytes)
          visit(child.operation)

  with mlir.make_ir_context():
    visit(ir.Module.parse(module_text).operation)
  with triton_lowering._new_ir_context():  # pylint: disable=protected-access
    return [str(ir.Module.parse(payload)) for payload in payloads]


class TritonLoweringTest(parameterized.TestCase):
  """Exports for CUDA with an abstract H100: Triton lowering errors fail CI."""

  @parameterized.product(dtype=[jnp.float32, jnp.bfloat16], head_dim=[64, 128],
                         grad=[False, True])
  def test_exports_for_h100(self, dtype, head_dim, grad):
    b, t, hq, hkv = 1, 1024, 4, 2
    rng = np.random.default_rng(0)
    mask = rng.random((1, hkv, t, t)) < 0.3
    mask[..., :256] = True
    tiled = BlockLayout.from_element_mask(mask, 128, 128)
    causal = BlockLayout.causal(t, block_q=128, block_kv=128)

    # interpret=True only lets this CPU host pick the backend; lowering for
    # CUDA always takes the Triton branch.
    def loss(q, k, v, bias, seg):
      masked = api.block_sparse_attention(
          q, k, v, tiled, bias_k=bias, q_segment_ids=seg, kv_segment_ids=seg,
          causal=True, implementation="triton", interpret=True)
      plain = api.block_sparse_attention(q, k, v, causal,
                                         implementation="triton",
                                         interpret=True)
      return jnp.sum(masked.astype(jnp.float32) * plain.astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1, 2, 3)) if grad else loss
    module = _export_for_h100(
        fn, jax.ShapeDtypeStruct((b, t, hq, head_dim), dtype),
        jax.ShapeDtypeStruct((b, t, hkv, head_dim), dtype),
        jax.ShapeDtypeStruct((b, t, hkv, head_dim), dtype),
        jax.ShapeDtypeStruct((b, hq, t), dtype),
        jax.ShapeDtypeStruct((b, t), jnp.int32))
    # Two forward calls, plus a dQ and a dK/dV call each under grad.
    self.assertEqual(module.count(_TRITON_CALL), 6 if grad else 2)
    for kernel in ("block_sparse_attention_fwd", "block_sparse_attention_dq",
                   "block_sparse_attention_dkv")[:3 if grad else 1]:
      self.assertIn(kernel, module)

  @parameterized.parameters(None, 30.0)
  def test_triton_ir_softmax_is_base2(self, softcap):
    # Forward, dQ and dK/dV kernels: exp2 (libdevice __nv_exp2f, one ex2
    # instruction) and no __nv_expf anywhere.
    t, d = 256, 64
    layout = BlockLayout.causal(t, block_q=64, block_kv=64)

    def loss(q, k, v):
      out = api.block_sparse_attention(
          q, k, v, layout, softcap=softcap, implementation="triton",
          interpret=True)
      return jnp.sum(out.astype(jnp.float32))

    spec = jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
    kernels = _triton_kernels(
        _export_for_h100(jax.grad(loss, argnums=(0, 1, 2)), spec, spec, spec))
    self.assertLen(kernels, 3)
    for kernel in kernels:
      self.assertIn("tt.func", kernel)
      self.assertIn("__nv_exp2f", kernel)
      self.assertNotIn("__nv_expf", kernel)


if __name__ == "__main__":
  absltest.main()
