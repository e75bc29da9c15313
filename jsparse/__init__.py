"""jsparse: sparse-attention methods as Flax NNX modules on one op."""

from pallas_kernels import BlockLayout as BlockLayout
from pallas_kernels import block_sparse_attention as block_sparse_attention

__version__ = "0.1.0"
