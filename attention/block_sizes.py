"""Tile sizes for blockwise attention, shared by the XLA path and the Pallas kernels.

A frozen (hashable) dataclass, passed as a static argument. Invalid sizes raise a `ValueError`
that says what is allowed, before anything is traced.
"""

from __future__ import annotations

import dataclasses

# Pallas/Triton tiles must be at least this big (tl.dot needs 16x16 operands).
MIN_PALLAS_BLOCK = 16
# Shared memory per block on H100/H200 (228 KiB per SM, 227 KiB usable by one block).
MAX_SHARED_MEMORY_BYTES = 227 * 1024


def _is_pow2(x: int) -> bool:
  return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key tile sizes for the forward and backward passes, plus Triton launch settings.

  Attributes:
    block_q, block_kv: forward tiles (queries per program, keys per inner step).
    block_q_bwd, block_kv_bwd: backward tiles (dK/dV and dQ passes).
    num_warps, num_stages: Triton launch parameters (ignored by the XLA path).
  """

  block_q: int = 512
  block_kv: int = 512
  block_q_bwd: int = 512
  block_kv_bwd: int = 512
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
      value = getattr(self, name)
      if not _is_pow2(value):
        raise ValueError(f"BlockSizes.{name} must be a positive power of two, got {value!r}.")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"BlockSizes.{name} must be a positive int or None, got {value!r}.")
    if self.num_warps is not None and not _is_pow2(self.num_warps):
      raise ValueError(f"BlockSizes.num_warps must be a power of two, got {self.num_warps}.")

  @classmethod
  def default_xla(cls, head_dim: int) -> "BlockSizes":
    """CPU/XLA tiles: large enough that each step is a few-MFLOP matmul, small enough for L2."""
    del head_dim
    return cls(block_q=512, block_kv=512, block_q_bwd=512, block_kv_bwd=512)
