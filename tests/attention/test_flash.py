"""flash_attention (XLA path) vs reference_attention: forward and gradients over the mask grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import BlockSizes, Mask
from tests.helpers import assert_close, random_qkv, random_segments, vjp_of

SMALL = BlockSizes(64, 64, 64, 64)  # several tiles even at short lengths

# (id, B, T, S, N, K, H, mask kwargs, use segments, q_offset)
CASES = [
    ("len1", 1, 1, 1, 2, 2, 32, dict(), False, 0),
    ("len7-causal", 2, 7, 7, 4, 4, 32, dict(causal=True), False, 0),
    ("len100-full", 1, 100, 100, 4, 2, 64, dict(), False, 0),
    ("len100-causal-gqa", 2, 100, 100, 8, 2, 32, dict(causal=True), False, 0),
    ("len100-causal-mqa", 1, 100, 100, 4, 1, 64, dict(causal=True), False, 0),
    ("win00", 1, 100, 100, 2, 1, 32, dict(window=(0, 0)), False, 0),
    ("win30-causal", 1, 100, 100, 2, 2, 32, dict(causal=True, window=(3, 0)), False, 0),
    ("win6464", 1, 300, 300, 2, 1, 64, dict(window=(64, 64)), False, 0),
    ("win1270-causal", 1, 1000, 1000, 2, 1, 64, dict(causal=True, window=(127, 0)), False, 0),
    ("causal-1000", 1, 1000, 1000, 2, 2, 32, dict(causal=True), False, 0),
    ("segments-pad", 2, 200, 200, 4, 2, 32, dict(causal=True), True, 0),
    ("segments-bidir", 2, 130, 130, 2, 1, 32, dict(), True, 0),
    ("segments-window", 2, 200, 200, 2, 2, 32, dict(causal=True, window=(16, 0)), True, 0),
    ("decode-1", 2, 1, 77, 4, 2, 32, dict(causal=True), False, 76),
    ("prefill-chunk", 1, 40, 170, 4, 2, 64, dict(causal=True), False, 130),
    ("prefill-window", 1, 40, 170, 4, 2, 32, dict(causal=True, window=(31, 0)), False, 130),
    ("cross-attn", 2, 37, 100, 4, 4, 32, dict(), False, 0),
    ("head128", 1, 100, 100, 2, 1, 128, dict(causal=True), False, 0),
    ("batch-offsets", 2, 8, 60, 2, 1, 32, dict(causal=True, window=(20, 0)), False, (52, 30)),
]


def _mask(b, t, s, mask_kw, segments, q_offset):
  kw = dict(mask_kw)
  if segments:
    assert t == s
    seg = random_segments(0, b, t, num_segments=4, pad=t // 10)
    kw.update(q_segment_ids=seg, kv_segment_ids=seg)
  if isinstance(q_offset, tuple):
    q_offset = jnp.asarray(q_offset, jnp.int32)
  return Mask(q_offset=q_offset, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_matches_reference_fwd_and_grad(case):
  _, b, t, s, n, kh, h, mask_kw, segments, q_offset = case
  q, k, v = random_qkv(1, b, t, s, n, kh, h)
  mask = _mask(b, t, s, mask_kw, segments, q_offset)
  flash = lambda q, k, v: attention.flash_attention(q, k, v, mask=mask, block_sizes=SMALL)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, mask=mask)
  out, grads = vjp_of(flash, q, k, v)
  out_ref, grads_ref = vjp_of(ref, q, k, v)
  assert_close(out, out_ref)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert_close(g, g_ref, grad=True, err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mask_kw", [dict(causal=True), dict(window=(8, 8))], ids=["causal", "win"])
def test_flash_low_precision(dtype, mask_kw):
  q, k, v = random_qkv(2, 1, 100, 100, 4, 2, 64, dtype)
  mask = Mask(**mask_kw)
  flash = lambda q, k, v: attention.flash_attention(q, k, v, mask=mask, block_sizes=SMALL)
  out, grads = vjp_of(flash, q, k, v)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  # The oracle sees the same low-precision inputs, computed in float32.
  up = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, mask=mask)
  out_ref, _ = vjp_of(ref, up(q), up(k), up(v))
  _, pullback = jax.vjp(ref, up(q), up(k), up(v))
  grads_ref = pullback(jax.random.normal(jax.random.key(123), out.shape).astype(dtype).astype(
      jnp.float32))
  assert_close(out, out_ref, dtype)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert_close(g, g_ref, dtype, grad=True, err_msg=f"d{name}")


def test_default_block_sizes_long():
  """Default (CPU) tiles with a length that is not a tile multiple."""
  q, k, v = random_qkv(3, 1, 1000, 1000, 2, 1, 64)
  mask = Mask(causal=True)
  assert_close(attention.flash_attention(q, k, v, mask=mask),
               attention.reference_attention(q, k, v, mask=mask))


def test_local_attention_is_flash_with_window():
  q, k, v = random_qkv(4, 1, 200, 200, 2, 2, 32)
  causal = Mask(causal=True)
  out = attention.local_attention(q, k, v, mask=causal, window=16, block_sizes=SMALL)
  expected = attention.reference_attention(q, k, v, mask=Mask(causal=True, window=(15, 0)))
  assert_close(out, expected)
  bidir = attention.local_attention(q, k, v, window=(64, 64))
  assert_close(bidir, attention.reference_attention(q, k, v, mask=Mask(window=(64, 64))))
  # An existing window intersects with the local one.
  narrow = attention.local_attention(q, k, v, mask=Mask(window=(4, 100)), window=(64, 2))
  assert_close(narrow, attention.reference_attention(q, k, v, mask=Mask(window=(4, 2))))


def test_no_nan_fully_masked_rows_and_large_logits():
  q, k, v = random_qkv(5, 2, 64, 64, 2, 1, 32, jnp.bfloat16)
  q = q * 30  # bf16 logits scaled up 30x
  seg = random_segments(1, 2, 64, pad=10)
  q_seg = seg.at[:, :3].set(7)  # queries in a segment no key has: fully masked rows
  mask = Mask(causal=True, q_segment_ids=q_seg, kv_segment_ids=seg)
  for fn in (attention.flash_attention, attention.reference_attention):
    out, grads = vjp_of(lambda q, k, v: fn(q, k, v, mask=mask), q, k, v)
    for x in (out, *grads):
      assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), fn.__name__
    assert float(jnp.abs(out[:, :3].astype(jnp.float32)).max()) == 0.0
    assert float(jnp.abs(out[:, -10:].astype(jnp.float32)).max()) == 0.0
  # A window that sees no key at all (queries placed past the keys).
  q, k, v = random_qkv(6, 1, 5, 20, 2, 1, 32)
  far = Mask(window=(2, 0), q_offset=100)
  out, grads = vjp_of(lambda q, k, v: attention.flash_attention(q, k, v, mask=far), q, k, v)
  assert float(jnp.abs(out).max()) == 0.0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_jit_and_traced_mask_arrays():
  q, k, v = random_qkv(7, 2, 50, 80, 2, 1, 32)
  offsets = jnp.asarray([30, 10], jnp.int32)

  @jax.jit
  def f(q, k, v, offsets):
    return attention.flash_attention(q, k, v, mask=Mask(causal=True, q_offset=offsets),
                                     block_sizes=SMALL)

  expected = attention.reference_attention(q, k, v, mask=Mask(causal=True, q_offset=offsets))
  assert_close(f(q, k, v, offsets), expected)


def test_causal_and_window_skip_blocks():
  """The loops visit exactly the non-empty tiles: causal ~half of them, a window O(L * w).

  (XLA's cost analysis counts a while-loop body once, so tiles are counted instead; the
  benchmark measures the resulting speed-ups.)
  """
  t, bq = 4096, 512
  full = attention.block_map(Mask(), t, t, bq, bq)
  causal = attention.block_map(Mask(causal=True), t, t, bq, bq)
  window = attention.block_map(Mask(causal=True, window=(255, 0)), t, t, bq, bq)
  assert (full != 0).sum() == 64
  assert (causal != 0).sum() == 36  # (8 * 9) / 2
  assert (window != 0).sum() == 15  # diagonal + one tile below it, except the first row
  # Loop bounds visit exactly the non-empty tiles of each q row for causal/window masks.
  from attention import masks as masks_lib
  for mask, bmap in ((Mask(causal=True), causal), (Mask(causal=True, window=(255, 0)), window)):
    for i in range(8):
      lo, hi = masks_lib.kv_block_range(mask, i * bq, i * bq + bq - 1, bq, 8)
      assert list(np.nonzero(bmap[i])[0]) == list(range(int(lo), int(hi)))
    for j in range(8):
      lo, hi = masks_lib.q_block_range(mask, j * bq, j * bq + bq - 1, 0, 0, bq, 8)
      assert list(np.nonzero(bmap[:, j])[0]) == list(range(int(lo), int(hi)))


def test_memory_linear_in_length():
  """fwd+bwd temp memory of flash grows ~linearly (dense grows quadratically)."""
  def temp_bytes(fn, t):
    q, k, v = (jax.ShapeDtypeStruct((1, t, 2, 64), jnp.float32),) * 3
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask=Mask(causal=True)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(attention.flash_attention, 2048), temp_bytes(
      attention.flash_attention, 16384)
  assert large / small < 9.0, (small, large)
  dense_small, dense_large = (temp_bytes(attention.reference_attention, 1024),
                              temp_bytes(attention.reference_attention, 2048))
  assert dense_large / dense_small > 3.0  # quadratic: 4x for 2x tokens


def test_block_map_classifies():
  bmap = attention.block_map(Mask(causal=True), 100, 100, 32, 32)
  # Diagonal tiles are partial, tiles below are full, above are empty; the last kv tile holds
  # padding (100 is not a multiple of 32) and so is never "full".
  assert bmap[0, 0] == 1 and bmap[1, 0] == 2 and bmap[0, 1] == 0
  assert bmap[3, 3] == 1
