"""PNG rendering of block layouts and element masks (matplotlib)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from matplotlib import colors  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import layout as layout_lib  # noqa: E402

_KIND_COLOURS = colors.ListedColormap(["#ffffff", "#f4a261", "#264653"])


def layout_image(layout: layout_lib.BlockLayout, *, batch: int = 0,
                 head: int = 0) -> np.ndarray:
  """int8 [Qb, Kb] kind map (0 empty, 1 partial, 2 full) of one (b, h)."""
  return np.asarray(layout.to_block_mask())[batch, head]


def save_layout(layout: layout_lib.BlockLayout, path: str, *,
                heads: tuple[int, ...] = (0,), batch: int = 0,
                title: str | None = None) -> None:
  """Writes the kind maps of `heads` side by side as a PNG.

  White: skipped block; orange: partial (element predicates apply); dark:
  full.
  """
  fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.4),
                           squeeze=False)
  for ax, h in zip(axes[0], heads):
    kinds = layout_image(layout, batch=batch,
                         head=min(h, layout.num_heads - 1))
    ax.imshow(kinds, cmap=_KIND_COLOURS, vmin=0, vmax=2,
              interpolation="nearest")
    density = (kinds > 0).mean()
    ax.set_title(f"head {h}: {density:.0%} of blocks", fontsize=9)
    ax.set_xlabel("kv block")
    ax.set_ylabel("query block")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def save_mask(mask: np.ndarray, path: str, *, title: str | None = None,
              block: int | None = None) -> None:
  """Writes a boolean [T, S] element mask as a PNG, with block grid lines."""
  mask = np.asarray(mask, bool)
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
  if block:
    for x in range(block, max(mask.shape), block):
      ax.axhline(x - 0.5, color="#e76f51", lw=0.4)
      ax.axvline(x - 0.5, color="#e76f51", lw=0.4)
  ax.set_xlabel("key")
  ax.set_ylabel("query")
  ax.set_title(title or f"{mask.mean():.0%} visible", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
