"""Multi-query associative recall (MQAR), as in Zoology and the DMA paper.

A sequence opens with N key-value pairs `k1 v1 ... kN vN`; the keys are then
queried once each, in random order, at random places of the rest of the
sequence (filler token 0 elsewhere), each query followed by its value. The
model is scored on predicting the value right after each queried key, so
answering a query far from the pairs needs a long-range lookup that a
sliding window shorter than that distance cannot make.
"""

from __future__ import annotations

import numpy as np

FILLER = 0


def batch(step: int, batch_size: int, seq_len: int, num_pairs: int,
          num_keys: int, num_values: int, seed: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The batch of step `step` (a pure function of seed and step).

  Keys are tokens 1..num_keys, values num_keys + 1..num_keys + num_values.

  Returns:
    inputs int32 [B, T], targets int32 [B, T] (inputs shifted by one) and
    weights f32 [B, T] (1 where the target is a queried value).
  """
  slots = (seq_len + 1 - 2 * num_pairs) // 2
  if slots < num_pairs or num_keys < num_pairs:
    raise ValueError(
        f"seq_len {seq_len} / num_keys {num_keys} too small for "
        f"{num_pairs} pairs")
  rng = np.random.default_rng([seed, step])
  x = np.full((batch_size, seq_len + 1), FILLER, np.int32)
  weights = np.zeros((batch_size, seq_len), np.float32)
  for b in range(batch_size):
    keys = rng.choice(num_keys, num_pairs, replace=False) + 1
    values = rng.integers(0, num_values, num_pairs) + num_keys + 1
    x[b, 0:2 * num_pairs:2], x[b, 1:2 * num_pairs:2] = keys, values
    order = rng.permutation(num_pairs)
    where = 2 * num_pairs + 2 * np.sort(
        rng.choice(slots, num_pairs, replace=False))
    x[b, where], x[b, where + 1] = keys[order], values[order]
    weights[b, where] = 1.0
  return x[:, :-1], x[:, 1:], weights
