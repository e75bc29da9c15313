"""DMA against a dense softmax reference with the same mask and bias."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from jsparse.masks import selection
from jsparse.methods import dma
from tests import jaxpr_size
from tests import tolerances

B, T, HQ, HKV, D, W, BLOCK = 2, 96, 4, 2, 16, 24, 16


def _inputs(seed=0, t=T):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, t, HQ, D)),
          jax.random.normal(kk, (B, t, HKV, D)),
          jax.random.normal(kv, (B, t, HKV, D)))


def _method(variant, granularity=dma.ELEMENT, exp_bias=False, window=W,
            local_keys=0):
  cfg = dma.DMAConfig(num_kv_heads=HKV, head_dim=D, window=window,
                      variant=variant, granularity=granularity,
                      exp_bias=exp_bias, dt_bias=True, block_size=BLOCK,
                      local_keys=local_keys)
  method = dma.DMAMethod(cfg, rngs=nnx.Rngs(0))
  # A != 0 so that the scores are distinct (A = 0 is tested separately).
  method.a[...] = jnp.array([0.7, -1.3])
  return method


def _naive_mask(beta, variant, window):
  """bool [B, Hkv, T, T] by explicit per-row top-k (NumPy, stable sort)."""
  beta = np.asarray(beta)
  t = beta.shape[-1]
  mask = np.zeros(beta.shape[:2] + (t, t), bool)
  causal = np.tril(np.ones((t, t), bool))
  for b in range(beta.shape[0]):
    for h in range(beta.shape[1]):
      if variant == dma.QUERY_AGNOSTIC:
        keep = np.argsort(-beta[b, h], kind="stable")[:window]
        mask[b, h][:, keep] = True
        mask[b, h] &= causal
        continue
      for i in range(t):
        keep = np.argsort(-beta[b, h, :i + 1], kind="stable")[:window]
        mask[b, h, i, keep] = True
  return mask


def _naive_local_mask(beta, window, r):
  """bool [B, Hkv, T, T]: keys i - r + 1..i plus the top-(w - r) of 0..i - r."""
  beta = np.asarray(beta)
  t = beta.shape[-1]
  mask = np.zeros(beta.shape[:2] + (t, t), bool)
  for i in range(t):
    mask[..., i, max(0, i - r + 1):i + 1] = True
    if i - r < 0:
      continue
    for b in range(beta.shape[0]):
      for h in range(beta.shape[1]):
        keep = np.argsort(-beta[b, h, :i - r + 1], kind="stable")
        mask[b, h, i, keep[:window - r]] = True
  return mask


def _selected(method, beta):
  """bool [B, Hkv, T, T]: the keys the plan's RowLayout lets each row see."""
  t = beta.shape[-1]
  layout = jax.jit(method.selection_layout)(beta)
  mask = np.asarray(layout.to_dense_mask(t, t))
  if method.config.causal:  # query_agnostic leaves causality to the op
    mask = mask & np.tril(np.ones((t, t), bool))
  return mask


def _reference(q, k, v, mask, beta):
  """Dense masked softmax(q.k / sqrt(D) + beta) v; empty rows give 0."""
  group = HQ // HKV
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  mask = jnp.repeat(mask, group, axis=1)
  beta = jnp.repeat(beta, group, axis=1)[:, :, None, :]
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D) + beta
  s = jnp.where(mask, s, -jnp.inf)
  row_ok = jnp.any(mask, -1, keepdims=True)
  p = jax.nn.softmax(jnp.where(row_ok, s, 0.0), -1)
  p = jnp.where(mask & row_ok, p, 0.0)
  return jnp.einsum("bhts,bshd->bthd", p, v)


def _op(method, q, k, v):
  return method(q, k, v, implementation="xla")


def _jit(fn, method):
  """fn(method, q, k, v) as a jitted function of (params, q, k, v)."""
  graphdef, params = nnx.split(method, nnx.Param)
  run = jax.jit(lambda p, *a: fn(nnx.merge(graphdef, p), *a))
  return functools.partial(run, params)


def _grads(fn, method, q, k, v, *, jit=True):
  """d<fn(method, q, k, v), cot> w.r.t. A, W_dt (b_dt), q, k, v."""
  graphdef, params = nnx.split(method, nnx.Param)
  cot = jax.random.normal(jax.random.key(9), q.shape)

  def loss(params, q, k, v):
    return jnp.vdot(fn(nnx.merge(graphdef, params), q, k, v), cot)

  grad = jax.grad(loss, (0, 1, 2, 3))
  gp, gq, gk, gv = (jax.jit(grad) if jit else grad)(params, q, k, v)
  flat = {"/".join(map(str, path)): x[...]
          for path, x in nnx.to_flat_state(gp)}
  return {**flat, "q": gq, "k": gk, "v": gv}


class DMATest(chex.TestCase):

  def test_registered(self):
    self.assertIs(jsparse.METHODS["dma"], dma.DMAMethod)

  @chex.variants(with_jit=True, without_jit=True)
  def test_call_matches_reference_with_and_without_jit(self):
    q, k, v = _inputs(t=90)
    method = _method(dma.PER_ROW)
    beta = method.key_bias(v)
    want = _reference(q, k, v, jnp.asarray(_naive_mask(beta, dma.PER_ROW, W)),
                      beta)
    got = self.variant(lambda q, k, v: _op(method, q, k, v))(q, k, v)
    chex.assert_shape(got, q.shape)
    chex.assert_trees_all_close(got, want, atol=5 * tolerances.atol(q.dtype),
                                rtol=5 * tolerances.atol(q.dtype))

  # T = 90: a ragged last query group (block 16).
  @parameterized.parameters((dma.PER_ROW, False, T),
                            (dma.QUERY_AGNOSTIC, False, T),
                            (dma.PER_ROW, True, T), (dma.PER_ROW, False, 90))
  def test_matches_dense_reference(self, variant, exp_bias, t):
    q, k, v = _inputs(t=t)
    method = _method(variant, exp_bias=exp_bias)

    def ref(m, q, k, v):
      beta = m.key_bias(v)
      mask = _naive_mask(jax.lax.stop_gradient(beta), variant, W)
      return _reference(q, k, v, jnp.asarray(mask), beta)

    atol = 5 * tolerances.atol(jnp.float32)
    np.testing.assert_allclose(_jit(_op, method)(q, k, v),
                               ref(method, q, k, v), atol=atol, rtol=atol)
    got = _grads(_op, method, q, k, v)
    want = _grads(ref, method, q, k, v, jit=False)
    self.assertEqual(set(got), {"a", "dt_proj/kernel", "dt_proj/bias", "q",
                                "k", "v"})
    for name in got:
      np.testing.assert_allclose(got[name], want[name], atol=4 * atol,
                                 rtol=4 * atol, err_msg=name)

  def test_bf16_error_within_reference_bf16_error(self):
    method = _method(dma.PER_ROW)
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(5))
    beta = method.key_bias(v)
    mask = jnp.asarray(_naive_mask(beta, dma.PER_ROW, W))
    oracle = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask,
                        beta)
    ref_bf16 = _reference(q, k, v, mask, beta.astype(jnp.bfloat16))
    out = _jit(_op, method)(q, k, v)
    self.assertEqual(out.dtype, jnp.bfloat16)
    err = tolerances.rms(out.astype(jnp.float32) - oracle)
    ref_err = tolerances.rms(ref_bf16.astype(jnp.float32) - oracle)
    self.assertLessEqual(err, tolerances.BF16_ERROR_RATIO * ref_err + 1e-6)

  @parameterized.parameters(dma.PER_ROW, dma.QUERY_AGNOSTIC)
  def test_block_granularity_matches_its_layout(self, variant):
    q, k, v = _inputs(1)
    method = _method(variant, dma.BLOCK, window=48)
    plan = method.plan(q, k, v)
    mask = plan.layout.to_dense_mask(T, T) & jnp.tril(
        jnp.ones((1, 1, T, T), bool))
    # Whole tiles: the layout lists only selected key blocks.
    self.assertLess(float(plan.layout.density()), 0.7)
    out = _jit(_op, method)(q, k, v)
    ref = _reference(q, k, v, mask, method.key_bias(v))
    atol = 5 * tolerances.atol(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=atol)

  @parameterized.parameters(dma.PER_ROW, dma.QUERY_AGNOSTIC)
  def test_selection_is_causal_and_sized(self, variant):
    beta = jax.random.normal(jax.random.key(3), (B, HKV, T))
    mask = _selected(_method(variant), beta)
    self.assertFalse(np.any(np.triu(mask, 1)))
    np.testing.assert_array_equal(mask, _naive_mask(beta, variant, W))
    counts = mask.sum(-1)
    if variant == dma.PER_ROW:
      np.testing.assert_array_equal(
          counts, np.broadcast_to(np.minimum(np.arange(T) + 1, W),
                                  counts.shape))
    else:
      self.assertTrue(np.all(counts <= W))

  # 1: one recent key; 20: more than the group's 16 (8 is tested below).
  @parameterized.parameters(1, 20)
  def test_local_keys_selection_matches_dense_mask(self, r):
    beta = jax.random.normal(jax.random.key(6), (B, HKV, 90))
    mask = _selected(_method(dma.PER_ROW, local_keys=r), beta)
    np.testing.assert_array_equal(mask, _naive_local_mask(beta, W, r))

  def test_local_keys_at_window_is_the_sliding_window(self):
    beta = jax.random.normal(jax.random.key(7), (B, HKV, T))
    mask = _selected(_method(dma.PER_ROW, local_keys=W), beta)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    want = (j <= i) & (i - j < W)
    np.testing.assert_array_equal(mask, np.broadcast_to(want, mask.shape))

  def test_local_keys_matches_dense_reference(self):
    # The layout carries no gradient: the bias's gradients are the paper
    # path's, tested above.
    q, k, v = _inputs(3)
    method = _method(dma.PER_ROW, local_keys=8)

    def ref(m, q, k, v):
      beta = m.key_bias(v)
      mask = _naive_local_mask(jax.lax.stop_gradient(beta), W, 8)
      return _reference(q, k, v, jnp.asarray(mask), beta)

    atol = 5 * tolerances.atol(jnp.float32)
    np.testing.assert_allclose(_jit(_op, method)(q, k, v),
                               ref(method, q, k, v), atol=atol, rtol=atol)

  @parameterized.parameters(
      dict(local_keys=-1), dict(local_keys=W + 1),
      dict(local_keys=4, variant=dma.QUERY_AGNOSTIC),
      dict(local_keys=4, granularity=dma.BLOCK))
  def test_local_keys_rejects_other_settings(self, local_keys,
                                             variant=dma.PER_ROW,
                                             granularity=dma.ELEMENT):
    with self.assertRaisesRegex(ValueError, "local_keys"):
      _method(variant, granularity, local_keys=local_keys)

  def test_ties_at_zero_init_pick_lowest_indices(self):
    method = dma.DMAMethod(dma.DMAConfig(num_kv_heads=HKV, head_dim=D,
                                         window=W), rngs=nnx.Rngs(0))
    _, _, v = _inputs()
    beta = method.key_bias(v)
    np.testing.assert_array_equal(beta, 0.0)
    mask = _selected(method, beta)
    want = np.tril(np.ones((T, T), bool)) & (np.arange(T) < W)[None]
    np.testing.assert_array_equal(mask, np.broadcast_to(want, mask.shape))
    gradient = _grads(_op, method, *_inputs())["a"]
    self.assertTrue(np.all(np.abs(gradient) > 0))

  def test_empty_rows_give_zeros_and_finite_grads(self):
    q, k, v = _inputs(2)
    method = _method(dma.QUERY_AGNOSTIC)
    # Make the early keys the least important: early rows keep nothing.
    v = v.at[:, :T // 2].multiply(-1.0)
    beta = method.key_bias(v)
    mask = _selected(method, beta)
    empty = ~mask.any(-1)
    self.assertTrue(empty.any())
    out = _jit(_op, method)(q, k, v)
    empty_q = np.repeat(empty, HQ // HKV, axis=1).transpose(0, 2, 1)
    np.testing.assert_array_equal(np.asarray(out)[empty_q], 0.0)
    for g in _grads(_op, method, q, k, v).values():
      self.assertTrue(np.all(np.isfinite(g)))

  def test_window_at_least_length_is_dense_plus_bias(self):
    q, k, v = _inputs()
    method = _method(dma.PER_ROW, window=T)
    causal = jnp.tril(jnp.ones((T, T), bool))
    out = _jit(_op, method)(q, k, v)
    ref = _reference(q, k, v, jnp.broadcast_to(causal, (B, HKV, T, T)),
                     method.key_bias(v))
    atol = 5 * tolerances.atol(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=atol)

  @parameterized.parameters(0, 8, W)
  def test_decode_matches_last_row(self, local_keys):
    q, k, v = _inputs(4)
    method = _method(dma.PER_ROW, local_keys=local_keys)
    full = _jit(_op, method)(q, k, v)
    index = T - 1

    def decode(m, q, k, v):
      plan = m.decode_plan(q, k, v, index=jnp.int32(index))
      return plan.attend(q, k, v, implementation="xla")

    step = _jit(decode, method)(q[:, index:], k, v)
    atol = 5 * tolerances.atol(jnp.float32)
    np.testing.assert_allclose(step[:, 0], full[:, index], atol=atol,
                               rtol=atol)

  def test_selection_gets_no_gradient(self):
    beta = jnp.arange(T, dtype=jnp.float32)[None, None]

    def visible(beta):
      return selection.prefix_topk_rows(beta, W, BLOCK)[2].sum().astype(
          jnp.float32)

    np.testing.assert_array_equal(jax.grad(visible)(beta), 0.0)

  @parameterized.parameters((dma.PER_ROW, dma.ELEMENT),
                            (dma.QUERY_AGNOSTIC, dma.ELEMENT),
                            (dma.PER_ROW, dma.BLOCK),
                            (dma.PER_ROW, dma.ELEMENT, 4096 // 16))
  def test_plan_has_no_t_by_s_intermediate(self, variant, granularity,
                                           local_keys=0):
    t = 4096
    cfg = dma.DMAConfig(num_kv_heads=HKV, head_dim=D, window=t // 8,
                        variant=variant, granularity=granularity,
                        local_keys=local_keys)
    method = dma.DMAMethod(cfg, rngs=nnx.Rngs(0))
    q, k, v = (jax.ShapeDtypeStruct((1, t, h, D), jnp.float32)
               for h in (HQ, HKV, HKV))
    size, shape, prim = jaxpr_size.largest_intermediate(
        lambda q, k, v: method.plan(q, k, v).layout, q, k, v)
    self.assertLess(size, t * t, f"{prim} {shape}")


if __name__ == "__main__":
  absltest.main()
