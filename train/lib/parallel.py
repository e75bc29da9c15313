"""Multi-host runtime, device mesh and shardings (JAX's own machinery only)."""

from __future__ import annotations

import os

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

# Batch axes: the batch is split over data and fsdp devices alike.
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under FSDP.
_MIN_FSDP_SIZE = 2**14


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts jax.distributed when running on several hosts.

  With a coordinator address, initializes explicitly (CPU/GPU clusters;
  gloo collectives on CPU). Without one, initializes with auto-detection on
  multi-host TPU slices (TPU_WORKER_HOSTNAMES lists several hosts) and on
  SLURM/Open MPI jobs of more than one task; single-host runs stay local.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=120)
    return
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  tasks = max(int(os.environ.get("SLURM_NTASKS", "1")),
              int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
  if "," in tpu_hosts or tasks > 1:
    jax.distributed.initialize()


def make_mesh(fsdp: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all global devices, Auto axis types.

  Args:
    fsdp: devices sharding the parameters (1: pure data parallel, params
      replicated); must divide the device count.
  """
  n = jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the {n} devices")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"),
                       axis_types=(auto, auto))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Replicated, or the largest axis divisible by `fsdp` sharded on fsdp."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_FSDP_SIZE:
    return P()
  axes = [i for i in np.argsort(shape)[::-1] if shape[i] % fsdp == 0]
  if not axes:
    return P()
  spec = [None] * len(shape)
  spec[axes[0]] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
  """NamedShardings for a (abstract) state pytree under `param_spec`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)),
      abstract_state)


def global_batch(local: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """The global array whose process-local slice is `local` [b, ...]."""
  sharding = batch_sharding(mesh)
  shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local, shape)
