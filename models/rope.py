"""Rotary position embeddings with context-extension scalings: none, linear (PI), ntk, yarn, and
transformers' llama3, yarn_hf and dynamic (so Hugging Face checkpoints load with exact parity).

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
* `llama3` -> Llama 3.1: pairs with `lambda_d < L / high_freq_factor` kept, `lambda_d > L /
              low_freq_factor` divided by s, between them `(1 - g) theta_d / s + g theta_d` with
              `g = (L / lambda_d - low) / (high - low)` (transformers'
              `_compute_llama3_parameters`).
* `yarn_hf` -> YaRN as its reference code and transformers compute it: the ramp is linear in
              the pair index `d` (not in `r`) between `floor(d(beta))` and `ceil(d(alpha))`
              (`truncate`),
              `d(n)` the (fractional) pair index where `r_d = n`; the attention factor is
              `mscale` or `0.1 ln(s) + 1`. (`yarn` above is the paper's formula.)
* `dynamic` -> dynamic NTK (transformers' "dynamic"): base `b * (s n / L - (s - 1))^(D / (D - 2))`
              with `n = max(positions) + 1` of the call, clamped to `>= L` (L =
              `original_length`, transformers' `max_position_embeddings`): unchanged up to L.
              Computed per call in float32, so a prefill and each decoding step use their own
              length, as transformers does from a fresh module (its module also remembers the
              longest length seen across calls; that state is not reproduced).

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


def _none(rope: "Rope", seq_len=None) -> tuple[np.ndarray, float]:
  return base_inv_freq(rope.head_dim, rope.theta), 1.0


def _linear(rope: "Rope", seq_len=None) -> tuple[np.ndarray, float]:
  return base_inv_freq(rope.head_dim, rope.theta) / rope.factor, 1.0


def _ntk(rope: "Rope", seq_len=None) -> tuple[np.ndarray, float]:
  d = rope.head_dim
  return base_inv_freq(d, rope.theta * rope.factor ** (d / (d - 2))), 1.0


def _turns(rope: "Rope", inv_freq: np.ndarray) -> np.ndarray:
  """`[D/2]` YaRN's `r_d = L / lambda_d`: how many turns pair d makes over the trained L."""
  return rope.original_length * inv_freq / (2 * math.pi)


def _yarn_factor(rope: "Rope") -> float:
  if rope.mscale is not None:
    return rope.mscale
  return 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0


def _yarn(rope: "Rope", seq_len=None) -> tuple[np.ndarray, float]:
  inv_freq = base_inv_freq(rope.head_dim, rope.theta)
  ratio = _turns(rope, inv_freq)
  gamma = np.clip((ratio - rope.yarn_alpha) / (rope.yarn_beta - rope.yarn_alpha), 0.0, 1.0)
  inv_freq = (1 - gamma) * inv_freq / rope.factor + gamma * inv_freq
  return inv_freq, _yarn_factor(rope)


def _yarn_hf(rope: "Rope", seq_len=None) -> tuple[np.ndarray, float]:
  d, base, length = rope.head_dim, rope.theta, rope.original_length
  pair = lambda turns: d * math.log(length / (turns * 2 * math.pi)) / (2 * math.log(base))
  low, high = pair(rope.yarn_beta), pair(rope.yarn_alpha)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  high = high + 0.001 if low == high else high  # as transformers: no division by zero
  keep = 1 - np.clip((np.arange(d // 2) - low) / (high - low), 0.0, 1.0)  # 1: extrapolate
  inv_freq = base_inv_freq(d, base)
  return inv_freq / rope.factor * (1 - keep) + inv_freq * keep, _yarn_factor(rope)


def _llama3(rope: "Rope", seq_len=None) -> tuple[np.ndarray, float]:
  inv_freq = base_inv_freq(rope.head_dim, rope.theta)
  s, length = rope.factor, rope.original_length
  low, high = rope.low_freq_factor, rope.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > length / low, inv_freq / s, inv_freq)
  smooth = (length / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / s + smooth * scaled
  medium = (wavelen >= length / high) & (wavelen <= length / low)
  return np.where(medium, smoothed, scaled), 1.0


def _dynamic(rope: "Rope", seq_len=None):
  """Float32 (as transformers); `seq_len` a traced int scalar, or None (= original_length)."""
  d, length = rope.head_dim, rope.original_length
  if seq_len is None:
    seq_len = length
  n = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(length))
  base = jnp.float32(rope.theta) * ((rope.factor * n / length) - (rope.factor - 1)) ** (
      d / (d - 2))
  return 1.0 / base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d), 1.0


# name -> (rope, seq_len) -> (inverse frequencies [D/2], factor multiplying both q and k).
# `seq_len` (max position + 1 of the call) matters only to "dynamic".
SCALINGS: dict[str, Callable[..., tuple[np.ndarray, float]]] = {
    "none": _none, "linear": _linear, "ntk": _ntk, "yarn": _yarn, "yarn_hf": _yarn_hf,
    "llama3": _llama3, "dynamic": _dynamic,
}
# Scalings that need `original_length` (the trained context L).
NEEDS_LENGTH = ("yarn", "yarn_hf", "llama3", "dynamic")


@dataclasses.dataclass(frozen=True)
class Rope:
  """RoPE of one layer kind: a hashable static description; `rope(x, positions)` applies it.

  Attributes:
    head_dim: D, even.
    theta: base b, > 0.
    scaling: one of `SCALINGS`.
    factor: s >= 1 (must stay 1 for `none`).
    original_length: L, the trained context (needed by `yarn`).
    yarn_alpha, yarn_beta: ramp bounds on `r = L / lambda` (paper: 1 and 32; transformers'
      beta_slow and beta_fast).
    low_freq_factor, high_freq_factor: llama3's band edges (Llama 3.1: 1 and 4).
    mscale: yarn / yarn_hf factor on q and k (transformers' `attention_factor`); None =
      `0.1 ln(s) + 1`.
    truncate: yarn_hf rounds its ramp's ends to whole pairs (transformers' default True).
  """

  head_dim: int
  theta: float = 10_000.0
  scaling: str = "none"
  factor: float = 1.0
  original_length: int | None = None
  yarn_alpha: float = 1.0
  yarn_beta: float = 32.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  mscale: float | None = None
  truncate: bool = True

  def __post_init__(self):
    if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim >= 2, got {self.head_dim!r}.")
    if not self.theta > 0:
      raise ValueError(f"rope theta must be > 0, got {self.theta!r}.")
    if self.scaling not in SCALINGS:
      raise ValueError(f"unknown rope scaling {self.scaling!r}; known: {sorted(SCALINGS)}.")
    if self.scaling == "none" and self.factor != 1.0:
      raise ValueError(f"rope factor {self.factor} needs a rope scaling "
                       f"({sorted(set(SCALINGS) - {'none'})}); scaling is 'none'.")
    if not self.factor >= 1.0:
      raise ValueError(f"rope factor s = L'/L must be >= 1, got {self.factor!r}.")
    if self.scaling in ("ntk", "dynamic") and self.head_dim < 4:
      raise ValueError(f"{self.scaling} scaling needs head_dim >= 4 (b * s^(D / (D - 2))), got "
                       f"{self.head_dim}.")
    if self.scaling in NEEDS_LENGTH and (
        not isinstance(self.original_length, int) or self.original_length < 1):
      raise ValueError(f"{self.scaling} scaling needs original_length (the trained context L) "
                       f">= 1, got {self.original_length!r}.")
    if self.scaling == "llama3" and not self.low_freq_factor < self.high_freq_factor:
      raise ValueError(f"llama3 needs low_freq_factor < high_freq_factor, got "
                       f"{self.low_freq_factor}, {self.high_freq_factor}.")
    if self.mscale is not None and not self.mscale > 0:
      raise ValueError(f"rope mscale must be > 0 or None, got {self.mscale!r}.")
    if self.scaling in ("yarn", "yarn_hf"):
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
    """`[D/2]` (scaled) inverse frequencies: float64, float32 for "dynamic" (at length L)."""
    return np.asarray(SCALINGS[self.scaling](self)[0])

  @property
  def attention_factor(self) -> float:
    """Multiplies both q and k: `0.1 ln(s) + 1` for yarn, 1 otherwise."""
    return SCALINGS[self.scaling](self)[1]

  def __call__(self, x: Float[Array, "B T N H"],
               positions: Int[Array, "B T"]) -> Float[Array, "B T N H"]:
    """Rotates `x` by `positions` (computed in float32, returned in x's dtype)."""
    inv_freq, factor = SCALINGS[self.scaling](self, jnp.max(positions) + 1)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = (jnp.cos(angles) * factor)[:, :, None, :]  # B T 1 H/2
    sin = (jnp.sin(angles) * factor)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
