"""Shared test utilities: fresh random inputs and the DESIGN.md tolerances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# DESIGN.md: forward atol by dtype, rtol = atol / 10, gradients 2x atol; compare in float32.
ATOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2,
        jnp.dtype(jnp.float16): 5e-3}


def tolerance(dtype, grad: bool = False) -> dict[str, float]:
  atol = ATOL[jnp.dtype(dtype)] * (2 if grad else 1)
  return dict(atol=atol, rtol=atol / 10)


def assert_close(actual, expected, dtype=jnp.float32, grad: bool = False, err_msg: str = ""):
  np.testing.assert_allclose(np.asarray(jnp.asarray(actual, jnp.float32)),
                             np.asarray(jnp.asarray(expected, jnp.float32)),
                             err_msg=err_msg, **tolerance(dtype, grad))


def random_qkv(seed: int, batch: int, q_len: int, kv_len: int, num_heads: int,
               num_kv_heads: int, head_dim: int, dtype=jnp.float32):
  """Fresh standard-normal q `[B, T, N, H]`, k/v `[B, S, K, H]` (never zeros)."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (batch, q_len, num_heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, kv_len, num_kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, kv_len, num_kv_heads, head_dim), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_segments(seed: int, batch: int, length: int, num_segments: int = 3,
                    pad: int = 0) -> jax.Array:
  """Sorted random segment ids `[B, L]` (packed documents); the last `pad` positions are -1."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, max(2, length - pad)), size=num_segments - 1))
    ids = np.searchsorted(cuts, np.arange(length), side="right")
    if pad:
      ids[-pad:] = -1
    rows.append(ids)
  return jnp.asarray(np.stack(rows), jnp.int32)


def vjp_of(fn, q, k, v, seed: int = 123):
  """`(out, (dq, dk, dv))` of `fn(q, k, v)` against a fixed random cotangent."""
  out, pullback = jax.vjp(fn, q, k, v)
  dout = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32).astype(out.dtype)
  return out, pullback(dout)
