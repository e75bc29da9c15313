"""SwinBERT: soft learnable mask (both forms), hard layout, W gradients."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import swinbert
from tests.jsparse.methods import method_test_base as mtb

CAPTION_LEN = jnp.array([5, 8])


def _config(form):
  return swinbert.SwinBERTConfig(num_caption=8, num_video=24, block_size=8,
                                 bias_form=form)


def _structure(method, caption_len):
  cfg = method.config
  i = jnp.arange(cfg.seq_len)
  key_ok = (i[None] >= cfg.num_caption) | (i[None] < caption_len[:, None])
  return (jnp.asarray(swinbert.structure_mask(cfg))[None]
          & key_ok[:, None, :])[:, None]


def _bias(method):
  c = method.config.num_caption
  n = method.config.seq_len
  return jnp.zeros((1, 1, n, n)).at[..., c:, c:].set(method.video_bias())


class SwinBERTSoftTest(mtb.MethodTestBase):
  TRAINS = True
  FORM = swinbert.LOG_MASK

  def make_method(self):
    method = swinbert.SwinBERTMethod(_config(self.FORM), rngs=nnx.Rngs(0))
    method.logits[...] = 4.0 * method.logits[...]
    return method

  def inputs(self, method):
    n = method.config.seq_len
    return (*mtb.random_qkv(0, 2, n, n, 2, 2, 8),
            {"caption_len": CAPTION_LEN})

  def dense_method(self):
    # sigmoid(30) == 1 in f32: the learned bias vanishes in both forms.
    method = swinbert.SwinBERTMethod(_config(self.FORM), rngs=nnx.Rngs(0))
    method.logits[...] = jnp.full_like(method.logits[...], 30.0)
    return method

  def dense_mask(self, method, q, k, kwargs):
    return _structure(method, kwargs["caption_len"])

  def logical_mask(self, method, q, k, kwargs):
    return _structure(method, kwargs["caption_len"])

  def logical_bias(self, method, q, k, kwargs):
    return _bias(method)

  def test_mask_gradient(self):
    method = self.make_method()
    q, k, v, kwargs = self.inputs(method)
    graphdef, state = nnx.split(method)
    mask = self.logical_mask(method, q, k, kwargs)

    def op(state):
      return jnp.sum(nnx.merge(graphdef, state)(q, k, v, **kwargs) ** 2)

    def ref(state):
      m = nnx.merge(graphdef, state)
      return jnp.sum(mtb.masked_attention(q, k, v, mask, _bias(m)) ** 2)

    g_op = jax.jit(jax.grad(op))(state)["logits"][...]
    g_ref = jax.grad(ref)(state)["logits"][...]
    np.testing.assert_allclose(g_op, g_ref, atol=2e-4, rtol=1e-3)
    self.assertGreater(np.abs(g_ref).max(), 0)


class SwinBERTOfficialTest(SwinBERTSoftTest):
  FORM = swinbert.OFFICIAL


class SwinBERTHardTest(mtb.MethodTestBase):

  def make_method(self):
    method = swinbert.SwinBERTMethod(_config(swinbert.OFFICIAL),
                                     rngs=nnx.Rngs(1))
    return method

  def inputs(self, method):
    n = method.config.seq_len
    return (*mtb.random_qkv(0, 2, n, n, 2, 1, 8),
            {"caption_len": CAPTION_LEN, "hard": True})

  def logical_mask(self, method, q, k, kwargs):
    hard = method.element_mask(hard=True)[None, None]
    return _structure(method, kwargs["caption_len"]) & hard

  def dense_method(self):
    # Threshold 0 keeps every video pair: only the sequence structure stays.
    config = dataclasses.replace(_config(swinbert.OFFICIAL), threshold=0.0)
    return swinbert.SwinBERTMethod(config, rngs=nnx.Rngs(1))

  def dense_mask(self, method, q, k, kwargs):
    return _structure(method, kwargs["caption_len"])


class SwinBERTLossTest(parameterized.TestCase):

  def test_sparsity_loss_and_transfer(self):
    method = swinbert.SwinBERTMethod(_config(swinbert.OFFICIAL),
                                     rngs=nnx.Rngs(0))
    sig = jax.nn.sigmoid(method.logits[...])
    off = sig * (1 - jnp.eye(24))
    np.testing.assert_allclose(method.sparsity_loss(), 0.5 * off.mean(),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.diag(method.soft_mask()), 1.0)
    w0 = np.arange(64.0).reshape(8, 8)
    w = swinbert.expand_diagonal(w0, np.zeros((24, 24)))
    np.testing.assert_array_equal(w[8:16, 8:16], w0)
    self.assertEqual(w[0, 8], 0.0)


if __name__ == "__main__":
  absltest.main()
