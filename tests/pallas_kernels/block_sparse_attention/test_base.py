"""Backend-independent tests of block_sparse_attention against the reference.

Each backend subclasses `BlockSparseAttentionTestBase` and sets
IMPLEMENTATION (and INTERPRET for Pallas backends on CPU).
"""

from __future__ import annotations

import dataclasses
import functools

from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import api
from tests import tolerances


def random_qkv(seed, b, t, s, hq, hkv, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, hq, d), jnp.float32)
  k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32)
  v = jax.random.normal(kv, (b, s, hkv, d), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_layout(seed, bl, hl, t, s, block_q, block_kv, density=0.5,
                  full_fraction=0.5, empty_rows=False):
  """Host layout with random partial/full blocks (optionally empty rows)."""
  rng = np.random.default_rng(seed)
  qb, kb = -(-t // block_q), -(-s // block_kv)
  present = rng.random((bl, hl, qb, kb)) < density
  if empty_rows:
    present[..., 0, :] = False
  full = rng.random(present.shape) < full_fraction
  return BlockLayout.from_block_mask(present, block_q, block_kv,
                                     full_block_mask=full)


def layout_heads(mode, hq, hkv):
  return {"shared": 1, "kv": hkv, "q": hq}[mode]


class BlockSparseAttentionTestBase(chex.TestCase):
  """Values and gradients of one backend against the dense reference.

  `test_matches_reference` runs with and without jit (chex variants); the
  other cases jit the backend (Pallas backends in interpret mode on CPU).
  """

  IMPLEMENTATION: str = ""
  INTERPRET: bool = False

  def attention(self, *args, **kwargs):
    return block_sparse_attention(*args, implementation=self.IMPLEMENTATION,
                                  interpret=self.INTERPRET, **kwargs)

  def reference(self, *args, **kwargs):
    return block_sparse_attention(*args, implementation="reference",
                                  **kwargs)

  def assert_matches_reference(self, q, k, v, layout, *, check_grads=True,
                               bias_k=None, transform=jax.jit, **kwargs):
    """Forward values, lse and VJP (random cotangent) vs the reference.

    `transform` wraps the backend's forward and VJP (the jitted reference
    is the oracle).
    """
    dtype = q.dtype
    tol = dict(atol=tolerances.atol(dtype), rtol=tolerances.rtol(dtype))
    args = (q, k, v) if bias_k is None else (q, k, v, bias_k)

    def run(fn, *xs):
      kw = dict(kwargs)
      if bias_k is not None:
        kw["bias_k"] = xs[3]
      return fn(xs[0], xs[1], xs[2], layout, return_lse=True, **kw)

    cot = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
    cot = cot.astype(dtype)
    # The lse cotangent matters too: branches merged by LSE train through it.
    lse_cot = jax.random.normal(jax.random.key(8),
                                (q.shape[0], q.shape[2], q.shape[1]))

    def values_and_grads(fn, *xs):
      (out, lse), vjp = jax.vjp(functools.partial(run, fn), *xs)
      grads = vjp((cot, lse_cot)) if check_grads else None
      return out, lse, grads

    out, lse, grads = transform(
        functools.partial(values_and_grads, self.attention))(*args)
    ref_out, ref_lse, ref_grads = jax.jit(
        functools.partial(values_and_grads, self.reference))(*args)
    chex.assert_shape(out, q.shape)
    chex.assert_shape(lse, (q.shape[0], q.shape[2], q.shape[1]))
    chex.assert_trees_all_equal_dtypes(out, q)
    chex.assert_tree_all_finite(out)
    if dtype == jnp.float32:
      chex.assert_trees_all_close(out, ref_out, **tol)
    else:
      self.assert_bf16_error_bounded(run, args, out)
    chex.assert_trees_all_equal(jnp.isinf(lse), jnp.isinf(ref_lse))
    finite = jnp.isfinite(ref_lse)
    chex.assert_trees_all_close(jnp.where(finite, lse, 0.0),
                                jnp.where(finite, ref_lse, 0.0),
                                atol=tolerances.atol(dtype) * 5)
    if not check_grads:
      return
    chex.assert_tree_all_finite(grads)
    for name, g, rg in zip("qkvb", grads, ref_grads):
      chex.assert_trees_all_equal_shapes_and_dtypes(g, rg)
      g, rg = g.astype(jnp.float32), rg.astype(jnp.float32)
      scale = max(1.0, float(jnp.abs(rg).max()))
      chex.assert_trees_all_close(
          g, rg, atol=tolerances.grad_atol(dtype) * scale,
          rtol=tolerances.rtol(dtype), custom_message=f"d{name}")

  def assert_bf16_error_bounded(self, run, args, out):
    """Marin's rule: kernel bf16 error <= 1.5x the reference's own."""
    f32_args = [a.astype(jnp.float32) for a in args]
    ref = jax.jit(functools.partial(run, self.reference))
    oracle, _ = ref(*f32_args)
    ref_bf16, _ = ref(*args)
    err = tolerances.rms(out.astype(jnp.float32) - oracle)
    ref_err = tolerances.rms(ref_bf16.astype(jnp.float32) - oracle)
    self.assertLessEqual(err, tolerances.BF16_ERROR_RATIO * ref_err + 1e-6)

  # -- values and gradients -----------------------------------------------

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference(self):
    # GQA, ragged sizes, causal, bias, an empty block row: values, lse, VJP.
    b, t, s, hq, hkv, d = 2, 80, 72, 4, 2, 16
    q, k, v = random_qkv(32, b, t, s, hq, hkv, d)
    bias = jax.random.normal(jax.random.key(33), (b, 1, s))
    layout = random_layout(34, 1, hkv, t, s, 32, 32, empty_rows=True)
    self.assert_matches_reference(q, k, v, layout, bias_k=bias, causal=True,
                                  transform=self.variant)

  @parameterized.product(
      shape=[(1, 256, 256, 2, 2, 32), (2, 200, 328, 4, 2, 16),
             (1, 130, 70, 6, 2, 8)],
      heads=["shared", "kv", "q"],
      dtype=[jnp.float32, jnp.bfloat16],
  )
  def test_random_layout(self, shape, heads, dtype):
    b, t, s, hq, hkv, d = shape
    q, k, v = random_qkv(0, b, t, s, hq, hkv, d, dtype)
    layout = random_layout(1, b, layout_heads(heads, hq, hkv), t, s, 64, 64)
    self.assert_matches_reference(q, k, v, layout)

  @parameterized.product(causal=[False, True], block=[(64, 64), (32, 64),
                                                      (64, 32)])
  def test_block_sizes_and_causal(self, causal, block):
    q, k, v = random_qkv(1, 1, 192, 192, 2, 1, 16)
    layout = random_layout(2, 1, 1, 192, 192, *block, density=0.7)
    self.assert_matches_reference(q, k, v, layout, causal=causal)

  @parameterized.parameters(0, -40, 25)
  def test_causal_offset(self, offset):
    q, k, v = random_qkv(2, 1, 96, 160, 2, 2, 16)
    layout = BlockLayout.causal(96, 160, block_q=32, block_kv=32,
                                offset=offset)
    self.assert_matches_reference(q, k, v, layout)

  @parameterized.product(
      bias_shape=[(1, 1), (2, 1), (1, 2), (2, 4)],
      dtype=[jnp.float32, jnp.bfloat16],
  )
  def test_bias_k(self, bias_shape, dtype):
    b, t, s, hq, hkv, d = 2, 128, 96, 4, 2, 16
    q, k, v = random_qkv(3, b, t, s, hq, hkv, d, dtype)
    bias = jax.random.normal(jax.random.key(4), (*bias_shape, s)).astype(dtype)
    layout = random_layout(5, 1, hkv, t, s, 32, 32, density=0.6)
    self.assert_matches_reference(q, k, v, layout, bias_k=bias)

  def test_segment_ids(self):
    b, t, s = 2, 160, 160
    q, k, v = random_qkv(6, b, t, s, 2, 2, 16)
    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 4, (b, t)), axis=-1).astype(np.int32)
    layout = random_layout(7, 1, 1, t, s, 32, 32, density=0.8,
                           full_fraction=0.0)
    self.assert_matches_reference(q, k, v, layout, q_segment_ids=seg,
                                  kv_segment_ids=seg, causal=True)

  def test_softcap(self):
    q, k, v = random_qkv(8, 1, 128, 128, 2, 2, 16)
    layout = random_layout(9, 1, 1, 128, 128, 32, 32)
    self.assert_matches_reference(3.0 * q, k, v, layout, softcap=5.0,
                                  sm_scale=0.5)

  def test_element_mask_tiles(self):
    t, s = 100, 120
    rng = np.random.default_rng(3)
    mask = rng.random((1, 2, t, s)) < 0.3
    mask[:, :, :, :40] = True  # some full blocks
    mask[:, :, 64:, 64:] = False  # some empty blocks
    layout = BlockLayout.from_element_mask(mask, 32, 32)
    q, k, v = random_qkv(10, 1, t, s, 2, 2, 16)
    self.assert_matches_reference(q, k, v, layout)

  def test_traced_layout(self):
    t = s = 128
    q, k, v = random_qkv(11, 2, t, s, 2, 2, 16)

    @jax.jit
    def run(q, k, v, scores):
      layout = BlockLayout.from_block_mask(scores > 0, 32, 32,
                                           max_kv_blocks=3)
      return self.attention(q, k, v, layout, causal=True)

    scores = jax.random.normal(jax.random.key(1), (2, 2, 4, 4))
    out = run(q, k, v, scores)
    host = BlockLayout.from_block_mask(np.asarray(scores) > 0, 32, 32,
                                       max_kv_blocks=3)
    want = self.reference(q, k, v, host, causal=True)
    chex.assert_trees_all_close(out, want, atol=tolerances.atol(q.dtype))

  # -- edge cases ------------------------------------------------------------

  def test_empty_rows_are_zero(self):
    q, k, v = random_qkv(12, 1, 96, 96, 2, 2, 16)
    layout = random_layout(13, 1, 2, 96, 96, 32, 32, empty_rows=True)
    self.assert_matches_reference(q, k, v, layout)
    out, lse = self.attention(q, k, v, layout, return_lse=True)
    chex.assert_trees_all_equal(out[:, :32], jnp.zeros_like(out[:, :32]))
    chex.assert_trees_all_equal(lse[..., :32],
                                jnp.full_like(lse[..., :32], -jnp.inf))

  def test_fully_masked_rows_inside_partial_blocks(self):
    # Rows whose listed blocks are all masked by segments: zeros, no NaN.
    q, k, v = random_qkv(14, 1, 64, 64, 1, 1, 8)
    q_seg = np.zeros((1, 64), np.int32)
    kv_seg = np.ones((1, 64), np.int32)
    layout = random_layout(15, 1, 1, 64, 64, 32, 32, density=1.0,
                           full_fraction=0.0)
    self.assert_matches_reference(q, k, v, layout, q_segment_ids=q_seg,
                                  kv_segment_ids=kv_seg)
    out = self.attention(q, k, v, layout, q_segment_ids=q_seg,
                         kv_segment_ids=kv_seg)
    chex.assert_trees_all_equal(out, jnp.zeros_like(out))

  @parameterized.parameters(False, True)
  def test_full_density_equals_dot_product_attention(self, causal):
    b, t, s, hq, hkv, d = 2, 150, 150, 4, 2, 32
    q, k, v = random_qkv(16, b, t, s, hq, hkv, d)
    layout = (BlockLayout.causal(t, s, block_q=64, block_kv=64) if causal
              else BlockLayout.dense(t, s, block_q=64, block_kv=64))
    out = self.attention(q, k, v, layout)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    chex.assert_trees_all_close(out, want, atol=tolerances.atol(q.dtype))

  # -- transformations -------------------------------------------------------

  def test_jit_equals_eager_and_is_deterministic(self):
    q, k, v = random_qkv(17, 1, 128, 128, 2, 1, 16)
    layout = random_layout(18, 1, 1, 128, 128, 32, 32)
    bias = jax.random.normal(jax.random.key(2), (1, 1, 128))

    def loss(q, k, v, bias):
      return jnp.sum(self.attention(q, k, v, layout, bias_k=bias) ** 2)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    eager = grad(q, k, v, bias)
    jitted = jax.jit(grad)
    first = jitted(q, k, v, bias)
    second = jitted(q, k, v, bias)
    chex.assert_trees_all_equal(first, second)
    chex.assert_trees_all_close(eager, first,
                                atol=tolerances.grad_atol(q.dtype),
                                rtol=tolerances.rtol(q.dtype))

  def test_vmap(self):
    q, k, v = random_qkv(19, 3, 64, 64, 2, 2, 16)
    layout = random_layout(20, 1, 1, 64, 64, 32, 32)
    # vmap over a leading stack axis: each slice is a [1, T, H, D] problem.
    stacked = [x[:, None] for x in (q, k, v)]
    out = jax.vmap(lambda q, k, v: self.attention(q, k, v, layout))(*stacked)
    want = self.reference(q, k, v, layout)
    chex.assert_trees_all_close(out[:, 0], want,
                                atol=tolerances.atol(q.dtype))

  @hypothesis.settings(max_examples=5, deadline=None, derandomize=True)
  @hypothesis.given(
      t=st.integers(1, 130), s=st.integers(1, 130),
      block_q=st.sampled_from([16, 32]), block_kv=st.sampled_from([16, 32]),
      group=st.sampled_from([1, 2]), causal=st.booleans(),
      seed=st.integers(0, 1000))
  def test_hypothesis_shapes(self, t, s, block_q, block_kv, group, causal,
                             seed):
    q, k, v = random_qkv(seed, 1, t, s, 2 * group, 2, 8)
    layout = random_layout(seed, 1, 2, t, s, block_q, block_kv, density=0.6)
    self.assert_matches_reference(q, k, v, layout, causal=causal)

  # -- op semantics: masks on every block, NaN, traced arguments -------------

  def test_dense_layout_causal_equals_dot_product_attention(self):
    # The op's causal mask applies to FULL blocks too (ragged T, GQA).
    t, hq, hkv = 72, 4, 2
    q, k, v = random_qkv(21, 1, t, t, hq, hkv, 16)
    layout = BlockLayout.dense(t, t, block_q=32, block_kv=32)
    out = self.attention(q, k, v, layout, causal=True)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    chex.assert_trees_all_close(out, want, atol=tolerances.atol(q.dtype))

  def test_dense_layout_packed_segments(self):
    # Segment ids apply to FULL blocks too: packed documents, dense layout.
    t = 80
    q, k, v = random_qkv(22, 1, t, t, 2, 2, 16)
    seg = np.repeat(np.arange(4), [30, 5, 25, 20])[None].astype(np.int32)
    layout = BlockLayout.dense(t, t, block_q=32, block_kv=32)
    out = self.attention(q, k, v, layout, q_segment_ids=seg,
                         kv_segment_ids=seg)
    mask = jnp.asarray(seg[:, None, :, None] == seg[:, None, None, :])
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    chex.assert_trees_all_close(out, want, atol=tolerances.atol(q.dtype))
    self.assert_matches_reference(q, k, v, layout, q_segment_ids=seg,
                                  kv_segment_ids=seg)

  def test_full_blocks_straddling_the_diagonal(self):
    # Every listed block is FULL; the diagonal cuts some, hides others.
    q, k, v = random_qkv(23, 1, 96, 96, 2, 1, 16)
    layout = random_layout(24, 1, 1, 96, 96, 32, 32, density=0.8,
                           full_fraction=1.0)
    self.assert_matches_reference(q, k, v, layout, causal=True,
                                  causal_offset=-8)

  @parameterized.parameters(("q", np.nan), ("k", np.nan), ("v", np.nan),
                            ("bias_k", np.nan), ("q", np.inf))
  def test_nan_propagates_and_differs_from_empty_rows(self, where, value):
    # Dense layout, causal offset -8: rows 0..7 see no key (0, -inf). A bad
    # query (row 40) or key (position 20, seen by rows >= 28) gives NaN in
    # exactly the rows that see it. A NaN value also reaches rows whose tiles
    # hold it with probability 0 (0 * NaN), as in dense attention.
    t, offset = 64, -8
    q, k, v = random_qkv(25, 1, t, t, 2, 2, 16)
    inputs = dict(q=q, k=k, v=v, bias_k=jnp.zeros((1, 1, t)))
    if where == "q":
      inputs["q"] = q.at[0, 40, 0, 3].set(value)
    elif where == "bias_k":
      inputs["bias_k"] = inputs["bias_k"].at[0, 0, 20].set(value)
    else:
      inputs[where] = inputs[where].at[0, 20, 0, 3].set(value)
    layout = BlockLayout.dense(t, t, block_q=32, block_kv=32)
    out, lse = self.attention(
        inputs["q"], inputs["k"], inputs["v"], layout,
        bias_k=inputs["bias_k"], causal=True, causal_offset=offset,
        return_lse=True)
    out, lse = np.asarray(out), np.asarray(lse)
    rows = np.arange(t)
    if where == "q":
      bad = (rows == 40)[:, None] & (np.arange(2) == 0)
    else:  # key 20 is seen by rows >= 28 of the heads reading kv head 0
      bad = (rows >= 20 - offset)[:, None] & (
          (np.arange(2) == 0) | (where == "bias_k"))
    nan_rows = np.isnan(out).any(-1)[0]
    if where == "v":
      self.assertTrue(nan_rows[bad].all())
      self.assertFalse(np.isnan(lse).any())
      return
    chex.assert_trees_all_equal(nan_rows, bad)
    chex.assert_trees_all_equal(np.isnan(lse)[0].T, bad)
    empty = rows < -offset
    chex.assert_trees_all_equal(out[0, empty], np.zeros_like(out[0, empty]))
    self.assertTrue(np.isneginf(lse[0][:, empty]).all())

  def _traced_layout_attention(self, idx, cnt, kind, num_kv_blocks, *args,
                               **kwargs):
    """Runs the op under jit with the layout lists as traced arguments."""

    @jax.jit
    def run(idx, cnt, kind, *args):
      layout = BlockLayout(idx, cnt, kind, block_q=32, block_kv=32,
                           num_kv_blocks=num_kv_blocks)
      return self.attention(*args, layout, **kwargs)

    return run(idx, cnt, kind, *args)

  def test_traced_counts_are_clamped(self):
    q, k, v = random_qkv(26, 1, 96, 96, 2, 2, 16)
    host = random_layout(27, 1, 1, 96, 96, 32, 32, density=0.7)
    kmax = host.max_kv_blocks
    cnt = np.array(host.kv_cnt)
    cnt[0, 0, 0], cnt[0, 0, 1] = kmax + 3, -2
    out = self._traced_layout_attention(host.kv_idx, cnt, host.kv_kind, 3,
                                        q, k, v, causal=True)
    clamped = dataclasses.replace(host, kv_cnt=np.clip(cnt, 0, kmax))
    want = self.reference(q, k, v, clamped, causal=True)
    chex.assert_trees_all_close(out, want, atol=tolerances.atol(q.dtype))
    chex.assert_trees_all_equal(out[:, 32:64], jnp.zeros_like(out[:, 32:64]))

  def test_traced_repeated_ids_count_once(self):
    q, k, v = random_qkv(28, 1, 64, 64, 2, 1, 16)
    idx = np.array([[[[0, 0, 1], [1, 1, 1]]]], np.int32)
    cnt = np.array([[[3, 2]]], np.int32)
    kind = np.array([[[[2, 1, 1], [1, 2, 0]]]], np.int8)
    want_layout = BlockLayout(np.array([[[[0, 1], [1, 1]]]], np.int32),
                              np.array([[[2, 1]]], np.int32),
                              np.array([[[[2, 1], [1, 0]]]], np.int8),
                              block_q=32, block_kv=32, num_kv_blocks=2)
    cot = jax.random.normal(jax.random.key(9), q.shape)

    def values_and_grads(run):
      out, vjp = jax.vjp(run, q, k, v)
      return out, vjp(cot)

    got = values_and_grads(lambda *x: self._traced_layout_attention(
        idx, cnt, kind, 2, *x, causal=True))
    want = values_and_grads(lambda *x: self.reference(
        *x, want_layout, causal=True))
    chex.assert_trees_all_close(got, want,
                                atol=tolerances.grad_atol(q.dtype))

  def test_traced_causal_offset_and_sm_scale(self):
    q, k, v = random_qkv(29, 1, 64, 96, 2, 1, 16)
    layout = random_layout(30, 1, 1, 64, 96, 32, 32, density=0.8)

    @jax.jit
    def traced(q, k, v, offset, scale):
      return self.attention(q, k, v, layout, causal=True,
                            causal_offset=offset, sm_scale=scale)

    out = traced(q, k, v, jnp.int32(-20), jnp.float32(0.3))
    want = self.reference(q, k, v, layout, causal=True, causal_offset=-20,
                          sm_scale=0.3)
    chex.assert_trees_all_close(out, want, atol=tolerances.atol(q.dtype))

  def test_second_order(self):
    q, k, v = random_qkv(31, 1, 32, 32, 1, 1, 16)
    layout = BlockLayout.dense(32, 32, block_q=16, block_kv=16)

    def grad_norm(attention, q):
      loss = lambda q: jnp.sum(attention(q, k, v, layout, causal=True) ** 2)
      return jnp.sum(jax.grad(loss)(q) ** 2)

    second = jax.grad(functools.partial(grad_norm, self.attention))
    if not api.backend(self.IMPLEMENTATION).SECOND_ORDER:
      with self.assertRaisesRegex(NotImplementedError,
                                  "supported on implementation='xla'"):
        second(q)
      return
    want = jax.grad(functools.partial(grad_norm, self.reference))(q)
    chex.assert_trees_all_close(second(q), want,
                                atol=tolerances.grad_atol(q.dtype))
