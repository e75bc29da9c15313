"""Block sizes and launch parameters of the Pallas backends.

One frozen dataclass per backend, each with `get_default()`. Tuned values are
keyed by shape buckets (never exact shapes).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp


# -- Triton (GPU) -------------------------------------------------------------

TRITON_TUNED_PATH = pathlib.Path(__file__).with_name("triton_tuned.json")


def _is_pow2_at_least_16(n: int) -> bool:
  return n >= 16 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch parameters of the Triton kernels of block_sparse_attention.

  The layout fixes the block granularity. Each kernel program owns a slab of
  one layout block (rows of a query block for the forward and dQ kernels,
  keys of a kv block for dK/dV) and walks its listed blocks in chunks. Slabs
  and chunks are clamped to the layout's block sizes (both are powers of two,
  so the clamped size divides the block).

  Attributes:
    block_q: forward query rows per program.
    block_kv: forward kv chunk per inner step.
    num_warps: forward warps per program.
    num_stages: forward software-pipelining stages.
    dq_block_q: dQ kernel query rows per program.
    dq_block_kv: dQ kernel kv chunk per inner step.
    dkv_block_kv: dK/dV kernel keys per program.
    dkv_block_q: dK/dV kernel query chunk per inner step.
    bwd_num_warps: warps of both backward kernels.
    bwd_num_stages: pipelining stages of both backward kernels.
  """

  block_q: int = 128
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  dq_block_q: int = 64
  dq_block_kv: int = 64
  dkv_block_kv: int = 64
  dkv_block_q: int = 64
  bwd_num_warps: int = 4
  bwd_num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_kv", "dq_block_q", "dq_block_kv",
                 "dkv_block_kv", "dkv_block_q"):
      value = getattr(self, name)
      if not _is_pow2_at_least_16(value):
        raise ValueError(
            f"TritonConfig.{name} must be a power of two >= 16, got {value}")
    for name in ("num_warps", "bwd_num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(
            f"TritonConfig.{name} must be a power of two, got {value}")
    for name in ("num_stages", "bwd_num_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"TritonConfig.{name} must be >= 1")

  @classmethod
  def get_default(cls) -> TritonConfig:
    return cls()

  @staticmethod
  def bucket(head_dim: int, dtype) -> str:
    """Shape bucket key, e.g. "bfloat16/d128" (head dims round up)."""
    dim = next((b for b in (32, 64, 128) if head_dim <= b), 256)
    return f"{jnp.dtype(dtype).name}/d{dim}"

  @classmethod
  def heuristic(cls, head_dim: int, dtype, device_kind: str | None = None,
                table_path: pathlib.Path | None = None) -> TritonConfig:
    """Tuned config of the shape bucket on `device_kind`, else a rule.

    Args:
      head_dim: D of q, k and v.
      dtype: dtype of q, k and v.
      device_kind: `jax.Device.device_kind`; None skips the tuned table.
      table_path: JSON written by eval/autotune_triton.py, mapping
        device_kind -> bucket -> TritonConfig fields. Default:
        `TRITON_TUNED_PATH`.
    """
    key = cls.bucket(head_dim, dtype)
    path = TRITON_TUNED_PATH if table_path is None else table_path
    if device_kind is not None and path.exists():
      tuned = json.loads(path.read_text()).get(device_kind, {}).get(key)
      if tuned is not None:
        return cls(**tuned)
    wide = jnp.dtype(dtype).itemsize >= 4
    if head_dim > 128:
      return cls(block_q=64, block_kv=32, num_warps=8, num_stages=1,
                 dq_block_q=32, dq_block_kv=32, dkv_block_kv=32,
                 dkv_block_q=32, bwd_num_warps=8, bwd_num_stages=1)
    if head_dim > 64:
      # bf16/f16: 128 x 128 forward tiles, so a 128-wide layout block is one
      # loop step (unverified on a GPU; eval/autotune_triton.py tries it).
      return cls(block_kv=32 if wide else 128, num_warps=8,
                 dq_block_kv=32 if wide else 64, bwd_num_warps=8,
                 bwd_num_stages=1 if wide else 2)
    return cls(num_stages=2 if wide else 3)


# -- Mosaic (TPU) --------------------------------------------------------------

# VMEM per TensorCore of TPU v4 and v4i, the smallest from v4 on.
MIN_TPU_VMEM_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class MosaicTpuConfig:
  """Launch parameters of the Mosaic TPU kernels of block_sparse_attention.

  The layout fixes the DMA granularity (block_q x block_kv; 512-1024 is the
  sweet spot on TPU). Inside a resident kv block the kernels compute on
  sub-tiles of `block_kv_compute` keys, which bounds the f32 logits tile
  [block_q, block_kv_compute] held in vregs/VMEM.

  Default compute tile per head dim (clamped to a divisor of block_kv):

  | head dim | block_kv_compute |
  |----------|------------------|
  | <= 128   | 512              |
  | 256      | 256              |

  Attributes:
    block_kv_compute: keys per compute sub-tile; must divide the layout's
      block_kv (and be a multiple of 128 on hardware). None: the table above.
    smem_budget_bytes: SMEM allowed for one launch's scalar-prefetched block
      lists. TPU v4 and later have 1 MiB of SMEM per core; a quarter is left
      to Mosaic's own scalars and semaphores. Larger layouts are split over
      batch / kv-head slices.
    vmem_limit_bytes: scoped VMEM limit for Mosaic; must not exceed the
      chip's VMEM per TensorCore. None: `vmem_limit` derives it from the
      chip generation.
  """

  block_kv_compute: int | None = None
  smem_budget_bytes: int = 768 * 1024
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    if self.block_kv_compute is not None and self.block_kv_compute < 1:
      raise ValueError(
          "MosaicTpuConfig.block_kv_compute must be >= 1, got "
          f"{self.block_kv_compute}")
    if self.smem_budget_bytes < 1:
      raise ValueError("MosaicTpuConfig.smem_budget_bytes must be >= 1")
    if self.vmem_limit_bytes is not None and self.vmem_limit_bytes < 1:
      raise ValueError("MosaicTpuConfig.vmem_limit_bytes must be >= 1")

  @classmethod
  def get_default(cls) -> MosaicTpuConfig:
    return cls()

  def vmem_limit(self, vmem_capacity_bytes: int | None) -> int:
    """Scoped VMEM limit for a chip with that much VMEM per TensorCore.

    Without `vmem_limit_bytes`, three quarters of the chip's VMEM (a
    quarter is headroom for Mosaic's internal scratch): 12 MiB on v4, 48 MiB
    on v5p and v7x, 96 MiB on v5e and v6e.

    Args:
      vmem_capacity_bytes: `pltpu.get_tpu_info().vmem_capacity_bytes` of
        the target chip; None when it is unknown (interpret mode, or export
        from a non-TPU host without an abstract TPU mesh), which assumes the
        smallest VMEM of the supported chips (v4 and v4i: 16 MiB).

    Raises:
      ValueError: if `vmem_limit_bytes` exceeds the chip's VMEM.
    """
    capacity = (MIN_TPU_VMEM_BYTES if vmem_capacity_bytes is None
                else vmem_capacity_bytes)
    if self.vmem_limit_bytes is None:
      return capacity // 4 * 3
    if self.vmem_limit_bytes > capacity:
      raise ValueError(
          f"MosaicTpuConfig.vmem_limit_bytes={self.vmem_limit_bytes} exceeds "
          f"the target TPU's VMEM of {capacity} bytes per TensorCore")
    return self.vmem_limit_bytes

  def kv_compute_tile(self, block_kv: int, head_dim: int) -> int:
    """The compute sub-tile for a layout block_kv and head dim."""
    if self.block_kv_compute is not None:
      return self.block_kv_compute
    # The largest power-of-two divisor of block_kv up to the table's value.
    tile = 512 if head_dim <= 128 else 256
    while block_kv % tile:
      tile //= 2
    return tile
