"""Tile sizes for blockwise attention, shared by the XLA path and the Pallas kernels.

A frozen (hashable) dataclass, passed as a static argument. Invalid sizes raise a `ValueError`
that says what is allowed, before anything is traced.

Pallas (Triton) kernels and their tiles (rows of the "resident" block a program keeps in
registers x rows of the "streamed" block its inner loop loads per step):

| kernel | grid                    | resident tile  | streamed tile  |
|--------|-------------------------|----------------|----------------|
| fwd    | q blocks x B x N        | `block_q`      | `block_kv`     |
| dK/dV  | kv blocks x B x K       | `block_kv_bwd` | `block_q_bwd`  |
| dQ     | q blocks x B x N        | `block_q_dq`   | `block_kv_dq`  |

Shared memory (`BlockSizes.shared_memory_bytes`), per program, in bytes of the input dtype:

    fwd    item * H * (block_q      + stages * 2 * block_kv)      q + pipelined (k, v)
    dK/dV  item * H * (2 * block_kv_bwd + stages * 2 * block_q_bwd)   k, v + (q, dout)
    dQ     item * H * (2 * block_q_dq   + stages * 2 * block_kv_dq)   q, dout + (k, v)

with `stages` = `num_stages` (3 for the bf16/f16 forward at H <= 128, else 2). The estimate
leaves out Triton's scratch (layout conversions; and float32 wgmma cannot transpose its B
operand, so Triton may keep a transposed copy of the V tile), so the defaults stay within a
196 KiB budget (`DEFAULT_SHARED_MEMORY_BUDGET`, ~30 KiB headroom under the 227 KiB a block may
use); explicit sizes are rejected only past 227 KiB. E.g. head_dim 128 forward: bf16 128x64,
3 stages = 2 * 128 * (128 + 384) = 128 KiB; float32 128x64, 2 stages = 4 * 128 * (128 + 256)
= 192 KiB (3 stages of 64x64 would be 224 KiB: too close to the limit).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Pallas/Triton tiles must be at least this big (tl.dot needs 16x16 operands).
MIN_PALLAS_BLOCK = 16
# Shared memory per block on H100/H200 (228 KiB per SM, 227 KiB usable by one block).
MAX_SHARED_MEMORY_BYTES = 227 * 1024
# What the default tiles may use by the estimate below (headroom for Triton's own scratch).
DEFAULT_SHARED_MEMORY_BUDGET = 196 * 1024


def _is_pow2(x: int) -> bool:
  return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key tile sizes for the forward and backward passes, plus Triton launch settings.

  Attributes:
    block_q, block_kv: forward tiles (queries per program, keys per inner step).
    block_q_bwd, block_kv_bwd: backward tiles (the dK/dV pass: `block_kv_bwd` keys resident,
      `block_q_bwd` queries per inner step; the XLA backward uses the same two, its banded
      path for narrow windows `block_q_bwd` as its q tile).
    block_q_dq, block_kv_dq: tiles of the Pallas dQ pass; None mirrors dK/dV (the resident q
      tile is `block_kv_bwd`, the streamed kv tile `block_q_bwd`).
    num_warps, num_stages: Triton launch parameters (ignored by the XLA path); None lets each
      kernel pick (`pallas_launch`).
    allow_tf32: Pallas only (the XLA path refuses it): float32 inputs multiply in TF32 on tensor
      cores (~1e-3 relative error) instead of the kernels' default exact float32 (Triton
      `inputPrecision = ieee`); bf16/f16 inputs are unaffected.
  """

  block_q: int = 512
  block_kv: int = 512
  block_q_bwd: int = 512
  block_kv_bwd: int = 512
  num_warps: int | None = None
  num_stages: int | None = None
  block_q_dq: int | None = None
  block_kv_dq: int | None = None
  allow_tf32: bool = False

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd", "block_q_dq",
                 "block_kv_dq"):
      value = getattr(self, name)
      if value is None and name.endswith("_dq"):
        continue
      if not _is_pow2(value):
        raise ValueError(f"BlockSizes.{name} must be a positive power of two, got {value!r}.")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"BlockSizes.{name} must be a positive int or None, got {value!r}.")
    if not isinstance(self.allow_tf32, bool):
      raise ValueError(f"BlockSizes.allow_tf32 must be a bool, got {self.allow_tf32!r}.")
    if self.num_warps is not None and not _is_pow2(self.num_warps):
      raise ValueError(f"BlockSizes.num_warps must be a power of two, got {self.num_warps}.")

  @classmethod
  def default_xla(cls, head_dim: int, window: tuple[int, int] | None = None) -> "BlockSizes":
    """CPU/XLA tiles: large enough that each step is a few-MFLOP matmul, small enough for L2.

    With a sliding window, tiles shrink towards the window width (not below 128), so a q tile
    visits about `window + tile` keys rather than `window + 1024`.
    """
    del head_dim
    block = 512
    if window is not None:
      width = window[0] + window[1] + 1
      block = min(block, max(128, 1 << (width - 1).bit_length()))
    return cls(block_q=block, block_kv=block, block_q_bwd=block, block_kv_bwd=block)

  # --- Pallas (Triton) tiles ---------------------------------------------------------------------

  @property
  def dq_tiles(self) -> tuple[int, int]:
    """`(block_q, block_kv)` of the dQ kernel (None fields mirror the dK/dV tiles)."""
    return (self.block_q_dq or self.block_kv_bwd, self.block_kv_dq or self.block_q_bwd)

  @classmethod
  def default_pallas(cls, head_dim: int, dtype=np.float32,
                     allow_tf32: bool = False) -> "BlockSizes":
    """Triton tiles for H100/H200-class GPUs, per head_dim; shrunk until the shared-memory
    estimate fits `DEFAULT_SHARED_MEMORY_BUDGET` (196 KiB). `allow_tf32`: see the class doc.

    Forward 128x64 (64x32 at head_dim 256); backward: a 128-row resident tile (dK/dV keys, dQ
    queries) against 32-row streamed steps (FlashAttention-2's Triton split), 64 rows at 256.
    """
    head_dim = padded_head_dim(head_dim)
    if head_dim <= 128:
      sizes = cls(block_q=128, block_kv=64, block_q_bwd=32, block_kv_bwd=128,
                  block_q_dq=128, block_kv_dq=32, allow_tf32=allow_tf32)
    else:
      sizes = cls(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=64,
                  block_q_dq=64, block_kv_dq=32, allow_tf32=allow_tf32)
    tiles = {"fwd": ("block_q", "block_kv"), "dkdv": ("block_kv_bwd", "block_q_bwd"),
             "dq": ("block_q_dq", "block_kv_dq")}
    for kernel, names in tiles.items():  # halve the larger tile of a kernel until it fits
      while (sizes.shared_memory_bytes(head_dim, dtype)[kernel] > DEFAULT_SHARED_MEMORY_BUDGET
             and max(getattr(sizes, n) for n in names) > MIN_PALLAS_BLOCK):
        largest = max(names, key=lambda n: getattr(sizes, n))
        sizes = dataclasses.replace(sizes, **{largest: getattr(sizes, largest) // 2})
    return sizes

  def pallas_launch(self, kernel: str, head_dim: int, dtype) -> tuple[int, int]:
    """`(num_warps, num_stages)` for kernel "fwd" | "dkdv" | "dq" (explicit fields win).

    Heuristic: 8 warps once the resident f32 accumulators pass 64 registers per thread at 4
    warps (tile rows x head_dim > 64 x 128), else 4; 3 pipeline stages for the 16-bit forward
    at head_dim <= 128, else 2 (float32 tiles are twice the bytes: module doc).
    """
    resident = {"fwd": self.block_q, "dkdv": self.block_kv_bwd, "dq": self.dq_tiles[0]}[kernel]
    accumulators = 2 if kernel == "dkdv" else 1
    warps = 8 if resident * padded_head_dim(head_dim) * accumulators > 64 * 128 else 4
    small = np.dtype(dtype).itemsize <= 2 and padded_head_dim(head_dim) <= 128
    stages = 3 if kernel == "fwd" and small else 2
    return (self.num_warps or warps, self.num_stages or stages)

  def shared_memory_bytes(self, head_dim: int, dtype) -> dict[str, int]:
    """Estimated shared memory per kernel: resident tiles + `num_stages` buffers of streamed ones.

    fwd: q + stages x (k, v); dK/dV: k, v + stages x (q, dout); dQ: q, dout + stages x (k, v).
    An estimate (Triton may add layout-conversion scratch), used to reject tiles early.
    """
    h, item = padded_head_dim(head_dim), np.dtype(dtype).itemsize
    q_dq, kv_dq = self.dq_tiles
    out = {}
    for kernel, resident, streamed, n_resident in (
        ("fwd", self.block_q, self.block_kv, 1),
        ("dkdv", self.block_kv_bwd, self.block_q_bwd, 2),
        ("dq", q_dq, kv_dq, 2)):
      stages = self.pallas_launch(kernel, head_dim, dtype)[1]
      out[kernel] = item * h * (n_resident * resident + stages * 2 * streamed)
    return out

  def validate_pallas(self, head_dim: int, dtype) -> "BlockSizes":
    """Raises ValueError unless every tile is >= 16 and each kernel fits in shared memory."""
    names = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd", "block_q_dq", "block_kv_dq")
    for name in names:
      value = getattr(self, name)
      if value is not None and value < MIN_PALLAS_BLOCK:
        raise ValueError(f"BlockSizes.{name} = {value}: Pallas/Triton tiles must be powers of two "
                         f">= {MIN_PALLAS_BLOCK} (tl.dot needs 16x16 operands).")
    for kernel, size in self.shared_memory_bytes(head_dim, dtype).items():
      if size > MAX_SHARED_MEMORY_BYTES:
        raise ValueError(
            f"BlockSizes {self} need ~{size // 1024} KiB of shared memory in the {kernel} kernel "
            f"(head_dim {head_dim}, {np.dtype(dtype).name}), more than the "
            f"{MAX_SHARED_MEMORY_BYTES // 1024} KiB a GPU block may use; use smaller tiles or "
            f"fewer num_stages (BlockSizes.default_pallas(head_dim, dtype) always fits).")
    return self


def padded_head_dim(head_dim: int) -> int:
  """Kernels pad head_dim to a power of two >= 16 (Triton tensors are power-of-two shaped)."""
  return max(MIN_PALLAS_BLOCK, 1 << max(0, int(head_dim) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SparseBlockSizes:
  """Tiles of top-k gather attention (`sparse_attention`); None = the implementation's default.

  Attributes:
    block_q: queries per step of the XLA path (bounds its gathered `[B, bq, k, K, H]` rows);
      default 16. The Pallas kernels run one program per query and refuse it.
    block_k: selected slots per inner step of the Pallas kernels (a power of two); default 64.
      The XLA path takes all slots of a query at once and refuses it.
  """

  block_q: int | None = None
  block_k: int | None = None

  def __post_init__(self):
    if self.block_q is not None and (not isinstance(self.block_q, int) or self.block_q < 1):
      raise ValueError(f"SparseBlockSizes.block_q must be a positive int or None, got "
                       f"{self.block_q!r}.")
    if self.block_k is not None and not _is_pow2(self.block_k):
      raise ValueError(f"SparseBlockSizes.block_k must be a positive power of two or None, got "
                       f"{self.block_k!r}.")

  def only(self, implementation: str, allowed: str) -> "SparseBlockSizes":
    """Raises ValueError if a field other than `allowed` is set (nothing is silently ignored)."""
    for name in ("block_q", "block_k"):
      if name != allowed and getattr(self, name) is not None:
        raise ValueError(f"SparseBlockSizes.{name} is not used by the {implementation!r} sparse "
                         f"path (it takes only {allowed}); got {getattr(self, name)!r}.")
    return self


@dataclasses.dataclass(frozen=True)
class GatedDeltaBlockSizes:
  """Tiles of the chunkwise gated delta rule (`attention.gated_delta_rule`).

  Attributes:
    chunk_size: tokens per chunk C (a power of two; the Pallas kernels take 16..64): intra-chunk
      work is O(T C d), the chunk-to-chunk state recurrence O(T d^2 / C) sequential steps.
    block_v: Pallas only (the XLA path refuses it): value columns of the state per program (a
      power of two, 16..128). The state's columns evolve independently, so the kernels run one
      program per (v block, batch row, v head); None = `min(64, padded dv)`.
    num_warps, num_stages: Triton launch parameters (Pallas only); None = 4 warps, 2 stages.
  """

  chunk_size: int = 64
  block_v: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    if not _is_pow2(self.chunk_size):
      raise ValueError(f"GatedDeltaBlockSizes.chunk_size must be a positive power of two, got "
                       f"{self.chunk_size!r}.")
    if self.block_v is not None and not _is_pow2(self.block_v):
      raise ValueError(f"GatedDeltaBlockSizes.block_v must be a positive power of two or None, "
                       f"got {self.block_v!r}.")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"GatedDeltaBlockSizes.{name} must be a positive int or None, got "
                         f"{value!r}.")

  def validate_xla(self) -> "GatedDeltaBlockSizes":
    """Raises ValueError if a Pallas-only field is set (nothing is silently ignored)."""
    for name in ("block_v", "num_warps", "num_stages"):
      if getattr(self, name) is not None:
        raise ValueError(f"GatedDeltaBlockSizes.{name} is used only by the Pallas kernels; the "
                         f"'xla' gated delta path takes only chunk_size (got {name}="
                         f"{getattr(self, name)!r}).")
    return self

  def validate_pallas(self, key_dim: int, value_dim: int) -> "GatedDeltaBlockSizes":
    """Resolves `block_v` for head dims `(dk, dv)` and checks every tile (ValueError)."""
    dk, dv = padded_head_dim(key_dim), padded_head_dim(value_dim)
    if not MIN_PALLAS_BLOCK <= self.chunk_size <= 64:
      raise ValueError(f"GatedDeltaBlockSizes.chunk_size = {self.chunk_size}: the Pallas kernels "
                       f"take 16, 32 or 64 (tl.dot needs >= 16; a C x C float32 tile per "
                       f"matrix stays in registers).")
    if dk > 256 or dv > 256:
      raise ValueError(f"Pallas gated delta rule: head dims up to 256, got dk = {key_dim}, "
                       f"dv = {value_dim} (the [dk, block_v] float32 state stays in registers).")
    block_v = self.block_v if self.block_v is not None else min(64, dv)
    if not MIN_PALLAS_BLOCK <= block_v <= min(128, dv):
      raise ValueError(f"GatedDeltaBlockSizes.block_v = {block_v}: must be a power of two in "
                       f"[{MIN_PALLAS_BLOCK}, {min(128, dv)}] (padded dv = {dv}, at most 128).")
    return dataclasses.replace(self, block_v=block_v, num_warps=self.num_warps or 4,
                               num_stages=self.num_stages or 2)


@dataclasses.dataclass(frozen=True)
class BlockSparseBlockSizes:
  """Tiles of block-sparse attention (`block_sparse_attention`); None = the default.

  (The key block itself, `block_size`, is an argument of the attention, not a tile.)

  Attributes:
    block_entries: queries per step of the XLA path (a chunk of the queries that selected one
      key block: its matrix products have `block_entries * G` rows); default 64. The Pallas
      kernels refuse it.
    block_rows: (query, head) rows per inner step of the Pallas dK/dV kernel (a power of two
      >= 16, the tensor-core minimum); default 32. The XLA path refuses it.
  """

  block_entries: int | None = None
  block_rows: int | None = None

  def __post_init__(self):
    if self.block_entries is not None and (not isinstance(self.block_entries, int)
                                           or self.block_entries < 1):
      raise ValueError(f"BlockSparseBlockSizes.block_entries must be a positive int or None, "
                       f"got {self.block_entries!r}.")
    if self.block_rows is not None and (not _is_pow2(self.block_rows)
                                        or self.block_rows < MIN_PALLAS_BLOCK):
      raise ValueError(f"BlockSparseBlockSizes.block_rows must be a power of two >= "
                       f"{MIN_PALLAS_BLOCK} or None, got {self.block_rows!r}.")

  def only(self, implementation: str, allowed: str) -> "BlockSparseBlockSizes":
    """Raises ValueError if a field other than `allowed` is set (nothing is silently ignored)."""
    for name in ("block_entries", "block_rows"):
      if name != allowed and getattr(self, name) is not None:
        raise ValueError(f"BlockSparseBlockSizes.{name} is not used by the {implementation!r} "
                         f"block-sparse path (it takes only {allowed}); got "
                         f"{getattr(self, name)!r}.")
    return self
