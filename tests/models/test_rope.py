"""RoPE: relative-position invariance, and scaled frequencies against specs/rope_scaling.md."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.rope import Rope

D, BASE, L = 16, 10_000.0, 1024


def spec_inv_freq(scaling: str, s: float, original_length: int = L, alpha: float = 1.0,
                  beta: float = 32.0) -> np.ndarray:
  """Independent numpy transcription of specs/rope_scaling.md."""
  d = np.arange(D // 2)
  theta = BASE ** (-2.0 * d / D)
  if scaling == "none":
    return theta
  if scaling == "linear":  # PI: positions m -> m / s
    return theta / s
  if scaling == "ntk":  # b' = b * s^(D / (D - 2))
    return (BASE * s ** (D / (D - 2))) ** (-2.0 * d / D)
  if scaling == "yarn":
    lam = 2 * np.pi / theta
    r = original_length / lam
    gamma = np.where(r < alpha, 0.0, np.where(r > beta, 1.0, (r - alpha) / (beta - alpha)))
    return (1 - gamma) * theta / s + gamma * theta
  raise AssertionError(scaling)


CASES = [("none", 1.0), ("linear", 4.0), ("ntk", 4.0), ("yarn", 4.0), ("yarn", 16.0)]


@pytest.mark.parametrize("scaling,s", CASES)
def test_inv_freq_matches_spec(scaling, s):
  rope = Rope(D, BASE, scaling, s, L if scaling == "yarn" else None)
  np.testing.assert_allclose(rope.inv_freq(), spec_inv_freq(scaling, s), rtol=1e-12)


def test_yarn_ramp_covers_all_three_regimes():
  """With L = 1024 and D = 16 some dims interpolate, some ramp, some are left alone."""
  r = L * spec_inv_freq("none", 1.0) / (2 * np.pi)
  assert (r < 1).any() and (r > 32).any() and ((r > 1) & (r < 32)).any()


@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 4.0)])
def test_yarn_ramp_bounds_are_configurable(alpha, beta):
  """Other ramp bounds (a tiny model's L and D) match the spec with those bounds; the model
  config carries them to every layer's Rope, defaults = the paper's 1 / 32."""
  rope = Rope(D, BASE, "yarn", 16.0, 256, alpha, beta)
  np.testing.assert_allclose(rope.inv_freq(), spec_inv_freq("yarn", 16.0, 256, alpha, beta),
                             rtol=1e-12)
  r = 256 * spec_inv_freq("none", 1.0) / (2 * np.pi)
  assert rope.yarn_regimes() == dict(kept=int((r > beta).sum()), interpolated=int(
      (r < alpha).sum()), ramped=int(((r >= alpha) & (r <= beta)).sum()))
  config = ModelConfig(d_model=32, num_heads=2, rope_scaling="yarn", rope_factor=16.0,
                       rope_original_length=256, rope_yarn_alpha=alpha, rope_yarn_beta=beta)
  assert config.rope("global") == dataclasses.replace(rope, theta=config.rope("global").theta)
  assert (ModelConfig().rope_yarn_alpha, ModelConfig().rope_yarn_beta) == (1.0, 32.0)


def test_yarn_regimes_at_llama_scale():
  """The paper's setting (L = 4096, D = 128, b = 1e4): 21 pairs kept, 25 ramped, 18 interpolated."""
  assert Rope(128, 1e4, "yarn", 16.0, 4096).yarn_regimes() == dict(kept=21, ramped=25,
                                                                  interpolated=18)


@pytest.mark.parametrize("scaling,s", CASES)
def test_attention_factor_scales_q_and_k(scaling, s):
  rope = Rope(D, BASE, scaling, s, L if scaling == "yarn" else None)
  expected = 0.1 * math.log(s) + 1 if scaling == "yarn" else 1.0
  assert rope.attention_factor == pytest.approx(expected)
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, D))
  rotated = rope(x, jnp.zeros((1, 3), jnp.int32))  # position 0: no rotation, only the factor
  np.testing.assert_allclose(rotated, expected * x, rtol=1e-6)


@pytest.mark.parametrize("scaling,s", CASES)
def test_rotation_is_relative(scaling, s):
  """q_m . k_n is unchanged when both positions shift by the same offset."""
  rope = Rope(D, BASE, scaling, s, L if scaling == "yarn" else None)
  kq, kk = jax.random.split(jax.random.key(1))
  q = jax.random.normal(kq, (1, 5, 3, D))
  k = jax.random.normal(kk, (1, 5, 3, D))
  pos_q = jnp.array([[0, 3, 7, 11, 40]])
  pos_k = jnp.array([[2, 2, 9, 0, 63]])
  dots = lambda off: jnp.einsum("BTNH,BTNH->BTN", rope(q, pos_q + off), rope(k, pos_k + off))
  np.testing.assert_allclose(dots(0), dots(1000), atol=1e-3, rtol=1e-4)
  np.testing.assert_allclose(dots(0), dots(17), atol=1e-4, rtol=1e-5)
  # And it is not trivially position-free.
  assert not np.allclose(dots(0), jnp.einsum("BTNH,BTNH->BTN", rope(q, pos_q), rope(k, pos_q)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_dim=7), "even head_dim"),
    (dict(head_dim=D, theta=0.0), "theta"),
    (dict(head_dim=D, scaling="longrope"), "unknown rope scaling"),
    (dict(head_dim=D, scaling="none", factor=2.0), "needs a rope scaling"),
    (dict(head_dim=D, scaling="linear", factor=0.5), ">= 1"),
    (dict(head_dim=D, scaling="yarn", factor=2.0), "original_length"),
    (dict(head_dim=D, scaling="yarn", factor=2.0, original_length=64, yarn_alpha=8.0,
          yarn_beta=2.0), "alpha < beta"),
])
def test_bad_rope_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Rope(**kwargs)
