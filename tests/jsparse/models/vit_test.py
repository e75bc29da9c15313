"""ViT: shapes, dense aux, and the pluggable sparse core."""

from __future__ import annotations

import dataclasses

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np

from jsparse.methods import sparsifiner
from jsparse.models import vit

_CFG = vit.ViTConfig(image_size=8, patch_size=2, hidden_size=16, depth=2,
                     num_heads=2)


class ViTTest(absltest.TestCase):

  def test_dense_shapes_and_attention_maps(self):
    model = vit.ViT(_CFG, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    logits, aux = model(images, with_aux=True)
    self.assertEqual(logits.shape, (3, 10))
    self.assertEqual(aux["tokens"].shape, (3, 17, 16))
    self.assertLen(aux["probs"], 2)
    np.testing.assert_allclose(aux["probs"][0].sum(-1), 1.0, atol=1e-5)

  def test_full_density_sparsifiner_equals_dense(self):
    method_config = sparsifiner.SparsifinerConfig(keep_rate=1.0)
    cfg = dataclasses.replace(_CFG, attention="sparsifiner",
                              method_config=method_config,
                              implementation="xla")
    model = vit.ViT(cfg, rngs=nnx.Rngs(0))
    self.assertEqual(model.blocks[0].attn.method.config.num_tokens, 17)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    sparse = nnx.jit(lambda m, x: m(x))(model, images)
    dense = nnx.jit(lambda m, x: m(x, dense=True))(model, images)
    np.testing.assert_allclose(sparse, dense, atol=2e-5)
    self.assertIsNone(model(images, with_aux=True)[1]["probs"][0])


if __name__ == "__main__":
  absltest.main()
