"""The dense oracle against jax.nn.dot_product_attention and a NumPy loop."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels import block_sparse_attention
from tests.pallas_kernels.block_sparse_attention import test_base


def numpy_attention(q, k, v, mask, bias, scale):
  """Row-by-row softmax in float64; rows with no visible key give 0."""
  b, t, hq, d = q.shape
  group = hq // k.shape[2]
  out = np.zeros(q.shape)
  for bi, h, i in np.ndindex(b, hq, t):
    keys = np.flatnonzero(mask[bi, h, i])
    if not len(keys):
      continue
    s = q[bi, i, h] @ k[bi, keys, h // group].T * scale + bias[bi, h, keys]
    p = np.exp(s - s.max())
    out[bi, i, h] = p @ v[bi, keys, h // group] / p.sum()
  return out


class ReferenceTest(absltest.TestCase):

  def test_matches_numpy_loop(self):
    b, t, s, hq, hkv, d = 2, 40, 56, 4, 2, 8
    q, k, v = (np.asarray(x, np.float64)
               for x in test_base.random_qkv(0, b, t, s, hq, hkv, d))
    lay = test_base.random_layout(1, b, hq, t, s, 16, 16, density=0.6)
    bias = np.random.default_rng(0).normal(size=(b, hkv, s))
    seg_q = np.random.default_rng(1).integers(0, 2, (b, t))
    seg_kv = np.random.default_rng(2).integers(0, 2, (b, s))
    out = block_sparse_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), lay,
        bias_k=jnp.asarray(bias, jnp.float32), q_segment_ids=seg_q,
        kv_segment_ids=seg_kv, causal=True, implementation="reference")
    full, partial = (np.asarray(m) for m in lay.element_masks(t, s))
    causal = np.tril(np.ones((t, s), bool))
    same_seg = seg_q[:, None, :, None] == seg_kv[:, None, None, :]
    # The op's masks (causal, segments) apply to full blocks too.
    mask = (full | partial) & causal & same_seg
    bias_q = np.repeat(bias, hq // hkv, axis=1)
    want = numpy_attention(q, k, v, mask, bias_q, d ** -0.5)
    np.testing.assert_allclose(out, want, atol=1e-5)

  def test_full_density_with_bias_equals_dot_product_attention(self):
    b, t, s, hq, hkv, d = 1, 48, 48, 2, 1, 16
    q, k, v = test_base.random_qkv(3, b, t, s, hq, hkv, d)
    bias = jax.random.normal(jax.random.key(0), (b, hq, s))
    out = block_sparse_attention(q, k, v, BlockLayout.dense(t, s), bias_k=bias,
                                 implementation="reference")
    want = jax.nn.dot_product_attention(
        q, k, v, bias=jnp.broadcast_to(bias[:, :, None, :], (b, hq, t, s)))
    chex.assert_trees_all_close(out, want, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
