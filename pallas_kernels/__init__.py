"""Pallas kernels of jsparse: the block-sparse attention op and its layout."""

from pallas_kernels.block_sparse_attention import (
    available_implementations as available_implementations,
)
from pallas_kernels.block_sparse_attention import (
    block_sparse_attention as block_sparse_attention,
)
from pallas_kernels import mask_fns as mask_fns
from pallas_kernels.layout import BlockLayout as BlockLayout
from pallas_kernels.layout import FlexBlockMask as FlexBlockMask
from pallas_kernels.layout import KvMajorLayout as KvMajorLayout
from pallas_kernels.row_layout import RowLayout as RowLayout
