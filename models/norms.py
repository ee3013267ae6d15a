"""Norms that flax does not ship: Gemma's offset RMSNorm `x / rms(x) * (1 + w)` and the gated
RMSNorm of Gated DeltaNet layers `x / rms(x) * w * silu(z)`.

Both are built like `nnx.RMSNorm` (`(features, *, epsilon, dtype, param_dtype, rngs)`), so
`models/choices.py` lists the offset one next to flax's norms (the gated one also takes the gate
`z` and is used by `models.gdn` only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float


class OffsetRMSNorm(nnx.Module):
  """`y = x / sqrt(mean(x^2) + eps) * (1 + w)` over the last axis, all in float32, then cast to
  `dtype` (Gemma 2 / 3: the scale `w` starts at 0, so a fresh norm is the identity scale)."""

  def __init__(self, features: int, *, epsilon: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init
    self.scale = nnx.Param(jnp.zeros((features,), param_dtype))
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x: Float[Array, "*B F"]) -> Float[Array, "*B F"]:
    x = x.astype(jnp.float32)
    y = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class GatedRMSNorm(nnx.Module):
  """Qwen3-Next's gated RMSNorm (`RMSNormGated`): `y = x / sqrt(mean(x^2) + eps) * w * silu(z)`
  over the last axis, float32 inside, then cast to `dtype`; `w` starts at 1."""

  def __init__(self, features: int, *, epsilon: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x: Float[Array, "*B F"], z: Float[Array, "*B F"]) -> Float[Array, "*B F"]:
    x = x.astype(jnp.float32)
    y = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    gate = jax.nn.silu(z.astype(jnp.float32))
    return (y * self.scale[...].astype(jnp.float32) * gate).astype(self.dtype)
