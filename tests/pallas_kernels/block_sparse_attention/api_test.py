"""Argument checking and backend choice of block_sparse_attention."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import api

B, T, S, HQ, HKV, D = 2, 64, 96, 4, 2, 16


def inputs():
  q = jnp.zeros((B, T, HQ, D))
  k = jnp.zeros((B, S, HKV, D))
  return q, k, k


def layout(block_q=32, block_kv=32, heads=1, batch=1):
  qb, kb = -(-T // block_q), -(-S // block_kv)
  return BlockLayout.from_block_mask(np.ones((batch, heads, qb, kb), bool),
                                     block_q, block_kv)


class ArgumentErrorTest(parameterized.TestCase):

  def assert_error(self, pattern, *args, **kwargs):
    with self.assertRaisesRegex(ValueError, pattern):
      block_sparse_attention(*args, **kwargs)

  def test_ranks(self):
    q, k, v = inputs()
    self.assert_error(r"q must be \[B, T\|S, H, D\]", q[0], k, v, layout())
    self.assert_error(r"k must be \[B=2, S, Hkv, D=16\]", q, k[..., :8], v,
                      layout())
    self.assert_error(r"v must match k's shape", q, k, v[:, :50], layout())

  def test_gqa_heads(self):
    q, _, _ = inputs()
    k = jnp.zeros((B, S, 3, D))
    self.assert_error(r"q heads \(Hq=4\) must be a multiple of kv heads "
                      r"\(Hkv=3\)", q, k, k, layout())

  def test_layout_sizes(self):
    q, k, v = inputs()
    self.assert_error(r"layout has Qb=4 query blocks but T=64 with "
                      r"block_q=32 needs ceil\(T / block_q\)=2", q, k, v,
                      BlockLayout.from_block_mask(
                          np.ones((1, 1, 4, 3), bool), 32, 32))
    self.assert_error(r"num_kv_blocks=2 but S=96", q, k, v,
                      BlockLayout.from_block_mask(
                          np.ones((1, 1, 2, 2), bool), 32, 32))
    self.assert_error(r"layout batch dim must be 1 or B=2, got 3", q, k, v,
                      layout(batch=3))
    self.assert_error(r"layout head dim must be 1, Hkv=2 or Hq=4, got 3", q,
                      k, v, layout(heads=3))
    self.assert_error(r"layout must be a BlockLayout", q, k, v,
                      np.ones((1, 1, 2, 3), bool))

  def test_host_layout_is_validated(self):
    q, k, v = inputs()
    lay = layout()
    idx = np.array(lay.kv_idx)
    idx[0, 0, 0, :] = [2, 1, 0]
    bad = BlockLayout(idx, lay.kv_cnt, lay.kv_kind, block_q=32, block_kv=32,
                      num_kv_blocks=3)
    self.assert_error("strictly ascending", q, k, v, bad)

  @parameterized.parameters((3, 1, S), (1, 3, S), (1, 1, S - 1))
  def test_bias_shape(self, bb, hb, s):
    q, k, v = inputs()
    self.assert_error(r"bias_k must be \[B\|1, Hq\|Hkv\|1, S\]", q, k, v,
                      layout(), bias_k=jnp.zeros((bb, hb, s)))

  def test_segment_ids(self):
    q, k, v = inputs()
    seg_q, seg_kv = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    self.assert_error("must be given together", q, k, v, layout(),
                      q_segment_ids=seg_q)
    self.assert_error(r"q_segment_ids must be \[B, T\] = \[2, 64\]", q, k, v,
                      layout(), q_segment_ids=seg_kv, kv_segment_ids=seg_kv)
    self.assert_error(r"kv_segment_ids must be \[B, S\] = \[2, 96\]", q, k,
                      v, layout(), q_segment_ids=seg_q, kv_segment_ids=seg_q)

  def test_softcap(self):
    self.assert_error("softcap must be > 0", *inputs(), layout(), softcap=0.0)

  @parameterized.parameters(
      (dict(q=jnp.int32), "q must have a float dtype"),
      (dict(k=jnp.bool_), "k must have a float dtype"),
      (dict(q=jnp.bfloat16), "k and v must have q's dtype bfloat16"),
      (dict(v=jnp.float16), "k and v must have q's dtype float32"))
  def test_dtypes(self, dtypes, pattern):
    args = [x.astype(dtypes.get(name, x.dtype))
            for name, x in zip("qkv", inputs())]
    self.assert_error(pattern, *args, layout())

  @parameterized.parameters(
      (dict(sm_scale=float("nan")), "sm_scale must be finite"),
      (dict(sm_scale=jnp.inf), "sm_scale must be finite"),
      (dict(softcap=float("inf")), "softcap must be finite"),
      (dict(sm_scale=jnp.ones(2)), "sm_scale must be a real scalar"),
      (dict(causal=True, causal_offset=0.5),
       "causal_offset must be an integer scalar"))
  def test_scalars(self, kwargs, pattern):
    self.assert_error(pattern, *inputs(), layout(), **kwargs)

  @parameterized.parameters(
      (0, T, S, HKV, D, r"q must be \[B, T, Hq, D\] with every size >= 1"),
      (B, 0, S, HKV, D, r"q must be \[B, T, Hq, D\] with every size >= 1"),
      (B, T, 0, HKV, D, r"k must be \[B, S, Hkv, D\] with every size >= 1"),
      (B, T, S, 0, D, r"k must be \[B, S, Hkv, D\] with every size >= 1"),
      (B, T, S, HKV, 0, r"q must be \[B, T, Hq, D\] with every size >= 1"))
  def test_zero_sizes(self, b, t, s, hkv, d, pattern):
    q = jnp.zeros((b, t, HQ, d))
    k = jnp.zeros((b, s, hkv, d))
    self.assert_error(pattern, q, k, k, layout())

  def test_zero_block_size(self):
    lay = layout()
    bad = BlockLayout(lay.kv_idx, lay.kv_cnt, lay.kv_kind, block_q=0,
                      block_kv=32, num_kv_blocks=3)
    self.assert_error(r"layout.block_q must be >= 1, got 0", *inputs(), bad)

  def test_float_segment_ids(self):
    q, k, v = inputs()
    self.assert_error(
        "q_segment_ids must have an integer dtype, got float32", q, k, v,
        layout(), q_segment_ids=jnp.full((B, T), 0.5),
        kv_segment_ids=jnp.zeros((B, S), jnp.int32))

  def test_static_only_arguments_raise_when_traced(self):
    q, k, v = inputs()
    for kwarg, pattern in (("softcap", "softcap must be a static"),
                           ("causal", "causal must be a static Python bool")):
      fn = jax.jit(lambda x, kwarg=kwarg: block_sparse_attention(
          q, k, v, layout(), **{kwarg: x}))
      with self.assertRaisesRegex(ValueError, pattern):
        fn.trace(jnp.float32(1.0))

  def test_list_inputs_are_arrays(self):
    q, k, v = inputs()
    q = q.at[:, :, :, 0].set(1.0)
    want = block_sparse_attention(q, k, v, layout())
    got = block_sparse_attention(q.tolist(), k.tolist(), v.tolist(),
                                 layout())
    np.testing.assert_array_equal(got, want)

  def test_errors_come_before_any_work(self):
    # Shape errors are raised at trace time: jit never compiles anything.
    q, k, v = inputs()
    fn = jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, layout(), bias_k=jnp.zeros((1, 1, 5))))
    with self.assertRaisesRegex(ValueError, "bias_k must be"):
      fn.trace(q, k, v)


class ImplementationChoiceTest(absltest.TestCase):

  def test_unknown_implementation(self):
    with self.assertRaisesRegex(ValueError, "implementation must be one of"):
      block_sparse_attention(*inputs(), layout(), implementation="cuda")

  def test_explicit_backend_that_cannot_run_fails_fast(self):
    self.assertEqual(jax.default_backend(), "cpu")
    for name in ("triton", "mosaic_tpu"):
      if api.unavailable_reason(name, "cpu", interpret=False) is None:
        self.fail(f"{name} claims to run on CPU without interpret")
      with self.assertRaisesRegex(ValueError,
                                  f"implementation='{name}' cannot run"):
        block_sparse_attention(*inputs(), layout(), implementation=name)

  def test_default_on_cpu_is_xla(self):
    self.assertEqual(api.available_implementations("cpu")[0], "xla")
    q, k, v = inputs()
    out = block_sparse_attention(q, k, v, layout())
    want = block_sparse_attention(q, k, v, layout(), implementation="xla")
    np.testing.assert_array_equal(out, want)

  def test_fallback_from_the_preferred_backend_warns(self):
    # A GPU whose Triton backend cannot run falls back to xla, loudly.
    with mock.patch.object(api, "unavailable_reason",
                           lambda name, platform=None, interpret=False:
                           None if name == "xla" else "not built"), \
        mock.patch.object(jax, "default_backend", lambda: "gpu"):
      with self.assertWarnsRegex(UserWarning, "using 'xla' because 'triton'"):
        self.assertEqual(api._choose_implementation(None, False), "xla")


if __name__ == "__main__":
  absltest.main()
