"""PEMF: point attentions vs dense formulations, gradients, identity init."""

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import pemf
from tests.jsparse.methods import method_test_base as mtb

B, T, H, W, C, N = 1, 3, 4, 4, 8, 5


def _points(key, shape):
  """Integer grid points (bilinear sampling is then exact)."""
  return jax.random.randint(key, shape, 0, 4).astype(jnp.float32) / 3.0


class PEMFMethodTest(mtb.MethodTestBase):
  TRAINS = True

  def make_method(self):
    return pemf.PEMFMethod(pemf.PEMFConfig(block_q=8))

  def inputs(self, method):
    q, k, v = mtb.random_qkv(0, 2, 20, N, 2, 2, 8)
    kv = jax.random.split(jax.random.key(3), 3)
    visible = jax.random.bernoulli(kv[0], 0.6, (2, N)).at[:, 0].set(True)
    bias = jax.random.normal(kv[1], (2, 2, N))
    allowed = jax.random.bernoulli(kv[2], 0.7, (2, 20, N))
    return q, k, v, {"visible": visible, "point_bias": bias,
                     "allowed": allowed}

  def logical_mask(self, method, q, k, kwargs):
    return (kwargs["allowed"] & kwargs["visible"][:, None])[:, None]

  def logical_bias(self, method, q, k, kwargs):
    return kwargs["point_bias"][:, :, None]

  def test_full_density_is_dense(self):
    # Every point visible and allowed, no point bias: dense attention.
    method = self.make_method()
    q, k, v, kwargs = self.inputs(method)
    full = {"visible": jnp.ones_like(kwargs["visible"]),
            "point_bias": jnp.zeros_like(kwargs["point_bias"]),
            "allowed": jnp.ones_like(kwargs["allowed"])}
    out = jax.jit(lambda q, k, v: method(q, k, v, implementation="xla",
                                         **full))(q, k, v)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v),
                               atol=1e-4, rtol=1e-4)

  def test_psa_equals_dense_garment_attention(self):
    # Gathered keys/values vs frame tokens attending to all garment
    # positions with only the sampled ones kept.
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, H * W, 1, C))
    table_k = jax.random.normal(ks[1], (1, H, W, C))
    table_v = jax.random.normal(ks[2], (1, H, W, C))
    pix = jnp.array([[0, 0], [1, 2], [3, 3], [2, 1], [3, 0]])
    pts = (pix / 3.0)[None].astype(jnp.float32)
    visible = jnp.array([[True, True, False, True, True]])
    k_s = pemf.bilinear_sample(table_k, pts)[:, :, None]
    v_s = pemf.bilinear_sample(table_v, pts)[:, :, None]
    out = pemf.PEMFMethod()(q, k_s, v_s, visible=visible)
    flat = pix[:, 1] * W + pix[:, 0]
    keep = jnp.zeros(H * W, bool).at[flat].set(visible[0])
    ref = mtb.masked_attention(q, table_k.reshape(1, H * W, 1, C),
                               table_v.reshape(1, H * W, 1, C),
                               keep[None, None, None])
    np.testing.assert_allclose(out, ref, atol=1e-5)

  def test_blocks_identity_at_init_and_gradients(self):
    ks = jax.random.split(jax.random.key(1), 6)
    frames = jax.random.normal(ks[0], (B, T, H, W, C))
    garment = jax.random.normal(ks[1], (B, H, W, C))
    fpts, gpts = _points(ks[2], (B, T, N, 2)), _points(ks[3], (B, N, 2))
    vis = jax.random.bernoulli(ks[4], 0.7, (B, T, N))
    temb = jax.random.normal(ks[5], (B, 6))
    cfg = pemf.PEMFConfig(num_heads=2, point_radius=0.5)
    psa = pemf.PointSpatialAttention(C, 6, cfg, rngs=nnx.Rngs(0))
    pta = pemf.PointTemporalAttention(C, cfg, rngs=nnx.Rngs(0))
    identity = jax.jit(lambda f: (psa(f, garment, fpts, gpts, vis, temb),
                                  pta(f, fpts, vis)))
    for out in identity(frames):
      np.testing.assert_array_equal(out, frames)
    psa.modulation.bias[...] = jnp.ones_like(psa.modulation.bias[...])

    def loss(frames, garment):
      return jnp.sum(psa(frames, garment, fpts, gpts, vis, temb) ** 2)

    g_frames, g_garment = jax.jit(jax.grad(loss, (0, 1)))(frames, garment)
    self.assertTrue(np.isfinite(g_frames).all())
    self.assertGreater(np.abs(g_garment).max(), 0)  # through the sampling

  def test_pta_equals_dense_trajectory_attention(self):
    ks = jax.random.split(jax.random.key(2), 3)
    frames = jax.random.normal(ks[0], (B, T, H, W, C))
    # Distinct integer points per frame so each token is on one track.
    pix = jnp.stack([jax.random.permutation(k, H * W)[:N]
                     for k in jax.random.split(ks[1], T)])
    pts = jnp.stack([pix % W, pix // W], -1)[None] / 3.0
    vis = jax.random.bernoulli(ks[2], 0.7, (B, T, N)).at[:, 0].set(True)
    cfg = pemf.PEMFConfig(num_heads=1)
    pta = pemf.PointTemporalAttention(C, cfg, rngs=nnx.Rngs(0))
    samples = pemf.bilinear_sample(frames.reshape(T, H, W, C),
                                   pts.reshape(T, N, 2).astype(jnp.float32))
    tracks = samples.swapaxes(0, 1)  # [N, T, C]
    normed = pta.norm(tracks)
    q = pta.query(normed)[:, :, None]
    k = pta.key(normed)[:, :, None]
    v = pta.value(normed)[:, :, None]
    gathered = pta.method(q, k, v, visible=vis[0].T)
    # Dense space-time attention over all T*H*W tokens, trajectory mask.
    tok = (jnp.arange(T)[:, None] * H * W + pix).T.reshape(-1)  # [N*T]
    dense_q = jnp.zeros((1, T * H * W, 1, C)).at[0, tok].set(
        q.reshape(-1, 1, C))
    dense_k = jnp.zeros((1, T * H * W, 1, C)).at[0, tok].set(
        k.reshape(-1, 1, C))
    dense_v = jnp.zeros((1, T * H * W, 1, C)).at[0, tok].set(
        v.reshape(-1, 1, C))
    track_id = jnp.full(T * H * W, -1).at[tok].set(
        jnp.repeat(jnp.arange(N), T))
    key_ok = jnp.zeros(T * H * W, bool).at[tok].set(vis[0].T.reshape(-1))
    mask = ((track_id[:, None] == track_id[None, :]) & (track_id[:, None] >= 0)
            & key_ok[None, :])
    dense = mtb.masked_attention(dense_q, dense_k, dense_v,
                                 mask[None, None])[0, tok]
    np.testing.assert_allclose(gathered.reshape(-1, 1, C), dense, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
