"""The jaxpr matmul-FLOP counter of eval/bench_methods.py."""

from absl.testing import absltest
import jax
import jax.numpy as jnp

from eval import matmul_flops


class MatmulFlopsTest(absltest.TestCase):

  def test_dense_attention(self):
    q = jnp.zeros((2, 128, 4, 32))
    got = matmul_flops.matmul_flops(jax.nn.dot_product_attention, q, q, q)
    # QK^T and PV: 2 * (2 * B * H * T * S * D).
    self.assertEqual(got.flops, 4 * 2 * 4 * 128 * 128 * 32)
    self.assertEqual(got.while_loops, 0)

  def test_loops_count_their_trip_count(self):
    a = jnp.zeros((8, 16))
    b = jnp.zeros((16, 4))
    once = 2 * 8 * 16 * 4
    mapped = lambda a, b: jax.lax.map(lambda x: x @ b, jnp.stack([a] * 5))
    self.assertEqual(matmul_flops.matmul_flops(mapped, a, b).flops, 5 * once)

    def branchy(a, b, pred):
      return jax.lax.cond(pred, lambda: (a @ b) @ b.T, lambda: a)

    got = matmul_flops.matmul_flops(branchy, a, b, True)
    self.assertEqual(got.flops, once + 2 * 8 * 4 * 16)

  def test_dynamic_while_is_reported(self):
    a = jnp.zeros((4, 4))
    loop = lambda a, n: jax.lax.while_loop(
        lambda c: c[1] < n, lambda c: (c[0] @ c[0], c[1] + 1), (a, 0))[0]
    got = matmul_flops.matmul_flops(loop, a, 3)
    self.assertEqual((got.flops, got.while_loops), (2 * 4 * 4 * 4, 1))


if __name__ == "__main__":
  absltest.main()
