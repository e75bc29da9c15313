"""The small LM: shapes, causality of every attention, DMA gradients."""

from __future__ import annotations

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import dma
from jsparse.models import lm

T = 32


def _config(attention, **kw):
  method_config = (dma.DMAConfig(window=8, variant=kw.pop("variant",
                                                           dma.PER_ROW))
                   if attention == "dma" else None)
  return lm.LMConfig(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1,
                     mlp_hidden=64, attention=attention, window=8,
                     method_config=method_config, block_size=8, **kw)


def _logits(model, tokens):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)


class LMTest(parameterized.TestCase):

  @parameterized.parameters("dense", "window", "dma")
  def test_causal(self, attention):
    model = lm.LM(_config(attention), rngs=nnx.Rngs(0))
    if attention == "dma":  # distinct scores, so selection is non-trivial
      for block in model.blocks:
        block.attn.method.a[...] = jnp.array([1.5])
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 256)
    changed = tokens.at[:, T // 2:].set(7)
    a, b = _logits(model, tokens), _logits(model, changed)
    self.assertEqual(a.shape, (2, T, 256))
    self.assertTrue(np.all(np.isfinite(a)))
    np.testing.assert_allclose(a[:, :T // 2], b[:, :T // 2], atol=1e-5)
    self.assertGreater(float(jnp.abs(a[:, T // 2:] - b[:, T // 2:]).max()),
                       1e-3)

  def test_long_window_equals_dense(self):
    dense = lm.LM(_config("dense"), rngs=nnx.Rngs(1))
    window = lm.LM(dataclasses.replace(_config("window"), window=T),
                   rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 256)
    np.testing.assert_allclose(_logits(dense, tokens),
                               _logits(window, tokens), atol=1e-5)

  def test_dma_bias_parameters_get_gradients(self):
    model = lm.LM(_config("dma"), rngs=nnx.Rngs(2))
    tokens = jax.random.randint(jax.random.key(2), (2, T + 1), 0, 256)

    def loss(model):
      return lm.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])

    grads = nnx.jit(nnx.grad(loss))(model)
    a_grads = [x[...] for path, x in nnx.to_flat_state(grads)
               if path[-2:] == ("method", "a")]
    self.assertLen(a_grads, 2)
    for g in a_grads:
      self.assertGreater(float(jnp.abs(g).max()), 0)

  def test_unknown_attention_raises(self):
    with self.assertRaisesRegex(ValueError, "attention must be"):
      lm.LM(_config("nope"), rngs=nnx.Rngs(0))


if __name__ == "__main__":
  absltest.main()
