"""train/lib/conditional.py: label conditioning and classifier-free guidance."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsparse.models import dit
from train.lib import conditional

CONFIG = dit.DiTConfig(image_size=8, in_channels=1, hidden_size=16, depth=2,
                       num_heads=2)


def _random_model(num_classes=10):
  """A ConditionalDiT with every parameter random (adaLN-Zero's zero gates
  and head would hide the labels)."""
  model = conditional.ConditionalDiT(CONFIG, num_classes, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [
      0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  return model


def _inputs(batch=4):
  x = jax.random.normal(jax.random.key(2), (batch, 8, 8, 1))
  return x, jnp.linspace(50.0, 950.0, batch)


def test_each_sample_follows_its_own_label():
  model = _random_model()
  x, t = _inputs()
  labels = jnp.asarray([3, 3, 5, 10])
  v = model(x, t, labels)
  same_x = model(jnp.repeat(x[:1], 4, 0), jnp.repeat(t[:1], 4), labels)
  np.testing.assert_allclose(same_x[0], same_x[1], atol=1e-6)
  assert not np.allclose(same_x[1], same_x[2], atol=1e-3)
  assert not np.allclose(same_x[2], same_x[3], atol=1e-3)
  relabelled = model(x, t, jnp.asarray([3, 7, 0, 1]))
  np.testing.assert_allclose(relabelled[0], v[0], atol=1e-6)


def test_condition_is_time_embedding_plus_label_embedding():
  model = _random_model()
  embedder = model.dit.blocks[1].time_embed
  t, labels = jnp.asarray([10.0, 700.0]), jnp.asarray([2, 10])
  got = embedder(jnp.stack([t, labels.astype(jnp.float32)], -1))
  want = embedder.time_embed(t) + embedder.label_embed(labels)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_guidance_extrapolates_from_the_unconditional(scale):
  model = _random_model()
  x, t = _inputs()
  labels = jnp.asarray([1, 2, 3, 4])
  cond = model(x, t, labels)
  uncond = model(x, t, jnp.full((4,), model.null_label))
  got = conditional.guided(model, labels, scale)(x, t)
  np.testing.assert_allclose(got, uncond + scale * (cond - uncond),
                             atol=1e-5)


def test_guidance_scale_one_is_the_conditional_model():
  model = _random_model()
  x, t = _inputs()
  labels = jnp.asarray([1, 2, 3, 4])
  np.testing.assert_array_equal(
      conditional.guided(model, labels, 1.0)(x, t),
      model(x, t, labels))


def test_drop_labels_rate():
  labels = jnp.arange(10_000) % 10
  key = jax.random.key(0)
  np.testing.assert_array_equal(
      conditional.drop_labels(labels, key, 0.0, 10), labels)
  np.testing.assert_array_equal(
      conditional.drop_labels(labels, key, 1.0, 10), 10)
  dropped = conditional.drop_labels(labels, key, 0.1, 10)
  assert 0.08 < float(jnp.mean(dropped == 10)) < 0.12
  kept = dropped != 10
  np.testing.assert_array_equal(dropped[kept], labels[kept])


def test_negative_num_classes_is_refused():
  with pytest.raises(ValueError, match="num_classes"):
    conditional.ConditionalDiT(CONFIG, -1, rngs=nnx.Rngs(0))
