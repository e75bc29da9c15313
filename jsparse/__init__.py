"""jsparse: sparse-attention methods as Flax NNX modules on one op.

The modules, methods and adapters are imported on first use (the methods
pull in SciPy and Optax), so `import jsparse` costs about `import jax`.
"""

import importlib
from typing import TYPE_CHECKING

from pallas_kernels import BlockLayout as BlockLayout
from pallas_kernels import block_sparse_attention as block_sparse_attention

__version__ = "0.1.0"

# Public name -> the module defining it.
_LAZY = {
    "METHODS": "jsparse.methods",
    "SparseMethod": "jsparse.methods",
    "SparsePlan": "jsparse.methods",
    "SparseAttention": "jsparse.attention",
    "attention_fn": "jsparse.flax_compat",
    "dot_product_attention": "jsparse.flax_compat",
}

__all__ = ["BlockLayout", "block_sparse_attention", *_LAZY]

if TYPE_CHECKING:
  from jsparse.attention import SparseAttention as SparseAttention
  from jsparse.flax_compat import attention_fn as attention_fn
  from jsparse.flax_compat import (
      dot_product_attention as dot_product_attention,
  )
  from jsparse.methods import METHODS as METHODS
  from jsparse.methods import SparseMethod as SparseMethod
  from jsparse.methods import SparsePlan as SparsePlan


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'jsparse' has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted({*globals(), *_LAZY})
