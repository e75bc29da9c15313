"""SparseAttention vs flax.nnx.MultiHeadAttention, and decode caches."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import attention


class SparseAttentionTest(parameterized.TestCase):

  @parameterized.parameters((None, False), (2, True))
  def test_matches_nnx_and_decode(self, kv_heads, rope):
    kw = dict(num_heads=4, in_features=16, qkv_features=32,
              num_kv_heads=kv_heads, rngs=nnx.Rngs(0))
    extra = {}
    if rope:
      extra["attention_fn"] = functools.partial(
          nnx.dot_product_attention_with_rope, rope=nnx.RoPE(theta=100.0))
    mha = nnx.MultiHeadAttention(**kw, decode=False, **extra)
    sparse = attention.SparseAttention(
        **kw, rope_theta=100.0 if rope else None)
    nnx.update(sparse, nnx.state(mha, nnx.Param))
    x = jax.random.normal(jax.random.key(1), (2, 20, 16))
    want = mha(x, is_causal=True)
    got = nnx.jit(lambda m, x: m(x, causal=True))(sparse, x)
    np.testing.assert_allclose(got, want, atol=2e-5)
    sparse.init_cache((2, 20, 16))
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outs = jnp.concatenate([step(sparse, x[:, i:i + 1]) for i in range(20)],
                           1)
    np.testing.assert_allclose(outs, want, atol=2e-5)


if __name__ == "__main__":
  absltest.main()
