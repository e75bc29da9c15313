"""Shared checks of every SparseMethod against a dense masked reference.

Subclasses import this module (not the class) so that pytest does not
collect the base, and implement `make_method`, `inputs` and `logical_mask`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import RowLayout
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
  atol = tolerances.atol(q.dtype) * 5
  chex.assert_trees_all_close(run(q, k, v), ref(q, k, v), atol=atol)
  cot = jax.random.normal(jax.random.key(3), q.shape)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.vdot(f(*a), cot),
                            (0, 1, 2)))(q, k, v) for f in (run, ref)]
  chex.assert_trees_all_close(*grads, atol=4 * atol)


class MethodTestBase(chex.TestCase):
  """Plan well-formed, op == dense reference, 100% density == dense.

  The reference checks run with and without jit (chex variants).
  """

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

  def _skip_if_replaced(self, name):
    """Skips a variant of test `name` that a subclass replaced by its own."""
    if any(name in vars(c) for c in type(self).__mro__
           if issubclass(c, MethodTestBase) and c is not MethodTestBase):
      self.skipTest(f"{type(self).__name__} replaces {name}")

  def _check(self, method, mask_fn, grads):
    """Under `self.variant`: the op's output and VJP == the dense ones."""
    q, k, v, kwargs = self.inputs(method)
    mask = mask_fn(method, q, k, kwargs)
    bias = self.logical_bias(method, q, k, kwargs)
    run = self.variant(lambda q, k, v: method(q, k, v, implementation="xla",
                                              **kwargs))
    out = run(q, k, v)
    chex.assert_shape(out, q.shape[:3] + v.shape[3:])
    chex.assert_type(out, q.dtype)
    chex.assert_tree_all_finite(out)
    ref = masked_attention(q, k, v, mask, bias)
    atol = tolerances.atol(q.dtype) * 5
    chex.assert_trees_all_close(out, ref, atol=atol, rtol=atol)
    if grads:
      cot = jax.random.normal(jax.random.key(7), out.shape)
      g_op = jax.grad(lambda *a: jnp.vdot(run(*a), cot), (0, 1, 2))(q, k, v)
      g_ref = jax.grad(lambda *a: jnp.vdot(
          masked_attention(*a, mask, bias), cot), (0, 1, 2))(q, k, v)
      chex.assert_tree_all_finite(g_op)
      chex.assert_trees_all_close(g_op, g_ref, atol=4 * atol, rtol=4 * atol)

  def test_plan_well_formed(self):
    method = self.make_method()
    q, k, v, kwargs = self.inputs(method)
    plan = method.plan(q, k, v, **kwargs)
    # Host checks on the plan's lists (a traced plan's too): in range,
    # counts within Kmax; block lists ascending, row lists distinct.
    layout = jax.tree.map(np.asarray, plan.layout)
    layout.validate()
    idx, cnt = layout.kv_idx, layout.kv_cnt
    kmax = idx.shape[-1]
    self.assertTrue(np.all((cnt >= 0) & (cnt <= kmax)))
    if isinstance(layout, RowLayout):
      return  # validate() checked range ([0, S], S as padding) and repeats
    valid = np.arange(kmax) < cnt[..., None]
    self.assertTrue(np.all(~valid | ((idx >= 0)
                                     & (idx < layout.num_kv_blocks))))
    self.assertTrue(np.all(~valid[..., 1:] | (np.diff(idx, axis=-1) > 0)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_dense_reference(self):
    self._skip_if_replaced("test_matches_dense_reference")
    self._check(self.make_method(), self.logical_mask, self.TRAINS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_full_density_is_dense(self):
    self._skip_if_replaced("test_full_density_is_dense")
    method = self.dense_method()
    if method is None:
      self.skipTest("no 100% density configuration")
    self._check(method, self.dense_mask, False)
