"""Partitioning of the op's backend calls over batch and head mesh axes.

Pallas custom calls have no partitioning rule, and XLA's own rules for the
gathers of the "xla" backend gather the global batch onto every device. Each
backend call of the op therefore goes through `jax.experimental.
custom_partitioning` (as jax's cuDNN attention does), with a Shardy sharding
rule that names the batch and head factors of every operand:

- q, out: [b, t, (h g), d]; k, v: [b, s, h, d]; lse: [b, (h g), t], where h
  counts kv heads and g the q heads of one kv head (GQA);
- layout lists and bias_k: a leading batch dim of size B is "b", of size 1 is
  replicated; a head dim of size Hq is "(h g)", of size Hkv "h", of size 1
  replicated; every other dim is local to the operand.

So each device runs the kernels on its own batch and head shard and nothing
is gathered. custom_partitioning works from the shardings XLA propagates,
so it needs no argument: it serves `jax.set_mesh` with NamedSharding inputs
and jit with in/out shardings alike (shard_map would need the specs of q at
trace time, which Auto axes do not expose). A sharded sequence axis (context
parallelism) or head dim raises, and so does a head sharding that does not
divide the kv heads. Gradients of a bias broadcast over batch or heads are
summed across the devices that share it (an all-reduce, the only collective).

On one device (or an abstract mesh of size one, as in `jax.export`) the call
runs unwrapped; so does a call with side effects, which custom_partitioning
cannot carry: the TPU interpreter's ordered callbacks (interpret mode is a
CPU debugging aid, and its operands are gathered on a multi-device mesh).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from jax import custom_batching
from jax.experimental import custom_partitioning as cp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Roles of operands and results (pytree leaves are strings).
Q = "q"  # [B, T, Hq, D]
KV = "kv"  # [B, S, Hkv, D]
LSE = "lse"  # [B, Hq, T]
Q_SEGMENTS = "q_seg"  # [B, T]
KV_SEGMENTS = "kv_seg"  # [B, S]
LEADING = "leading"  # [B|1, Hq|Hkv|1, ...] (layout lists, bias_k)
FREE = "free"  # no batch or head dim (tile pools, scalars)

_SHAPES = {
    Q: ("b", "t", "H", "d"),
    KV: ("b", "s", "h", "d"),
    LSE: ("b", "H", "t"),
    Q_SEGMENTS: ("b", "t"),
    KV_SEGMENTS: ("b", "s"),
}


@dataclasses.dataclass(frozen=True)
class Dims:
  """Global sizes the roles resolve against."""
  batch: int
  num_q_heads: int
  num_kv_heads: int

  @property
  def group(self) -> int:
    return self.num_q_heads // self.num_kv_heads


def _factors(role: str, shape: tuple[int, ...], dims: Dims,
             fresh: Callable[[], str]) -> list[str]:
  """Sharding-rule factors of one operand ("H" stands for the q heads)."""
  if role in _SHAPES:
    return list(_SHAPES[role])
  factors = [fresh() for _ in shape]
  if role == LEADING and len(shape) >= 2:
    if shape[0] == dims.batch and dims.batch > 1:
      factors[0] = "b"
    if shape[1] == dims.num_q_heads and dims.num_q_heads > 1:
      factors[1] = "H"
    elif shape[1] == dims.num_kv_heads and dims.num_kv_heads > 1:
      factors[1] = "h"
  return factors


def _rule(arg_roles, args, result_roles, results, dims: Dims):
  """(rule string, factor sizes, per-leaf factors of args and results)."""
  counter = iter(range(1 << 30))
  fresh = lambda: f"x{next(counter)}"
  q_heads = "(h g)" if dims.group > 1 else "h"

  def leaf_factors(roles, values):
    return [_factors(r, tuple(v.shape), dims, fresh)
            for r, v in zip(jax.tree.leaves(roles), jax.tree.leaves(values))]

  arg_factors = leaf_factors(arg_roles, args)
  result_factors = leaf_factors(result_roles, results)
  spell = lambda fs: " ".join(q_heads if f == "H" else f for f in fs)
  rule = (", ".join(spell(f) for f in arg_factors) + " -> "
          + ", ".join(spell(f) for f in result_factors))
  sizes = {"g": dims.group} if dims.group > 1 else {}
  return rule, sizes, arg_factors, result_factors


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _mesh_axes(q_sharding, kv_sharding, mesh, dims: Dims):
  """(batch axes, head axes) from q's sharding; raises on other shardings."""
  spec = tuple(q_sharding.spec) + (None,) * 4
  kv_spec = tuple(kv_sharding.spec) + (None,) * 4
  for name, entry, what in (("q", spec[1], "sequence axis T"),
                            ("k", kv_spec[1], "sequence axis S"),
                            ("q", spec[3], "head dim D")):
    if _axes(entry):
      raise ValueError(
          f"block_sparse_attention: {name} is sharded along its {what} over "
          f"mesh axis {_axes(entry)}; only the batch and head axes may be "
          "sharded (context parallelism is not supported yet)")
  batch, heads = _axes(spec[0]), _axes(spec[2])
  head_shards = 1
  for axis in heads:
    head_shards *= mesh.shape[axis]
  if dims.num_kv_heads % head_shards:
    raise ValueError(
        f"block_sparse_attention: heads are sharded {head_shards} ways over "
        f"mesh axes {heads}, which does not divide the Hkv="
        f"{dims.num_kv_heads} kv heads; shard heads by a divisor of Hkv")
  return batch, heads


def _spec(factors, batch, heads) -> P:
  def axes_of(f):
    if f == "b" and batch:
      return batch if len(batch) > 1 else batch[0]
    if f in ("h", "H") and heads:
      return heads if len(heads) > 1 else heads[0]
    return None
  return P(*(axes_of(f) for f in factors))


def _missing_axes(factors, batch, heads) -> tuple[str, ...]:
  """Mesh axes a result is replicated over although its inputs are split."""
  missing = () if "b" in factors else batch
  if not ({"h", "H"} & set(factors)):
    missing += heads
  return missing


@functools.partial(cp.custom_partitioning, static_argnums=(0, 1))
def _partitioned(fn, static, *args):
  del static
  return fn(*args)


def _batchable(fn, static, *args):
  """`_partitioned`, vmappable: custom_partitioning has no batching rule.

  Under vmap the backend call runs as `jax.vmap(fn)`, partitioned by XLA's
  own rules.
  """

  @custom_batching.custom_vmap
  def run(*args):
    return _partitioned(fn, static, *args)

  @run.def_vmap
  def _(axis_size, in_batched, *args):
    del axis_size
    in_axes = jax.tree.map(lambda batched: 0 if batched else None,
                           tuple(in_batched))
    results = jax.vmap(fn, in_axes=in_axes)(*args)
    return results, jax.tree.map(lambda _: True, results)

  return run(*args)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _differentiable(fn, static, *args):
  """`_batchable`, differentiable: custom_partitioning has no JVP rule.

  The derivative of a backend call (second-order derivatives of the op) is
  that of `fn` itself, partitioned by XLA's own rules.
  """
  return _batchable(fn, static, *args)


@_differentiable.defjvp
def _differentiable_jvp(fn, static, primals, tangents):
  del static
  return jax.jvp(fn, primals, tangents)


def _sharding_rule(fn, static, mesh, value_types, result_types):
  del fn, mesh, value_types, result_types
  return static.rule, static.sizes


def _reductions(static, batch, heads):
  """Per result leaf: the mesh axes its partial results are summed over."""
  return [_missing_axes(f, batch, heads) if role == LEADING else ()
          for f, role in zip(static.result_factors,
                             static.result_role_leaves)]


def _reduce(results, reduce_over):
  flat, tree = jax.tree.flatten(results)
  flat = [jax.lax.psum(x, axes) if axes else x
          for x, axes in zip(flat, reduce_over)]
  return jax.tree.unflatten(tree, flat)


def _partition(fn, static, mesh, arg_shapes, result_shape):
  leaves = jax.tree.leaves(arg_shapes)
  batch, heads = _mesh_axes(leaves[0].sharding, leaves[1].sharding, mesh,
                            static.dims)
  reduce_over = _reductions(static, batch, heads)
  named = lambda factors, tree: jax.tree.unflatten(
      jax.tree.structure(tree),
      [NamedSharding(mesh, _spec(f, batch, heads)) for f in factors])

  def lower_fn(*args):
    return _reduce(fn(*args), reduce_over)

  return (mesh, lower_fn, named(static.result_factors, result_shape),
          named(static.arg_factors, arg_shapes))


_partitioned.def_partition(partition=_partition,
                           sharding_rule=_sharding_rule)


@dataclasses.dataclass(frozen=True)
class _Static:
  rule: str
  sizes_items: tuple[tuple[str, int], ...]
  dims: Dims
  arg_factors: tuple[tuple[str, ...], ...]
  result_factors: tuple[tuple[str, ...], ...]
  result_role_tree: Any

  @property
  def sizes(self) -> dict[str, int]:
    return dict(self.sizes_items)

  @property
  def result_role_leaves(self) -> list[str]:
    return jax.tree.leaves(self.result_role_tree)


def layout_roles(layout):
  """Roles of a layout's leaves: lists lead with [Bl, Hl]; tile pools free."""
  roles = jax.tree.map(lambda _: LEADING, layout)
  if getattr(layout, "tiles", None) is not None:
    roles = dataclasses.replace(roles, tiles=FREE)
  return roles


def _explicit_sharding(x):
  """x's sharding when it is typed over Explicit mesh axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  return sharding


def _shard_map(fn, static, args):
  """Explicit axes: the shardings are in the types, so shard_map directly."""
  q, k = jax.tree.leaves(args)[:2]
  q_sharding, k_sharding = _explicit_sharding(q), _explicit_sharding(k)
  mesh = q_sharding.mesh
  batch, heads = _mesh_axes(q_sharding, k_sharding or q_sharding, mesh,
                            static.dims)
  in_specs = [_spec(f, batch, heads) for f in static.arg_factors]
  # Replicated operands (a shared layout, a broadcast bias) are sliced to
  # their shard locally; nothing is gathered.
  args = jax.tree.unflatten(jax.tree.structure(args), [
      jax.reshard(x, NamedSharding(mesh, spec))
      for x, spec in zip(jax.tree.leaves(args), in_specs)])
  in_specs = jax.tree.unflatten(jax.tree.structure(args), in_specs)
  result_tree = jax.tree.structure(static.result_role_tree)
  out_specs = jax.tree.unflatten(
      result_tree, [_spec(f, batch, heads) for f in static.result_factors])
  reduce_over = _reductions(static, batch, heads)

  def local(*args):
    return _reduce(fn(*args), reduce_over)

  return jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)(*args)


def _one_device() -> bool:
  """Whether the computation being traced runs on a single device.

  The context mesh decides when there is one (an abstract mesh for export
  has no devices, and custom_partitioning needs them); else the process's
  device count.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.size == 1
  return jax.device_count() == 1


def call(fn: Callable, args: tuple, arg_roles: Any, result_roles: Any,
         dims: Dims):
  """fn(*args), partitioned over the batch and head axes of the mesh.

  Auto mesh axes (shardings decided by XLA's propagation) go through
  custom_partitioning; Explicit axes (shardings in the types) through
  shard_map with the specs read from q and k.

  Args:
    fn: a hashable function of `args` (a module-level function or a
      functools.partial of one).
    args: the operands, a tuple of pytrees of arrays (None leaves allowed).
    arg_roles: the same structure as `args` with a role string per leaf.
    result_roles: the structure of fn's results with a role per leaf.
    dims: the global batch and head sizes.

  Returns:
    fn(*args); on a multi-device mesh each device computes its own shard.

  Raises:
    ValueError: when a sequence axis or the head dim is sharded, or the head
      sharding does not divide the kv heads.
  """
  if _one_device():
    return fn(*args)  # nothing to partition
  plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       args)
  traced, results = jax.make_jaxpr(fn, return_shape=True)(*plain)
  if traced.effects:
    # A call custom_partitioning cannot carry (the ordered callbacks of the
    # TPU interpreter): run it as it is.
    return fn(*args)
  rule, sizes, arg_factors, result_factors = _rule(
      arg_roles, args, result_roles, results, dims)
  static = _Static(rule, tuple(sorted(sizes.items())), dims,
                   tuple(map(tuple, arg_factors)),
                   tuple(map(tuple, result_factors)),
                   result_roles)
  if _explicit_sharding(jax.tree.leaves(args)[0]) is not None:
    return _shard_map(fn, static, args)
  return _differentiable(fn, static, *args)
