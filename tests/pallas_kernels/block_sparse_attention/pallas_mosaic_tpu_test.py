"""The "mosaic_tpu" backend on CPU: interpret mode, TPU semantics, lowering.

Interpret mode compiles each kernel for the CPU (seconds per case), so the
inherited parameterizations are narrowed to a subset that still covers values
and gradients, f32/bf16, GQA, per-batch/per-head layouts, bias, segments,
tiles, causal, empty rows and ragged sizes.
"""

import dataclasses
import functools
import math
import re

from absl.testing import absltest
from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import config as config_lib
from pallas_kernels.block_sparse_attention import pallas_mosaic_tpu
from pallas_kernels.block_sparse_attention import tile_math
from pallas_kernels.block_sparse_attention import xla
from tests import tolerances
from tests.pallas_kernels.block_sparse_attention import test_base

def _base_test(name):
  """The undecorated test `name` of the base class."""
  base = test_base.BlockSparseAttentionTestBase
  return getattr(base, name + "0").__wrapped__


def _narrowed(cls):
  """Drops inherited cases of the base tests that `cls` re-parameterizes.

  The narrowed parameter lists generate name0, name1, ...; inherited cases
  past their length would otherwise still run.
  """
  for attr in dir(test_base.BlockSparseAttentionTestBase):
    stem = attr.rstrip("0123456789")
    if stem != attr and stem + "0" in vars(cls) and attr not in vars(cls):
      setattr(cls, attr, None)
  return cls


@_narrowed
class MosaicTpuInterpretTest(test_base.BlockSparseAttentionTestBase):
  IMPLEMENTATION = "mosaic_tpu"
  INTERPRET = True

  @parameterized.parameters(
      ((2, 200, 328, 4, 2, 16), "q", jnp.float32),
      ((1, 130, 70, 6, 2, 8), "kv", jnp.bfloat16),
  )
  def test_random_layout(self, shape, heads, dtype):
    _base_test("test_random_layout")(self, shape, heads, dtype)

  @parameterized.parameters((True, (32, 64)))
  def test_block_sizes_and_causal(self, causal, block):
    _base_test("test_block_sizes_and_causal")(self, causal, block)

  @parameterized.parameters((-40,))
  def test_causal_offset(self, offset):
    _base_test("test_causal_offset")(self, offset)

  @parameterized.parameters(((1, 2), jnp.float32))
  def test_bias_k(self, bias_shape, dtype):
    _base_test("test_bias_k")(self, bias_shape, dtype)

  @parameterized.parameters((True,))
  def test_full_density_equals_dot_product_attention(self, causal):
    _base_test("test_full_density_equals_dot_product_attention")(self, causal)

  @hypothesis.settings(max_examples=2, deadline=None, derandomize=True)
  @hypothesis.given(
      t=st.integers(1, 130), s=st.integers(1, 130),
      block_q=st.sampled_from([16, 32]), block_kv=st.sampled_from([16, 32]),
      group=st.sampled_from([1, 2]), causal=st.booleans(),
      seed=st.integers(0, 1000))
  def test_hypothesis_shapes(self, **kwargs):
    base = test_base.BlockSparseAttentionTestBase
    base.test_hypothesis_shapes.hypothesis.inner_test(self, **kwargs)


def _padded_problem(b, t, s, hq, hkv, d, *, bias_shape=None, causal=False):
  """Block-padded inputs and a MaskSpec, as the op hands them to backends."""
  q, k, v = test_base.random_qkv(0, b, t, s, hq, hkv, d)
  bias = None
  if bias_shape is not None:
    bias = jax.random.normal(jax.random.key(1), (*bias_shape, s))
  spec = tile_math.MaskSpec(
      q_len=t, kv_len=s, kv_len_padded=s, band=(None, 0) if causal else None,
      has_segments=False, has_tiles=False, sm_scale=1 / math.sqrt(d),
      softcap=None)
  return q, k, v, bias, spec


class StepListTest(absltest.TestCase):
  """Rows are walked as lists of their live slots (COO)."""

  def _walk(self, idx, cnt, kind, rows_are_q, causal=True, **kwargs):
    layout = BlockLayout.dense(128, 128, block_q=32, block_kv=32)
    spec = _padded_problem(1, 128, 128, 1, 1, 8)[-1]
    spec = dataclasses.replace(spec, causal=causal)
    with jax.numpy_rank_promotion("allow"):
      out = pallas_mosaic_tpu._layout_lists(
          layout, spec, jnp.int32(0), idx, cnt, kind, None,
          rows_are_q=rows_are_q, **kwargs)
    return {name: np.asarray(getattr(out, name))
            for name in ("row", "block", "code", "edge")}

  def test_causal_walks_skip_hidden_slots(self):
    layout = BlockLayout.dense(128, 128, block_q=32, block_kv=32)
    lt = layout.transpose()
    first, last = (pallas_mosaic_tpu._FIRST_OF_ROW | pallas_mosaic_tpu.
                   _FIRST_OF_RUN), (pallas_mosaic_tpu._LAST_OF_ROW
                                    | pallas_mosaic_tpu._LAST_OF_RUN)
    # Forward: q block i walks kv blocks 0..i, 10 of the 16 slots; the
    # rest of the 16 steps stay on the last row and block, doing nothing.
    walk = self._walk(layout.kv_idx, layout.kv_cnt, layout.kv_kind, True,
                      steps=None)
    np.testing.assert_array_equal(
        walk["row"], [0, 1, 1, 2, 2, 2, 3, 3, 3, 3] + [3] * 6)
    np.testing.assert_array_equal(
        walk["block"], [0, 0, 1, 0, 1, 2, 0, 1, 2, 3] + [3] * 6)
    np.testing.assert_array_equal(walk["code"], [2] * 10 + [0] * 6)
    starts, ends = [0, 1, 3, 6], [0, 2, 5, 9]
    for n, edge in enumerate(walk["edge"]):
      want = (first if n in starts else 0) | (last if n in ends else 0)
      self.assertEqual(edge, want, f"step {n}")
    # Transposed: kv block i is walked by q blocks i..3.
    walk = self._walk(lt.q_idx, lt.q_cnt, lt.q_kind, False, steps=10)
    np.testing.assert_array_equal(walk["row"],
                                  [0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(walk["block"],
                                  [0, 1, 2, 3, 1, 2, 3, 2, 3, 3])

  def test_empty_rows_keep_one_skipped_step(self):
    idx = np.array([[[[0, 1], [0, 1], [1, 0]]]], np.int32)
    cnt = np.array([[[2, 0, 1]]], np.int32)
    kind = np.full((1, 1, 3, 2), 2, np.int8)
    walk = self._walk(idx, cnt, kind, True, causal=False, steps=4)
    np.testing.assert_array_equal(walk["row"], [0, 0, 1, 2])
    np.testing.assert_array_equal(walk["code"], [2, 2, 0, 2])
    # The skipped step fetches the previous block: no copy.
    np.testing.assert_array_equal(walk["block"], [0, 1, 1, 1])
    self.assertEqual(walk["edge"][2] & 3, 3)  # first and last of its row

  def test_gqa_walk_visits_members_per_row(self):
    # dK/dV: 2 kv blocks, 2 q heads per kv head with lists of their own.
    idx = np.array([[[[0, 1], [1, 0]], [[1, 0], [0, 1]]]], np.int32)
    cnt = np.array([[[2, 1], [1, 0]]], np.int32)
    kind = np.full((1, 2, 2, 2), 2, np.int8)
    layout = BlockLayout.dense(64, 64, block_q=32, block_kv=32)
    spec = _padded_problem(1, 64, 64, 2, 1, 8)[-1]
    out = pallas_mosaic_tpu._layout_lists(
        layout, spec, None, idx, cnt, kind, None, rows_are_q=False,
        steps=pallas_mosaic_tpu.walk_length(cnt, 2, 2, True), group=2,
        per_member=True)
    # (row 0: member 0 twice, member 1 once), (row 1: member 0, member 1
    # empty: one skipped step).
    np.testing.assert_array_equal(out.row, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(out.member, [0, 0, 1, 0, 1])
    np.testing.assert_array_equal(out.block, [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(out.code, [2, 2, 2, 2, 0])


class SmemBudgetTest(parameterized.TestCase):
  """Layouts over the SMEM budget run as batch / kv-head slices."""

  def test_split_matches_xla_backend(self):
    b, t, hq, hkv, d = 2, 64, 4, 2, 8
    layout = test_base.random_layout(3, b, hkv, t, t, 16, 16, density=0.7)
    q, k, v, bias, spec = _padded_problem(b, t, t, hq, hkv, d,
                                          bias_shape=(b, hq), causal=True)
    # Only one (batch, kv head) slice of the lists fits: a 2 x 2 split.
    walk = pallas_mosaic_tpu._walks(layout, hq, hq // hkv, None)
    lists = lambda b, h: max(pallas_mosaic_tpu.prefetch_bytes(
        b * h * w.steps, num_blocks=w.num_blocks, num_rows=w.num_rows,
        num_tiles=None, members=w.members) for w in walk)
    budget = lists(1, 1)
    self.assertGreater(min(lists(1, 2), lists(2, 1)), budget)
    cfg = config_lib.MosaicTpuConfig(smem_budget_bytes=budget)
    dout = jax.random.normal(jax.random.key(2), q.shape)
    dlse = jax.random.normal(jax.random.key(3), (b, hq, t))

    @jax.jit
    def forward_backward(q, k, v, bias, dout, dlse):
      args = (q, k, v, bias, None, None, layout, spec)
      out, lse = pallas_mosaic_tpu.forward(*args, config=cfg, interpret=True)
      grads = pallas_mosaic_tpu.backward(*args, out, lse, dout, dlse,
                                         config=cfg, interpret=True)
      want_out, want_lse = xla.forward(*args)
      want = xla.backward(*args, want_out, want_lse, dout, dlse)
      return (out, lse, grads), (want_out, want_lse, want)

    got, want = forward_backward(q, k, v, bias, dout, dlse)
    chex.assert_trees_all_close(got, want,
                                atol=tolerances.grad_atol(q.dtype))

  def test_slice_over_budget_raises(self):
    layout = BlockLayout.causal(64, block_q=16, block_kv=16)
    q, k, v, _, spec = _padded_problem(1, 64, 64, 2, 1, 8)
    cfg = config_lib.MosaicTpuConfig(smem_budget_bytes=8)
    with self.assertRaisesRegex(ValueError, "smem_budget_bytes"):
      pallas_mosaic_tpu.forward(q, k, v, None, None, None, layout, spec,
                                config=cfg, interpret=True)


class TpuInterpretModeTest(parameterized.TestCase):
  """TPU semantics (DMA, races, OOB reads, NaN-filled memory) on tiny cases."""

  @parameterized.named_parameters(("head_major", 8), ("token_major", 128))
  def test_no_races_oob_or_nan(self, d):
    b, t, s, hq, hkv = 1, 48, 40, 2, 1
    q, k, v = test_base.random_qkv(0, b, t, s, hq, hkv, d)
    bias = jax.random.normal(jax.random.key(1), (1, hq, s))
    seg = np.array([[0] * 20 + [1] * 28], np.int32)
    kv_seg = np.array([[0] * 24 + [1] * 16], np.int32)
    layout = test_base.random_layout(2, 1, hkv, t, s, 16, 16, density=0.8,
                                     empty_rows=True)
    cot = jax.random.normal(jax.random.key(3), q.shape)

    def run(implementation, q, k, v, bias):
      fn = lambda *xs: block_sparse_attention(
          *xs[:3], layout, bias_k=xs[3], q_segment_ids=seg,
          kv_segment_ids=kv_seg, causal=True, return_lse=True,
          implementation=implementation, interpret=True)
      (out, lse), vjp = jax.vjp(fn, q, k, v, bias)
      return out, lse, vjp((cot, jnp.zeros_like(lse)))

    params = pltpu.InterpretParams(detect_races=True,
                                   out_of_bounds_reads="raise",
                                   uninitialized_memory="nan")
    with pltpu.force_tpu_interpret_mode(params):
      got = jax.jit(functools.partial(run, "mosaic_tpu"))(q, k, v, bias)
    self.assertFalse(interpret_pallas_call.races.races_found)
    want = jax.jit(functools.partial(run, "reference"))(q, k, v, bias)
    out, lse, grads = got
    chex.assert_tree_all_finite((out, grads))
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want[1]))
    self.assertTrue(np.isneginf(np.asarray(lse)[..., :16]).all())
    chex.assert_trees_all_close(out, want[0], atol=tolerances.atol(q.dtype))
    chex.assert_trees_all_close(grads, want[2],
                                atol=tolerances.grad_atol(q.dtype))


class SplashAgreementTest(parameterized.TestCase):
  """Same masks as jax's splash attention (interpret mode), values + VJP."""

  @parameterized.parameters("causal", "local")
  def test_matches_splash(self, kind):
    h, t, d, block = 2, 256, 32, 128
    q, k, v = test_base.random_qkv(5, 1, t, t, h, h, d)
    if kind == "causal":
      layout = BlockLayout.causal(t, block_q=block, block_kv=block)
      masks = [splash.CausalMask((t, t)) for _ in range(h)]
    else:
      layout = BlockLayout.local(t, window=(100, 0), block_q=block,
                                 block_kv=block)
      masks = [splash.LocalMask((t, t), (100, 0), 0) for _ in range(h)]
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask(masks), block_sizes=sizes, interpret=True)

    def ours(q, k, v):
      return block_sparse_attention(q, k, v, layout,
                                    implementation="mosaic_tpu",
                                    interpret=True)

    def theirs(q, k, v):
      # Splash takes [H, T, D] and does not scale q.
      q, k, v = (x[0].transpose(1, 0, 2) for x in (q, k, v))
      out = kernel(q / math.sqrt(d), k, v)
      return out.transpose(1, 0, 2)[None]

    cot = jax.random.normal(jax.random.key(6), q.shape)

    @jax.jit
    def values_and_grads(q, k, v):
      results = []
      for fn in (ours, theirs):
        out, vjp = jax.vjp(fn, q, k, v)
        results.append((out, vjp(cot)))
      return results

    got, want = values_and_grads(q, k, v)
    chex.assert_trees_all_close(got, want, atol=5e-5, rtol=1e-5)


def _tiled_causal_layout(t, block):
  """A causal layout whose diagonal blocks read a lower-triangular tile."""
  layout = BlockLayout.causal(t, block_q=block, block_kv=block)
  tiles = np.tril(np.ones((block, block), bool))[None]
  tile_idx = np.where(np.asarray(layout.kv_kind) == 1, 0, -1)
  return BlockLayout(layout.kv_idx, layout.kv_cnt, layout.kv_kind,
                     tile_idx.astype(np.int32), tiles, block, block,
                     layout.num_kv_blocks)


def _equations(jaxpr):
  """The equations of a jaxpr, nested jaxprs (kernel bodies) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in jax.tree.leaves(list(eqn.params.values())):
      value = getattr(value, "jaxpr", value)
      if hasattr(value, "eqns"):
        yield from _equations(value)


def _pallas_calls(jaxpr):
  """The pallas_call equations of a jaxpr."""
  return [e for e in _equations(jaxpr) if e.primitive.name == "pallas_call"]


class LaunchTest(absltest.TestCase):
  """Grids and operands of the kernel launches."""

  def test_tile_pool_crosses_the_kernel_boundary_as_int8(self):
    t, block = 64, 32
    layout = _tiled_causal_layout(t, block)
    self.assertEqual(layout.tiles.dtype, jnp.bool_)
    q, k, v, _, spec = _padded_problem(1, t, t, 1, 1, 8)
    spec = dataclasses.replace(spec, has_tiles=True)
    fwd = functools.partial(pallas_mosaic_tpu.forward, bias_k=None,
                            q_seg=None, kv_seg=None, layout=layout,
                            spec=spec, interpret=True)
    [call] = _pallas_calls(jax.make_jaxpr(fwd)(q, k, v).jaxpr)
    dtypes = [x.aval.dtype for x in call.invars]
    self.assertNotIn(jnp.bool_, dtypes)
    pool = [x.aval for x in call.invars if x.aval.shape == layout.tiles.shape]
    self.assertEqual([x.dtype for x in pool], [jnp.int8])

  def _forward_backward_jaxpr(self, b, t, hq, hkv, d):
    """The jaxpr of a forward and backward pass on a causal layout."""
    layout = BlockLayout.causal(t, block_q=32, block_kv=32)
    q, k, v, _, spec = _padded_problem(b, t, t, hq, hkv, d)
    args = dict(bias_k=None, q_seg=None, kv_seg=None, layout=layout,
                spec=spec, interpret=True)

    def forward_backward(q, k, v):
      out, lse = pallas_mosaic_tpu.forward(q, k, v, **args)
      return pallas_mosaic_tpu.backward(q, k, v, out=out, lse=lse, dout=out,
                                        dlse=lse, **args)

    return jax.make_jaxpr(forward_backward)(q, k, v).jaxpr

  def _forward_backward_calls(self, b, t, hq, hkv, d):
    """The pallas_call equations of a forward and backward pass."""
    return _pallas_calls(self._forward_backward_jaxpr(b, t, hq, hkv, d))

  def test_row_statistics_cross_the_boundary_compact(self):
    b, t, h, d = 2, 64, 3, 8
    calls = self._forward_backward_calls(b, t, h, h, d)
    sizes = [[x.aval.size for x in eqn.invars + eqn.outvars
              if x.aval.dtype == jnp.float32] for eqn in calls]
    # The forward writes lse; dQ and dK/dV read lse and delta.
    self.assertEqual([s.count(b * h * t) for s in sizes], [1, 2, 2])
    for s in sizes:
      self.assertNotIn(b * h * t * 128, s)

  def test_kernels_transpose_nothing_in_vmem(self):
    # dK/dV forms k.q^T rather than transposing P and dS.
    for eqn in self._forward_backward_calls(1, 64, 2, 2, 8):
      kernel = eqn.params["jaxpr"]
      names = {e.primitive.name for e in _equations(kernel)}
      self.assertNotIn("transpose", names)
      self.assertIn("dot_general", names)

  def test_batch_and_heads_share_the_leading_parallel_axis(self):
    # Megacore chips split the first parallel axis over two TensorCores.
    calls = self._forward_backward_calls(1, 64, 4, 2, 8)
    grids = [eqn.params["grid_mapping"].grid for eqn in calls]
    # Without host walk lengths: forward, dQ over (B * Hq, Qb * Kmax);
    # dK/dV over (B * Hkv, Kb * G * Qmax).
    self.assertEqual(grids, [(4, 4), (4, 4), (2, 8)])
    for eqn in calls:
      self.assertEqual(eqn.params["compiler_params"].dimension_semantics,
                       ("parallel", "arbitrary"))

  def test_lane_aligned_heads_need_no_transposes(self):
    # D = 128: the kernels index [B, T, H * D] directly (a free reshape);
    # D = 64 keeps head-major operands, transposed around the calls.
    for d, transposes in ((128, 0), (64, 1)):
      calls_and_jaxpr = self._forward_backward_jaxpr(1, 64, 2, 1, d)
      outer = [e for e in calls_and_jaxpr.eqns
               if e.primitive.name == "transpose"
               and e.invars[0].aval.shape[-1] == d]
      self.assertEqual(bool(outer), bool(transposes), f"D={d}")

  def test_lane_aligned_heads_match_xla(self):
    b, t, hq, hkv, d = 2, 64, 4, 2, 128
    layout = test_base.random_layout(5, b, hkv, t, t, 32, 32, density=0.6)
    q, k, v, bias, spec = _padded_problem(b, t, t, hq, hkv, d,
                                          bias_shape=(1, hq), causal=True)
    dout = jax.random.normal(jax.random.key(7), q.shape)
    dlse = jax.random.normal(jax.random.key(8), (b, hq, t))

    @jax.jit
    def forward_backward(q, k, v, bias):
      args = (q, k, v, bias, None, None, layout, spec)
      out, lse = pallas_mosaic_tpu.forward(*args, interpret=True)
      grads = pallas_mosaic_tpu.backward(*args, out, lse, dout, dlse,
                                         interpret=True)
      want_out, want_lse = xla.forward(*args)
      want = xla.backward(*args, want_out, want_lse, dout, dlse)
      return (out, lse, grads), (want_out, want_lse, want)

    got, want = forward_backward(q, k, v, bias)
    chex.assert_trees_all_close(got, want,
                                atol=tolerances.grad_atol(q.dtype))

  def test_host_layout_grids_walk_the_listed_blocks(self):
    # A causal layout of 8 x 8 blocks lists 36 of the 64 (row, slot) pairs:
    # the op's grids take 36 steps per q head, and 2 * 36 per kv head for
    # dK/dV (G = 2), not Qb x Kmax.
    t, block, hq, hkv = 256, 32, 2, 1
    layout = BlockLayout.causal(t, block_q=block, block_kv=block)
    q, k, v, _, _ = _padded_problem(1, t, t, hq, hkv, 8)

    def loss(q, k, v):
      return block_sparse_attention(q, k, v, layout, causal=True,
                                    implementation="mosaic_tpu",
                                    interpret=True).sum()

    calls = _pallas_calls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(
        q, k, v).jaxpr)
    # (The custom VJP's jaxpr holds the forward more than once.)
    grids = {eqn.params["grid_mapping"].grid for eqn in calls}
    self.assertEqual(grids, {(hq, 36), (hkv, 72)})


class BlockSizeAdviceTest(absltest.TestCase):
  """The op says when layout blocks are too small for a TPU."""

  def test_small_blocks_on_tpu_get_advice(self):
    small = BlockLayout.causal(1024, block_q=128, block_kv=128)
    large = BlockLayout.causal(1024, block_q=512, block_kv=512)
    advice = pallas_mosaic_tpu.block_size_advice(small, "tpu", None)
    self.assertIn("128x128", advice)
    self.assertIn("512", advice)
    self.assertIsNone(pallas_mosaic_tpu.block_size_advice(large, "tpu",
                                                          None))
    # Interpret mode and other platforms run no TPU grid.
    self.assertIsNone(pallas_mosaic_tpu.block_size_advice(small, "tpu",
                                                          True))
    self.assertIsNone(pallas_mosaic_tpu.block_size_advice(small, "cpu",
                                                          None))


class VmemLimitTest(parameterized.TestCase):
  """The scoped VMEM limit follows the chip and never exceeds its VMEM."""

  @parameterized.parameters(
      (pltpu.ChipVersion.TPU_V4, 12), (pltpu.ChipVersion.TPU_V5E, 96),
      (pltpu.ChipVersion.TPU_V5P, 48), (pltpu.ChipVersion.TPU_V6E, 96),
      (pltpu.ChipVersion.TPU_7X, 48))
  def test_limit_of_chip(self, chip, mib):
    capacity = pltpu.get_tpu_info_for_chip(chip, 1).vmem_capacity_bytes
    limit = config_lib.MosaicTpuConfig().vmem_limit(capacity)
    self.assertEqual(limit, mib * 2**20)
    self.assertLessEqual(limit, capacity)

  def test_unknown_chip_gets_a_limit_that_fits_v4(self):
    self.assertIsNone(pallas_mosaic_tpu._vmem_capacity())  # a CPU host
    self.assertEqual(config_lib.MosaicTpuConfig().vmem_limit(None),
                     12 * 2**20)

  def test_explicit_limit_over_the_chip_raises(self):
    cfg = config_lib.MosaicTpuConfig(vmem_limit_bytes=48 * 2**20)
    self.assertEqual(cfg.vmem_limit(64 * 2**20), 48 * 2**20)
    with self.assertRaisesRegex(ValueError, "vmem_limit_bytes"):
      cfg.vmem_limit(16 * 2**20)

  @parameterized.parameters(("TPU v4", 12), ("TPU v6 lite", 96))
  def test_export_for_an_abstract_chip_uses_its_limit(self, kind, mib):
    t, d, block = 256, 64, 128
    layout = BlockLayout.causal(t, block_q=block, block_kv=block)
    spec = _padded_problem(1, t, t, 2, 2, d, causal=True)[-1]
    x = jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
    fwd = functools.partial(pallas_mosaic_tpu.forward, bias_k=None,
                            q_seg=None, kv_seg=None, layout=layout, spec=spec)
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1,
                                         platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
      text = jax.export.export(jax.jit(fwd), platforms=["tpu"])(
          x, x, x).mlir_module()
    # The backend config is JSON with quotes escaped as \22.
    sizes = re.findall(r"scoped_memory_configs.*?size\\22: (\d+)", text)
    self.assertEqual(sizes, [str(mib * 2**20)])


class LoweringTest(parameterized.TestCase):
  """Mosaic lowering for TPU (jax.export from this CPU host)."""

  @parameterized.parameters(
      (jnp.float32, 64, 128),
      (jnp.bfloat16, 128, 256),
  )
  def test_exports_for_tpu(self, dtype, head_dim, compute):
    b, t, hq, hkv, block = 1, 2048, 4, 2, 512
    tiled = _tiled_causal_layout(t, block)
    spec = tile_math.MaskSpec(
        q_len=t, kv_len=t, kv_len_padded=t, band=(None, 0), has_segments=True,
        has_tiles=True, sm_scale=head_dim ** -0.5, softcap=None, causal=True)
    offset = jnp.int32(0)
    cfg = config_lib.MosaicTpuConfig(block_kv_compute=compute)
    x = jax.ShapeDtypeStruct((b, t, hq, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((b, t, hkv, head_dim), dtype)
    bias = jax.ShapeDtypeStruct((1, hq, t), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    fwd = functools.partial(pallas_mosaic_tpu.forward, layout=tiled,
                            spec=spec, causal_offset=offset, config=cfg)

    def forward(q, k, v, bias, seg):
      return fwd(q, k, v, bias, seg, seg)

    def forward_backward(q, k, v, bias, seg):
      out, lse = forward(q, k, v, bias, seg)
      return pallas_mosaic_tpu.backward(q, k, v, bias, seg, seg, tiled, spec,
                                        out, lse, out, lse,
                                        causal_offset=offset, config=cfg)

    # interpret=None: lowering for TPU picks the Mosaic kernels.
    for fn, kernels in ((forward, 1), (forward_backward, 3)):
      exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(
          x, kv, kv, bias, seg)
      self.assertEqual(exported.mlir_module().count("tpu_custom_call"),
                       kernels)

  def test_exports_small_blocks_for_tpu(self):
    # 16-row blocks (as LLSA's): the row statistics' blocks are whole rows
    # and columns of their arrays, which the TPU block-shape rule allows.
    t, block = 64, 16
    layout = BlockLayout.causal(t, block_q=block, block_kv=block)
    spec = _padded_problem(1, t, t, 2, 1, 64, causal=True)[-1]
    x = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.bfloat16)

    def forward_backward(q, k, v):
      args = (q, k, v, None, None, None, layout, spec)
      out, lse = pallas_mosaic_tpu.forward(*args)
      return pallas_mosaic_tpu.backward(*args, out, lse, out, lse)

    exported = jax.export.export(jax.jit(forward_backward),
                                 platforms=["tpu"])(x, kv, kv)
    self.assertEqual(exported.mlir_module().count("tpu_custom_call"), 3)


if __name__ == "__main__":
  absltest.main()
