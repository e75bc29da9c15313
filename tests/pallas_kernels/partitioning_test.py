"""block_sparse_attention partitions over batch and head mesh axes.

On 8 CPU devices (set in conftest.py), a (data=4, model=2) mesh: sharded
q/k/v compile to per-shard kernels with no gather of q, k, v, out or lse,
forward and gradient, on every backend, with Auto and Explicit axes.
"""

from __future__ import annotations

import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import BlockLayout
from pallas_kernels import RowLayout
from pallas_kernels import block_sparse_attention
from tests import tolerances

pytestmark = pytest.mark.multidevice

B, T, HQ, HKV, D = 4, 256, 4, 2, 32
GATHERS = re.compile(r"all-gather|all-to-all|reduce-scatter|"
                     r"collective-permute")
SPECS = {
    "batch": P("data", None, None, None),
    "heads": P(None, None, "model", None),
    "batch_heads": P("data", None, "model", None),
}
BACKENDS = ("xla", "triton", "mosaic_tpu")


def _inputs():
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, HQ, D))
  k = jax.random.normal(keys[1], (B, T, HKV, D))
  v = jax.random.normal(keys[2], (B, T, HKV, D))
  bias = jax.random.normal(keys[3], (1, HQ, T))
  return q, k, v, bias


def _layout():
  """Per-batch random blocks on the causal band (Bl = B, Hl = 1)."""
  rng = np.random.default_rng(0)
  present = rng.random((B, 1, T // 64, T // 64)) < 0.6
  present |= np.eye(T // 64, dtype=bool)
  return BlockLayout.from_block_mask(present, 64, 64)


def _loss_and_grads(impl):
  """(attention, its gradient) closed over a host layout, as users write."""
  layout = _layout()

  def attention(q, k, v, bias):
    return block_sparse_attention(q, k, v, layout, bias_k=bias, causal=True,
                                  implementation=impl, interpret=True)

  def loss(q, k, v, bias):
    return jnp.sum(attention(q, k, v, bias) ** 2)

  return attention, jax.grad(loss, argnums=(0, 1, 2, 3))


def _mesh(axis_type):
  return jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(axis_type, axis_type))


class PartitioningTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.device_count() < 8:
      self.fail("conftest.py must provide 8 CPU devices")

  @parameterized.product(impl=BACKENDS, sharded=tuple(SPECS))
  def test_auto_axes_no_gather_and_same_result(self, impl, sharded):
    mesh = _mesh(AxisType.Auto)
    sharding = NamedSharding(mesh, SPECS[sharded])
    q, k, v, bias = _inputs()
    attention, grads = _loss_and_grads(impl)
    want_out = attention(q, k, v, bias)
    want_grads = grads(q, k, v, bias)
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
    fwd = jax.jit(attention, out_shardings=sharding)
    bwd = jax.jit(grads)
    for fn in (fwd, bwd):
      hlo = fn.lower(qs, ks, vs, bias).compile().as_text()
      self.assertIsNone(GATHERS.search(hlo), f"{impl} {sharded}: collective")
    np.testing.assert_allclose(fwd(qs, ks, vs, bias), want_out,
                               atol=tolerances.atol(jnp.float32))
    for got, want in zip(bwd(qs, ks, vs, bias), want_grads):
      np.testing.assert_allclose(got, want,
                                 atol=tolerances.grad_atol(jnp.float32))

  @parameterized.parameters(*BACKENDS)
  def test_explicit_axes(self, impl):
    mesh = _mesh(AxisType.Explicit)
    q, k, v, bias = _inputs()
    attention, grads = _loss_and_grads(impl)
    want = attention(q, k, v, bias)
    want_dq = grads(q, k, v, bias)[0]
    with jax.set_mesh(mesh):
      sharding = NamedSharding(mesh, SPECS["batch_heads"])
      qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
      fwd = jax.jit(attention)
      hlo = fwd.lower(qs, ks, vs, bias).compile().as_text()
      self.assertIsNone(GATHERS.search(hlo))
      out = fwd(qs, ks, vs, bias)
      dq = jax.jit(grads)(qs, ks, vs, bias)[0]
    self.assertEqual(jax.typeof(out).sharding.spec, SPECS["batch_heads"])
    np.testing.assert_allclose(out, want, atol=tolerances.atol(jnp.float32))
    np.testing.assert_allclose(dq, want_dq,
                               atol=tolerances.grad_atol(jnp.float32))

  @parameterized.parameters(*SPECS)
  def test_row_layout(self, sharded):
    mesh = _mesh(AxisType.Auto)
    sharding = NamedSharding(mesh, SPECS[sharded])
    q, k, v, bias = _inputs()
    rng = np.random.default_rng(1)
    idx = np.sort(np.stack([np.stack([
        rng.choice(T, 16, replace=False) for _ in range(T)])
        for _ in range(B * HKV)]), axis=-1).reshape(B, HKV, T, 16)
    layout = RowLayout.from_indices(idx.astype(np.int32), num_keys=T)

    def loss(q, k, v, bias):
      out = block_sparse_attention(q, k, v, layout, bias_k=bias, causal=True)
      return jnp.sum(out ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))
    want = grads(q, k, v, bias)
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
    hlo = jax.jit(grads).lower(qs, ks, vs, bias).compile().as_text()
    self.assertIsNone(GATHERS.search(hlo))
    for got, w in zip(jax.jit(grads)(qs, ks, vs, bias), want):
      np.testing.assert_allclose(got, w,
                                 atol=tolerances.grad_atol(jnp.float32))

  def test_sequence_sharding_raises(self):
    mesh = _mesh(AxisType.Auto)
    sharding = NamedSharding(mesh, P("data", "model", None, None))
    q, k, v, bias = _inputs()
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
    attention, _ = _loss_and_grads("xla")
    # Auto axes: the shardings are only known when XLA partitions, so the
    # ValueError arrives wrapped in the compiler's error, message intact.
    with self.assertRaisesRegex(Exception, "sequence axis T.*model"):
      jax.jit(attention).lower(qs, ks, vs, bias).compile()
    explicit = _mesh(AxisType.Explicit)
    with jax.set_mesh(explicit):
      sharding = NamedSharding(explicit, P("data", "model", None, None))
      qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
      with self.assertRaisesRegex(ValueError, "sequence axis T.*model"):
        jax.jit(attention).lower(qs, ks, vs, bias)

  def test_heads_not_dividing_kv_heads_raises(self):
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
    q, k, v, bias = _inputs()
    qs = jax.device_put(q, NamedSharding(mesh, SPECS["heads"]))
    attention, _ = _loss_and_grads("xla")
    with self.assertRaisesRegex(Exception, "does not divide the Hkv=2"):
      jax.jit(attention).lower(qs, k, v, bias).compile()


if __name__ == "__main__":
  absltest.main()
