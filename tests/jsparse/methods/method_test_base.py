"""Shared checks of every SparseMethod against a dense masked reference.

Subclasses import this module (not the class) so that pytest does not
collect the base, and implement `make_method`, `inputs` and `logical_mask`.
"""

from __future__ import annotations

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from tests import tolerances


def random_qkv(seed, b, t, s, hq, hkv, d):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, hq, d)),
          jax.random.normal(kk, (b, s, hkv, d)),
          jax.random.normal(kv, (b, s, hkv, d)))


def masked_attention(q, k, v, mask, bias=None, sm_scale=None):
  """Plain softmax attention; mask/bias broadcast to [B, Hq, T, S].

  Rows with no visible key give zeros (the op's convention).
  """
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scale = 1 / np.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
  s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  if bias is not None:
    s = s + bias
  s = jnp.where(mask, s, -jnp.inf)
  row_ok = jnp.any(mask, -1, keepdims=True)
  p = jax.nn.softmax(jnp.where(row_ok, s, 0.0), -1)
  p = jnp.where(mask & row_ok, p, 0.0)
  return jnp.einsum("bhts,bshd->bthd", p, v)


def assert_values_and_grads_close(run, ref, q, k, v):
  """run(q, k, v) == ref(q, k, v), and their VJPs for a random cotangent."""
  atol = tolerances.atol(jnp.float32) * 5
  np.testing.assert_allclose(run(q, k, v), ref(q, k, v), atol=atol)
  cot = jax.random.normal(jax.random.key(3), q.shape)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.vdot(f(*a), cot),
                            (0, 1, 2)))(q, k, v) for f in (run, ref)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=4 * atol)


class MethodTestBase(parameterized.TestCase):
  """Plan well-formed, op == dense reference, 100% density == dense."""

  TRAINS = False  # also compare gradients w.r.t. q, k, v (method's mask)

  def make_method(self):
    raise NotImplementedError

  def dense_method(self):
    """A configuration of the method at 100% density (or None)."""
    return None

  def inputs(self, method):
    """(q, k, v, plan kwargs) for `method`."""
    raise NotImplementedError

  def logical_mask(self, method, q, k, kwargs):
    """bool [B|1, Hq|1, T, S] the method means to attend."""
    raise NotImplementedError

  def logical_bias(self, method, q, k, kwargs):
    """Optional additive logit bias broadcastable to [B, Hq, T, S]."""
    del method, q, k, kwargs
    return None

  def dense_mask(self, method, q, k, kwargs):
    """The mask `dense_method` must reproduce (default: everything)."""
    del method, kwargs
    return jnp.ones((1, 1, q.shape[1], k.shape[1]), bool)

  def _check(self, method, mask_fn, grads):
    q, k, v, kwargs = self.inputs(method)
    mask = mask_fn(method, q, k, kwargs)
    bias = self.logical_bias(method, q, k, kwargs)
    run = jax.jit(lambda q, k, v: method(q, k, v, implementation="xla",
                                         **kwargs))
    out = run(q, k, v)
    ref = masked_attention(q, k, v, mask, bias)
    atol = tolerances.atol(jnp.float32) * 5
    np.testing.assert_allclose(out, ref, atol=atol, rtol=atol)
    if grads:
      cot = jax.random.normal(jax.random.key(7), out.shape)
      g_op = jax.grad(lambda *a: jnp.vdot(run(*a), cot), (0, 1, 2))(q, k, v)
      g_ref = jax.grad(lambda *a: jnp.vdot(
          masked_attention(*a, mask, bias), cot), (0, 1, 2))(q, k, v)
      for a, b in zip(g_op, g_ref):
        np.testing.assert_allclose(a, b, atol=4 * atol, rtol=4 * atol)

  def test_plan_well_formed(self):
    method = self.make_method()
    q, k, v, kwargs = self.inputs(method)
    plan = method.plan(q, k, v, **kwargs)
    layout = plan.layout
    layout.validate()
    idx, cnt = np.asarray(layout.kv_idx), np.asarray(layout.kv_cnt)
    kmax = idx.shape[-1]
    self.assertTrue(np.all((cnt >= 0) & (cnt <= kmax)))
    valid = np.arange(kmax) < cnt[..., None]
    self.assertTrue(np.all(~valid | ((idx >= 0)
                                     & (idx < layout.num_kv_blocks))))
    self.assertTrue(np.all(~valid[..., 1:] | (np.diff(idx, axis=-1) > 0)))

  def test_matches_dense_reference(self):
    self._check(self.make_method(), self.logical_mask, self.TRAINS)

  def test_full_density_is_dense(self):
    method = self.dense_method()
    if method is None:
      self.skipTest("no 100% density configuration")
    self._check(method, self.dense_mask, False)
