"""Class-conditional DiT with classifier-free guidance, on jsparse's DiT.

As in DiT (Peebles & Xie, arXiv 2212.09748) the adaLN condition of a block
is its timestep embedding plus a learned label embedding; the extra label
`num_classes` means "no label", so one model is both the conditional and
the unconditional model of classifier-free guidance (Ho & Salimans, arXiv
2207.12598): labels are dropped at random in training, and sampling follows
out = out(x, t, null) + scale * (out(x, t, y) - out(x, t, null)).

`jsparse.models.dit.DiT` hands its `t` only to each block's `time_embed`,
so `ConditionalDiT` swaps those embedders for ones that read a
(timestep, label) pair and calls the DiT with it.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from jsparse.models import dit


class LabelledTimestepEmbedder(nnx.Module):
  """(t, label) pairs [B, 2] -> time_embed(t) + label_embed(label) [B, F]."""

  def __init__(self, time_embed: nnx.Module, num_labels: int,
               hidden_size: int, *, rngs: nnx.Rngs):
    self.time_embed = time_embed
    self.label_embed = nnx.Embed(num_labels, hidden_size, rngs=rngs)

  def __call__(self, condition: jax.Array) -> jax.Array:
    labels = condition[:, 1].astype(jnp.int32)
    return self.time_embed(condition[:, 0]) + self.label_embed(labels)


class ConditionalDiT(nnx.Module):
  """A DiT conditioned on class labels in [0, num_classes] (num_classes:
  no label); num_classes = 0 is an unconditional DiT."""

  def __init__(self, config: dit.DiTConfig, num_classes: int, *,
               rngs: nnx.Rngs):
    if num_classes < 0:
      raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    self.null_label = num_classes
    self.dit = dit.DiT(config, rngs=rngs)
    for block in self.dit.blocks:
      block.time_embed = LabelledTimestepEmbedder(
          block.time_embed, num_classes + 1, config.hidden_size, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array,
               labels: jax.Array) -> jax.Array:
    """Predicts the velocity.

    Args:
      x: [B, R, R, C] noisy images.
      t: [B] timesteps in [0, 1000].
      labels: int [B] in [0, num_classes] (num_classes: no label).

    Returns:
      [B, R, R, C] f32 velocity.
    """
    condition = jnp.stack([t.astype(jnp.float32),
                           labels.astype(jnp.float32)], axis=-1)
    return self.dit(x, condition)


def drop_labels(labels: jax.Array, key: jax.Array, rate: float,
                null_label: int) -> jax.Array:
  """Replaces each label by `null_label` with probability `rate`."""
  drop = jax.random.bernoulli(key, rate, labels.shape)
  return jnp.where(drop, null_label, labels)


def guided(model: ConditionalDiT, labels: jax.Array,
           scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(x, t) -> the classifier-free guided output of `model` for `labels` [B]:
  out(null) + scale * (out(labels) - out(null)); the output (v or x0)
  enters the velocity affinely, so guiding it guides the velocity.

  scale = 1 is the plain conditional model (one forward pass); otherwise
  the conditional and unconditional passes run as one batch of 2B.
  """
  if scale == 1.0:
    return lambda x, t: model(x, t, labels)
  null = jnp.full_like(labels, model.null_label)

  def output(x, t):
    both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(both, 2)
    return uncond + scale * (cond - uncond)

  return output
