"""jsparse: sparse-attention methods as Flax NNX modules on one op."""

from jsparse.methods import METHODS as METHODS
from jsparse.methods import SparseMethod as SparseMethod
from jsparse.methods import SparsePlan as SparsePlan
from pallas_kernels import BlockLayout as BlockLayout
from pallas_kernels import block_sparse_attention as block_sparse_attention

__version__ = "0.1.0"
