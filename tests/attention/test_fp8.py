"""attention/fp8.py: block-wise FP8 scales, power-of-two scales, Hadamard rotation, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import Mask, fp8, indexer
from tests.helpers import assert_close


def sylvester(d: int) -> np.ndarray:
  h = np.ones((1, 1))
  while h.shape[0] < d:
    h = np.block([[h, h], [h, -h]])
  return h


def outlier_block_rows(seed: int = 0) -> np.ndarray:
  """Rows of 256: block 0 holds one value 1e4, block 1 values ~1e-2 (a per-tensor or per-row
  scale 1e4 / 448 would flush block 1 to zero: 1e-2 / 22 is below float8's smallest value)."""
  x = np.random.default_rng(seed).normal(size=(3, 256)).astype(np.float32) * 1e-2
  x[:, 5] = 1e4
  return x


def test_one_scale_per_block_and_small_blocks_survive_an_outlier_block():
  x = outlier_block_rows()
  q = fp8.quantize_fp8(jnp.asarray(x), block=128)
  assert q.values.dtype == jnp.float8_e4m3fn and q.scale.shape == (3, 2)
  absmax = np.abs(x.reshape(3, 2, 128)).max(-1)
  np.testing.assert_allclose(q.scale, absmax / 448.0, rtol=1e-6)
  back = np.asarray(q.dequantize())
  # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; the small block survives.
  np.testing.assert_allclose(back[:, 128:], x[:, 128:], atol=0.07 * absmax[:, 1:].max())
  assert np.all(np.abs(back[:, 128:]).max(-1) > 0.5 * absmax[:, 1])
  np.testing.assert_allclose(back[:, :128], x[:, :128], atol=0.07 * 1e4)  # its own scale
  np.testing.assert_allclose(back[:, 5], 1e4, rtol=1e-6)


def test_pow2_scales_round_up_to_powers_of_two():
  x = jax.random.normal(jax.random.key(1), (4, 64)) * 3.0
  q = fp8.quantize_fp8(x, block=32, pow2=True)
  scale = np.asarray(q.scale)
  exact = np.abs(np.asarray(x).reshape(4, 2, 32)).max(-1) / 448.0
  np.testing.assert_array_equal(np.log2(scale), np.round(np.log2(scale)))
  assert np.all(scale >= exact) and np.all(scale < 2 * exact)
  assert np.all(np.isfinite(np.asarray(q.values, np.float32)))
  np.testing.assert_allclose(q.dequantize(), x, atol=0.07 * float(np.abs(x).max()))


def test_block_scales_in_indexer_scores():
  """k's block 0 carries an outlier where q is 0, so q . k lives in block 1: block scales keep
  it (error a few %), one scale per 256-vector flushes it (the scores collapse)."""
  rng = np.random.default_rng(2)
  q = rng.normal(size=(1, 8, 2, 256)).astype(np.float32)
  q[..., :128] = 0.0
  k = np.concatenate([outlier_block_rows(3), outlier_block_rows(4)])[None]  # 1 6 256
  w = np.abs(rng.normal(size=(1, 8, 2))).astype(np.float32)
  q, k, w = jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)
  exact = np.asarray(indexer.indexer_scores(q, k, w))
  err = lambda fmt: np.abs(np.asarray(indexer.indexer_scores(q, k, w, fp8=fmt)) - exact).max()
  scale = np.abs(exact).max()
  assert err(fp8.Fp8Format(block=128)) < 0.1 * scale
  assert err(True) < 0.1 * scale  # True = blocks of min(D, 128)
  assert err(fp8.Fp8Format(block=256)) > 0.5 * scale  # the per-vector scale of before


@pytest.mark.parametrize("d", [1, 2, 8, 128])
def test_hadamard_matches_sylvester_matrix_and_is_its_own_inverse(d):
  x = jax.random.normal(jax.random.key(d), (3, 5, d))
  want = np.asarray(x, np.float64) @ sylvester(d) / np.sqrt(d)
  hadamard = jax.jit(fp8.hadamard)
  assert_close(hadamard(x), want)
  assert_close(hadamard(hadamard(x)), x)


def test_rotation_leaves_float32_scores_unchanged():
  kq, kk, kw = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(kq, (2, 6, 3, 32)) * 0.5
  k = jax.random.normal(kk, (2, 9, 32)) * 0.5
  w = jax.random.normal(kw, (2, 6, 3)) * 0.2
  mask = Mask(causal=True, q_offset=3)
  scores = jax.jit(lambda q, k, rotate: indexer.indexer_scores(
      *((fp8.hadamard(q), fp8.hadamard(k)) if rotate else (q, k)), w, mask=mask), static_argnums=2)
  plain, rotated = scores(q, k, False), scores(q, k, True)
  finite = np.isfinite(np.asarray(plain))
  np.testing.assert_array_equal(finite, np.isfinite(np.asarray(rotated)))
  assert_close(np.asarray(rotated)[finite], np.asarray(plain)[finite])


def test_dot_operand_is_exact_on_every_byte():
  """All 256 float8_e4m3fn bit patterns (subnormals, -0.0, NaN) survive `dot_operand` (the
  bfloat16 matmul operand on CPU) unchanged: the FP8 products are exact."""
  values = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), jnp.float8_e4m3fn)
  want = np.asarray(values.astype(jnp.float32))
  got = np.asarray(jnp.asarray(fp8.dot_operand(values), jnp.float32))
  np.testing.assert_array_equal(got, want)  # NaN == NaN here
  number = ~np.isnan(want)
  np.testing.assert_array_equal(np.signbit(got[number]), np.signbit(want[number]))  # -0.0


def test_bad_inputs_raise_naming_the_value():
  x = jnp.ones((2, 96))
  with pytest.raises(ValueError, match="block 64 must divide the last axis 96"):
    fp8.quantize_fp8(x, block=64)
  with pytest.raises(ValueError, match="power of two, got 24"):
    fp8.hadamard(jnp.ones((2, 24)))
  with pytest.raises(ValueError, match="int32"):
    fp8.quantize_fp8(jnp.ones((2, 128), jnp.int32))
  with pytest.raises(ValueError, match="int32"):
    fp8.hadamard(jnp.ones((2, 8), jnp.int32))
  with pytest.raises(ValueError, match="block 64 must divide"):
    indexer.indexer_scores(jnp.ones((1, 2, 1, 32)), jnp.ones((1, 2, 32)), jnp.ones((1, 2, 1)),
                           fp8=fp8.Fp8Format(block=64))
  with pytest.raises(ValueError, match="block must be a positive int"):
    fp8.Fp8Format(block=0)
