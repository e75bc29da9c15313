"""Block selection helpers shared by the dynamic methods."""

from jsparse.masks.selection import band_block_mask as band_block_mask
from jsparse.masks.selection import (
    cumulative_mass_mask as cumulative_mass_mask,
)
from jsparse.masks.selection import mean_pool as mean_pool
from jsparse.masks.selection import (
    pooled_block_scores as pooled_block_scores,
)
from jsparse.masks.selection import (
    sampled_block_scores as sampled_block_scores,
)
from jsparse.masks.selection import topk_block_mask as topk_block_mask
