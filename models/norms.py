"""Norms that flax does not ship: Gemma's offset RMSNorm `x / rms(x) * (1 + w)`.

Built like `nnx.RMSNorm` (`(features, *, epsilon, dtype, param_dtype, rngs)`), so
`models/choices.py` lists it next to flax's norms.
"""

from __future__ import annotations

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
