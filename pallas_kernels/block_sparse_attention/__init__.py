"""Block-sparse attention over a `BlockLayout`, forward and backward."""

from pallas_kernels.block_sparse_attention.api import (
    available_implementations as available_implementations,
)
from pallas_kernels.block_sparse_attention.api import (
    block_sparse_attention as block_sparse_attention,
)
