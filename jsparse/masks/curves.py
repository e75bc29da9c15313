"""Space-filling-curve token orders for video latents (PSA, BLADE).

PSA (https://arxiv.org/abs/2512.04025) and Video-BLADE
(https://arxiv.org/abs/2508.10774) permute the tokens of a (frames, height,
width) latent grid along a generalised Hilbert ("Gilbert") curve, so that
contiguous 1-D blocks of the sequence are compact 3-D tiles; the output is
permuted back. The curve handles any box size: it visits every cell exactly
once, with unit steps whenever the sides allow (always for even sides).

Host-side NumPy, computed once per grid shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _length(v: np.ndarray) -> int:
  return int(abs(v.sum()))


def _walk(origin, a, b, c, out: list) -> None:
  """Appends the cells of the box spanned by axis vectors a, b, c.

  `a` is the major direction: the curve enters at `origin` and leaves next
  to `origin + a - sign(a)`. Each recursion halves the longer sides (halves
  rounded to even lengths where possible, so that sub-curves chain with unit
  steps) and orders the sub-boxes so that consecutive ones touch.
  """
  w, h, d = _length(a), _length(b), _length(c)
  da, db, dc = np.sign(a), np.sign(b), np.sign(c)
  if h == 1 and d == 1:
    out.extend(origin + i * da for i in range(w))
    return
  if w == 1 and d == 1:
    out.extend(origin + i * db for i in range(h))
    return
  if w == 1 and h == 1:
    out.extend(origin + i * dc for i in range(d))
    return
  a2, b2, c2 = a // 2, b // 2, c // 2
  if _length(a2) % 2 and w > 2:
    a2 = a2 + da
  if _length(b2) % 2 and h > 2:
    b2 = b2 + db
  if _length(c2) % 2 and d > 2:
    c2 = c2 + dc
  if 2 * w > 3 * h and 2 * w > 3 * d:
    # Long along a: two halves side by side.
    _walk(origin, a2, b, c, out)
    _walk(origin + a2, a - a2, b, c, out)
  elif 3 * h > 4 * d:
    # Thin along c: a 2-D "U" in the (a, b) plane.
    _walk(origin, b2, c, a2, out)
    _walk(origin + b2, a, b - b2, c, out)
    _walk(origin + (a - da) + (b2 - db), -b2, c, -(a - a2), out)
  elif 3 * d > 4 * h:
    # Thin along b: a 2-D "U" in the (a, c) plane.
    _walk(origin, c2, a2, b, out)
    _walk(origin + c2, a, b, c - c2, out)
    _walk(origin + (a - da) + (c2 - dc), -c2, -(a - a2), b, out)
  else:
    # Split every side: five sub-boxes (the 3-D Hilbert octant order, with
    # the two far octants of each half merged).
    _walk(origin, b2, c2, a2, out)
    _walk(origin + b2, c, a2, b - b2, out)
    _walk(origin + (b2 - db) + (c - dc), a, -b2, -(c - c2), out)
    _walk(origin + (a - da) + b2 + (c - dc), -c, -(a - a2), b - b2, out)
    _walk(origin + (a - da) + (b2 - db), -b2, c2, -(a - a2), out)


@functools.lru_cache(maxsize=32)
def gilbert_order(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Generalised Hilbert order of a 1-, 2- or 3-D grid, raster-major input.

  Args:
    shape: grid sides, e.g. (frames, height, width); raster index of cell
      (f, y, x) is (f * height + y) * width + x.

  Returns:
    perm int32 [N]: the raster index of each curve position
      (`tokens_curve = tokens_raster[perm]`), and its inverse
      (`tokens_raster = tokens_curve[inverse]`). Both are read-only.
  """
  shape = tuple(int(s) for s in shape)
  if not 1 <= len(shape) <= 3 or min(shape) < 1:
    raise ValueError(f"shape must have 1-3 positive sides, got {shape}")
  sides = (1,) * (3 - len(shape)) + shape
  # Axis vectors in (f, y, x) coordinates; the longest side is the major one.
  axes = [np.eye(3, dtype=np.int64)[i] * sides[i] for i in range(3)]
  major = 2 - int(np.argmax(sides[::-1]))  # ties: prefer x, then y
  others = [axes[i] for i in range(3) if i != major]
  cells: list = []
  _walk(np.zeros(3, np.int64), axes[major], others[1], others[0], cells)
  coords = np.stack(cells)
  perm = ((coords[:, 0] * sides[1] + coords[:, 1]) * sides[2]
          + coords[:, 2]).astype(np.int32)
  inverse = np.empty_like(perm)
  inverse[perm] = np.arange(perm.size, dtype=np.int32)
  perm.setflags(write=False)
  inverse.setflags(write=False)
  return perm, inverse


def rearrange(x: jax.Array, perm: np.ndarray, *, axis: int = 1,
              num_prefix: int = 0) -> jax.Array:
  """Permutes the video tokens of `x` along `axis`, leaving others in place.

  Args:
    x: e.g. [B, N, H, D] with video tokens at positions
      [num_prefix, num_prefix + len(perm)) of `axis`.
    perm: a permutation from `gilbert_order` (or its inverse to undo).
    axis: the sequence axis.
    num_prefix: tokens before the video (kept first).

  Returns:
    x with the video tokens reordered (`x_video[perm]`); differentiable.
  """
  n = x.shape[axis]
  if num_prefix + perm.size > n:
    raise ValueError(
        f"{perm.size} video tokens after {num_prefix} prefix tokens do not "
        f"fit an axis of length {n}")
  full = np.arange(n)
  full[num_prefix:num_prefix + perm.size] = num_prefix + np.asarray(perm)
  return jnp.take(x, jnp.asarray(full), axis=axis)
