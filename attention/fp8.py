"""FP8 for the DSA lightning indexer: block-wise float8_e4m3fn quantisation, Hadamard rotation.

As DeepSeek-V3.2-Exp's inference code (`act_quant`, `rotate_activation`; shared/specs/dsa.md):

* `quantize_fp8(x, block=128)`: one float32 scale per `block` consecutive elements of the last
  axis, `scale = absmax(block) / 448` (448 = largest finite float8_e4m3fn), optionally rounded
  up to a power of two (`pow2=True`, DeepSeek's "ue8m0" scales); `x ~= values * scale` per
  block. A large block cannot flush a small one: each block has its own scale.
* `hadamard(x)`: the normalised fast Walsh-Hadamard transform of the last axis (Sylvester order,
  scale d^-0.5, so it is orthogonal and its own inverse). Rotating q_I and k_I before FP8 leaves
  q . k unchanged in exact arithmetic and spreads outlier channels over all dims.

`Fp8Format` is the static choice (block, pow2) the indexer functions take; `Quantized` is a
pytree of FP8 values and their scales (the DSA decode cache stores indexer keys this way).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = 128  # DeepSeek's block along the last axis


@dataclasses.dataclass(frozen=True)
class Fp8Format:
  """How to quantise: `block` elements of the last axis per float32 scale (None: the whole
  axis, capped at DEFAULT_BLOCK, see `resolve`); `pow2`: scales rounded up to powers of two."""

  block: int | None = DEFAULT_BLOCK
  pow2: bool = False

  def __post_init__(self):
    if self.block is not None and (not isinstance(self.block, int) or isinstance(
        self.block, bool) or self.block < 1):
      raise ValueError(f"FP8 block must be a positive int or None, got {self.block!r}.")
    if not isinstance(self.pow2, bool):
      raise ValueError(f"FP8 pow2 must be a bool, got {self.pow2!r}.")

  def block_for(self, dim: int) -> int:
    """The block used on a last axis of `dim` elements; ValueError if it does not divide."""
    block = min(dim, DEFAULT_BLOCK) if self.block is None else self.block
    if dim % block:
      raise ValueError(f"FP8 block {block} must divide the last axis (d_I = {dim}); use a "
                       f"divisor of {dim}.")
    return block


def resolve(fp8: "bool | Fp8Format | None") -> Fp8Format | None:
  """`False -> None` (float32 path); `True -> Fp8Format(block=None)` (one scale per
  min(d, 128) elements, DeepSeek's layout at d = 128); a format passes through."""
  if isinstance(fp8, Fp8Format):
    return fp8
  if fp8 is True:
    return Fp8Format(block=None)
  if fp8 is False or fp8 is None:
    return None
  raise ValueError(f"fp8 must be a bool or an Fp8Format, got {fp8!r}.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
  """FP8 values `[..., D]` and float32 scales `[..., D / block]`: `x ~= values * scale`."""

  values: Any  # float8_e4m3fn [..., D] (untyped: pytree transforms rebuild it with other leaves)
  scale: Any  # float32 [..., C]

  @property
  def shape(self):
    return self.values.shape

  def dequantize(self) -> Float[Array, "... D"]:
    *lead, d = self.values.shape
    c = self.scale.shape[-1]
    x = self.values.astype(jnp.float32).reshape(*lead, c, d // c) * self.scale[..., None]
    return x.reshape(*lead, d)


def _check_float(x, what: str):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(f"{what} needs a floating-point input, got dtype {jnp.asarray(x).dtype}.")


def quantize_fp8(x: Shaped[Array, "... D"], block: int = DEFAULT_BLOCK, *,
                 pow2: bool = False) -> Quantized:
  """float8_e4m3fn values with one float32 scale per `block` elements of the last axis.

  `scale = absmax / 448` per block (1.0 for an all-zero block), rounded up to a power of two
  with `pow2` (then |x / scale| <= 448 still holds). Returns `Quantized(values [..., D],
  scale [..., D / block])`. O(size). ValueError for a non-float `x` or a block not dividing D.
  """
  _check_float(x, "quantize_fp8")
  Fp8Format(block, pow2)  # validates the arguments
  *lead, d = jnp.shape(x)
  if d % block:
    raise ValueError(f"quantize_fp8: block {block} must divide the last axis {d}.")
  xb = jnp.asarray(x, jnp.float32).reshape(*lead, d // block, block)  # ... C block
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  scale = jnp.where(absmax > 0, absmax / FP8_MAX, 1.0)
  if pow2:
    scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
  values = (xb / scale[..., None]).astype(FP8_DTYPE).reshape(*lead, d)
  return Quantized(values, scale)


def quantize(x: Shaped[Array, "... D"], fmt: Fp8Format) -> Quantized:
  """`quantize_fp8` with the block and pow2 of `fmt` (block resolved against D)."""
  return quantize_fp8(x, fmt.block_for(jnp.shape(x)[-1]), pow2=fmt.pow2)


def dot_operand(values: Array) -> Array:
  """float8 values as a matmul operand: bfloat16 on CPU, where XLA has no float8 matmul (it
  would convert to float32 first: 2x slower than float32 inputs) but a fast bfloat16 one with
  float32 accumulation; every float8_e4m3fn value is exact in bfloat16, so the products and
  float32 sums are those of float8 inputs. Elsewhere the float8 values as they are."""
  if jax.default_backend() == "cpu":
    return values.astype(jnp.bfloat16)
  return values


def hadamard(x: Shaped[Array, "... D"]) -> Float[Array, "... D"]:
  """Normalised fast Walsh-Hadamard transform of the last axis: `x @ H_D / sqrt(D)`.

  `H_D` is Sylvester's matrix (`H_2n = [[H_n, H_n], [H_n, -H_n]]`, as scipy.linalg.hadamard and
  DeepSeek's `hadamard_transform`); the transform is orthogonal and symmetric (its own inverse).
  log2(D) butterfly stages, each a reshape to `[..., D / 2h, 2, h]` and one add/subtract:
  O(D log D) per vector, computed in x's dtype (at least float32). D must be a power of two.
  """
  _check_float(x, "hadamard")
  *lead, d = jnp.shape(x)
  if d < 1 or d & (d - 1):
    raise ValueError(f"hadamard needs the last axis to be a power of two, got {d}.")
  y = jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))
  h = 1
  while h < d:
    y = y.reshape(*lead, d // (2 * h), 2, h)  # ... pairs 2 h
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return (y.reshape(*lead, d) * np.float32(d ** -0.5)).astype(jnp.asarray(x).dtype)
