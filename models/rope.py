"""Rotary position embeddings with context-extension scalings: none, linear (PI), ntk, yarn.

Notation as in shared/specs/rope_scaling.md: head dim D, base b, inverse frequencies
`theta_d = b^(-2d/D)` for `d = 0 .. D/2 - 1`, wavelengths `lambda_d = 2 pi / theta_d`, original
trained length L, scale `s = factor = L' / L`.

* `none`   -> `theta_d`.
* `linear` -> `theta_d / s` (position interpolation: position m acts as m / s).
* `ntk`    -> base `b' = b * s^(D / (D - 2))` (NTK-aware), no interpolation.
* `yarn`   -> `r_d = L / lambda_d`, ramp `gamma = clip((r - alpha) / (beta - alpha), 0, 1)`,
              `theta'_d = (1 - gamma) theta_d / s + gamma theta_d` (alpha = 1, beta = 32), and
              q and k are both multiplied by `sqrt(1/t) = 0.1 ln(s) + 1` (attention temperature).
              The ramp bounds are fields (`yarn_alpha`, `yarn_beta`): the paper's 1 / 32 were
              chosen for Llama (L = 4096, D = 128); at a tiny L and D they leave no pair kept.

Rotation pairs dimension `d` with `d + D/2` (the "rotate half" layout). Positions are arbitrary
ints: packed documents restart at 0, decoding uses absolute positions. Because RoPE rotates q
and k by their own positions, `q_m . k_n` depends on `m - n` only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """`[D/2]` float64 inverse frequencies `theta^(-2d/D)`."""
  return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _none(rope: "Rope") -> tuple[np.ndarray, float]:
  return base_inv_freq(rope.head_dim, rope.theta), 1.0


def _linear(rope: "Rope") -> tuple[np.ndarray, float]:
  return base_inv_freq(rope.head_dim, rope.theta) / rope.factor, 1.0


def _ntk(rope: "Rope") -> tuple[np.ndarray, float]:
  d = rope.head_dim
  return base_inv_freq(d, rope.theta * rope.factor ** (d / (d - 2))), 1.0


def _turns(rope: "Rope", inv_freq: np.ndarray) -> np.ndarray:
  """`[D/2]` YaRN's `r_d = L / lambda_d`: how many turns pair d makes over the trained L."""
  return rope.original_length * inv_freq / (2 * math.pi)


def _yarn(rope: "Rope") -> tuple[np.ndarray, float]:
  inv_freq = base_inv_freq(rope.head_dim, rope.theta)
  ratio = _turns(rope, inv_freq)
  gamma = np.clip((ratio - rope.yarn_alpha) / (rope.yarn_beta - rope.yarn_alpha), 0.0, 1.0)
  inv_freq = (1 - gamma) * inv_freq / rope.factor + gamma * inv_freq
  return inv_freq, 0.1 * math.log(rope.factor) + 1.0


# name -> rope -> (inverse frequencies [D/2], factor multiplying both q and k).
SCALINGS: dict[str, Callable[["Rope"], tuple[np.ndarray, float]]] = {
    "none": _none, "linear": _linear, "ntk": _ntk, "yarn": _yarn,
}


@dataclasses.dataclass(frozen=True)
class Rope:
  """RoPE of one layer kind: a hashable static description; `rope(x, positions)` applies it.

  Attributes:
    head_dim: D, even.
    theta: base b, > 0.
    scaling: one of `SCALINGS`.
    factor: s >= 1 (must stay 1 for `none`).
    original_length: L, the trained context (needed by `yarn`).
    yarn_alpha, yarn_beta: ramp bounds on `r = L / lambda` (paper: 1 and 32).
  """

  head_dim: int
  theta: float = 10_000.0
  scaling: str = "none"
  factor: float = 1.0
  original_length: int | None = None
  yarn_alpha: float = 1.0
  yarn_beta: float = 32.0

  def __post_init__(self):
    if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim >= 2, got {self.head_dim!r}.")
    if not self.theta > 0:
      raise ValueError(f"rope theta must be > 0, got {self.theta!r}.")
    if self.scaling not in SCALINGS:
      raise ValueError(f"unknown rope scaling {self.scaling!r}; known: {sorted(SCALINGS)}.")
    if self.scaling == "none" and self.factor != 1.0:
      raise ValueError(f"rope factor {self.factor} needs a rope scaling (linear, ntk, yarn); "
                       f"scaling is 'none'.")
    if not self.factor >= 1.0:
      raise ValueError(f"rope factor s = L'/L must be >= 1, got {self.factor!r}.")
    if self.scaling == "ntk" and self.head_dim < 4:
      raise ValueError(f"ntk scaling needs head_dim >= 4 (b * s^(D / (D - 2))), got "
                       f"{self.head_dim}.")
    if self.scaling == "yarn":
      if not isinstance(self.original_length, int) or self.original_length < 1:
        raise ValueError(f"yarn scaling needs original_length (the trained context L) >= 1, "
                         f"got {self.original_length!r}.")
      if not self.yarn_alpha < self.yarn_beta:
        raise ValueError(f"yarn needs alpha < beta, got {self.yarn_alpha}, {self.yarn_beta}.")

  def yarn_regimes(self) -> dict[str, int]:
    """How many of the D/2 frequency pairs YaRN keeps (r > beta), ramps, and interpolates
    (r < alpha) at this theta, L and ramp; `r = L / lambda_d`."""
    if self.original_length is None:
      raise ValueError("yarn_regimes needs original_length (the trained context L).")
    ratio = _turns(self, base_inv_freq(self.head_dim, self.theta))
    kept, interpolated = int((ratio > self.yarn_beta).sum()), int((ratio < self.yarn_alpha).sum())
    return dict(kept=kept, ramped=len(ratio) - kept - interpolated, interpolated=interpolated)

  def inv_freq(self) -> np.ndarray:
    """`[D/2]` float64 (scaled) inverse frequencies."""
    return SCALINGS[self.scaling](self)[0]

  @property
  def attention_factor(self) -> float:
    """Multiplies both q and k: `0.1 ln(s) + 1` for yarn, 1 otherwise."""
    return SCALINGS[self.scaling](self)[1]

  def __call__(self, x: Float[Array, "B T N H"],
               positions: Int[Array, "B T"]) -> Float[Array, "B T N H"]:
    """Rotates `x` by `positions` (computed in float32, returned in x's dtype)."""
    inv_freq, factor = SCALINGS[self.scaling](self)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = (jnp.cos(angles) * factor)[:, :, None, :]  # B T 1 H/2
    sin = (jnp.sin(angles) * factor)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
