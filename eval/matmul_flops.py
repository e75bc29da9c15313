"""Matrix-multiply FLOPs of a function, counted in its jaxpr.

XLA's cost analysis counts the body of a loop once, so for the chunked
gather paths (a `lax.map` over query chunks) it under-counts by the number
of chunks. This counter walks the jaxpr instead: every `dot_general` costs
2 * (output elements) * (contracted size), a `scan` body counts `length`
times, a `cond` its most expensive branch, other sub-jaxprs (jit, custom
VJP, partitioning wrappers) once. A `while_loop` whose trip count is not
static counts its body once and is reported, so a caller can say so.
Element-wise work is not counted; attention's cost is its matmuls.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass
class MatmulFlops:
  flops: float = 0.0
  while_loops: int = 0  # while loops counted once (unknown trip count)


def sub_jaxprs(params):
  """The jaxprs nested in an equation's params (jit, scan, cond, ...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)


def _count(jaxpr, total: MatmulFlops, scale: float) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total.flops += scale * _dot_flops(eqn)
    elif name == "scan":
      _count(eqn.params["jaxpr"].jaxpr, total, scale * eqn.params["length"])
    elif name == "cond":
      branches = []
      for branch in eqn.params["branches"]:
        sub = MatmulFlops()
        _count(branch.jaxpr, sub, scale)
        branches.append(sub)
      worst = max(branches, key=lambda b: b.flops)
      total.flops += worst.flops
      total.while_loops += worst.while_loops
    else:
      if name == "while":
        total.while_loops += 1
      for sub in sub_jaxprs(eqn.params):
        _count(sub, total, scale)


def matmul_flops(fn, *args, **kwargs) -> MatmulFlops:
  """Matmul FLOPs of `fn(*args, **kwargs)` (see the module docstring)."""
  total = MatmulFlops()
  _count(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, total, 1.0)
  return total
