"""flash_attention (XLA path): what the shared grid (test_grid.py) does not cover.

The forward/gradient comparison with reference_attention over shapes, masks and dtypes is the
shared grid's (tests/attention/grid.py); here: local attention, NaN-free empty rows, traced
mask leaves under jit, block skipping, memory, validation.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import BlockSizes, Mask
from tests.helpers import assert_close, random_qkv, random_segments, vjp_of

SMALL = BlockSizes(64, 64, 64, 64)  # several tiles even at short lengths

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


def test_sinks_visit_the_sink_blocks_and_the_band_only():
  """With sinks the forward loop (`masks.sink_blocks`, `kv_block_at`) visits exactly the
  non-empty kv tiles of each q row: the sink tile and the window band, O(L * (w + sinks)); the
  backward's q ranges of a sink tile run to the last q tile."""
  from attention import masks as masks_lib
  t, b = 2048, 256
  n = t // b
  for mask in (Mask(causal=True, window=(255, 0), sinks=4), Mask(window=(40, 40), sinks=300)):
    bmap = attention.block_map(mask, t, t, b, b)
    for i in range(n):
      lo, hi = masks_lib.kv_block_range(mask, i * b, i * b + b - 1, b, n)
      sinks = masks_lib.sink_blocks(mask, lo, b)
      visited = [int(masks_lib.kv_block_at(s, lo, sinks)) for s in range(int(sinks + hi - lo))]
      assert visited == list(np.nonzero(bmap[i])[0])
    for j in range(n):
      lo, hi = masks_lib.q_block_range(mask, j * b, j * b + b - 1, 0, 0, b, n)
      assert list(np.nonzero(bmap[:, j])[0]) == list(range(int(lo), int(hi)))
  causal_sinks = attention.block_map(Mask(causal=True, window=(255, 0), sinks=4), t, t, b, b)
  assert (causal_sinks != 0).sum() == 3 * n - 3  # diagonal, the tile below it, tile 0


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


def test_backward_tiles_are_honoured():
  """`block_q_bwd` / `block_kv_bwd` tile the XLA backward (tiled and banded paths), apart from
  the forward's tiles; the gradients still equal the reference's."""
  q, k, v = random_qkv(8, 2, 100, 100, 4, 2, 32)
  seg = random_segments(2, 2, 100, pad=7)
  tiles = BlockSizes(block_q=64, block_kv=64, block_q_bwd=16, block_kv_bwd=32)
  for mask in (Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg),
               Mask(causal=True, window=(9, 0))):  # the second takes the banded path
    fn = lambda q, k, v: attention.flash_attention(q, k, v, mask=mask, block_sizes=tiles)
    out, grads = vjp_of(fn, q, k, v)
    ref, grads_ref = vjp_of(lambda q, k, v: attention.reference_attention(q, k, v, mask=mask),
                            q, k, v)
    assert_close(out, ref)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
      assert_close(g, g_ref, grad=True, err_msg=f"d{name}")
  # The loops' trip counts show the tiles: forward 2 q tiles of 64; backward 4 kv tiles of 32
  # (tiled) or 7 q tiles of 16 (banded).
  loops = lambda mask: set(re.findall(r"length=(\d+)", str(jax.make_jaxpr(jax.grad(
      lambda q: attention.flash_attention(q, k, v, mask=mask, block_sizes=tiles).sum()))(q))))
  assert loops(Mask(causal=True)) == {"2", "4"}
  assert loops(Mask(causal=True, window=(9, 0))) == {"2", "7"}
