"""The banded window path (attention/band.py) vs the tiled XLA path and the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attention
from attention import BlockSizes, Mask
from attention import band as band_lib
from attention import flash_xla
from attention.scores import NONE as NO_MODS
from tests.helpers import assert_close, random_qkv, random_segments, vjp_of

# (id, B, T, S, N, K, H, mask kwargs, segments, q_offset, block_q)
CASES = [
    ("causal-window", 2, 300, 300, 4, 2, 32, dict(causal=True, window=(40, 0)), False, 0, 64),
    ("bidirectional", 1, 200, 200, 2, 1, 32, dict(window=(7, 19)), False, 0, 32),
    ("diagonal", 1, 100, 100, 2, 2, 32, dict(window=(0, 0)), False, 0, 16),
    ("segments", 2, 256, 256, 2, 1, 64, dict(causal=True, window=(31, 0)), True, 0, 64),
    ("decode", 2, 1, 500, 4, 1, 32, dict(causal=True, window=(63, 0)), False, 499, 8),
    ("prefill-chunk", 1, 48, 400, 2, 1, 32, dict(causal=True, window=(31, 0)), False, 352, 16),
    ("ragged-tail", 1, 77, 77, 2, 1, 32, dict(causal=True, window=(9, 0)), False, 0, 16),
    # Queries past the last key: tiles start clamped, no key is visible (rows are 0).
    ("past-the-end", 1, 40, 100, 2, 1, 32, dict(window=(5, 9)), False, 150, 16),
    ("straddles-end", 1, 40, 100, 2, 1, 32, dict(window=(5, 9)), False, 80, 16),
]


def _mask(b, t, mask_kw, segments, q_offset):
  kw = dict(mask_kw)
  if segments:
    seg = random_segments(3, b, t, num_segments=4, pad=t // 8)
    kw.update(q_segment_ids=seg, kv_segment_ids=seg)
  return Mask(q_offset=q_offset, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_band_matches_tiled_and_reference(case):
  _, b, t, s, n, kh, h, mask_kw, segments, q_offset, bq = case
  q, k, v = random_qkv(11, b, t, s, n, kh, h)
  mask = _mask(b, t, mask_kw, segments, q_offset)
  assert band_lib.band_applies(mask, s, bq)
  scale = h ** -0.5
  # pylint: disable=protected-access
  # The backward tiles differ from the forward's (block_q_bwd, block_kv_bwd are honoured).
  band = jax.jit(lambda q, k, v: flash_xla.xla_band(q, k, v, mask, scale, NO_MODS, (bq,),
                                                    (2 * bq,))[0])
  tiled = jax.jit(lambda q, k, v: flash_xla.xla_flash(q, k, v, mask, scale, NO_MODS, (bq, bq),
                                                      (bq, 2 * bq))[0])
  # pylint: enable=protected-access
  ref = jax.jit(lambda q, k, v: attention.reference_attention(q, k, v, mask=mask))
  out, grads = vjp_of(band, q, k, v)
  for other in (tiled, ref):
    out_other, grads_other = vjp_of(other, q, k, v)
    assert_close(out, out_other)
    for name, g, g_other in zip("qkv", grads, grads_other):
      assert_close(g, g_other, grad=True, err_msg=f"d{name}")
  # The saved log-sum-exp equals the tiled path's (the backward relies on it).
  _, lse = band_lib.band_forward(q, k, v, mask, scale, bq)
  _, lse_tiled = flash_xla.flash_forward_xla(q, k, v, mask, scale, bq, bq)
  assert_close(jnp.where(jnp.isfinite(lse), lse, 0.0), jnp.where(jnp.isfinite(lse), lse_tiled, 0.0))
  assert bool(jnp.all(jnp.isfinite(lse) == jnp.isfinite(lse_tiled)))


def test_band_low_precision():
  q, k, v = random_qkv(12, 1, 300, 300, 4, 2, 64, jnp.bfloat16)
  mask = Mask(causal=True, window=(63, 0))
  out, grads = vjp_of(lambda q, k, v: attention.flash_attention(q, k, v, mask=mask), q, k, v)
  up = lambda x: x.astype(jnp.float32)
  out_ref, grads_ref = vjp_of(lambda q, k, v: attention.reference_attention(q, k, v, mask=mask),
                              up(q), up(k), up(v))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert_close(out, out_ref, jnp.bfloat16)
  for g, g_ref in zip(grads, grads_ref):
    assert_close(g, g_ref, jnp.bfloat16, grad=True)


def test_band_applies_only_where_valid_and_cheaper():
  window = Mask(causal=True, window=(255, 0))
  assert band_lib.band_span(window, 256) == 512  # 256 + 255 rounded up to a multiple of 8
  assert band_lib.band_applies(window, 32768, 256)
  assert not band_lib.band_applies(window, 400, 256)  # the band would cover every key
  assert not band_lib.band_applies(Mask(causal=True), 32768, 256)  # no window
  assert not band_lib.band_applies(Mask(window=(10, 10**9)), 32768, 256)  # unbounded side
  per_row = Mask(causal=True, window=(255, 0), q_offset=jnp.array([0, 5]))
  assert not band_lib.band_applies(per_row, 32768, 256)  # [B] offsets: tiled path
  before = Mask(causal=True, window=(255, 0), q_offset=-20)
  assert not band_lib.band_applies(before, 32768, 256)  # queries before key 0: tiled path
  assert band_lib.band_applies(Mask(causal=True, window=(255, 0), q_offset=jnp.int32(7)),
                               32768, 256)  # a concrete 0-d array is static
  decisions = []  # under jit the offset is a tracer: its sign is unknown, so tiled path
  jax.jit(lambda off: decisions.append(band_lib.band_applies(
      Mask(causal=True, window=(255, 0), q_offset=off), 32768, 256)) or off)(3)
  assert decisions == [False]
  # flash_attention picks it by default for a narrow window (the jaxpr has no lax.switch).
  q, k, v = (jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.float32),) * 3
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.flash_attention(q, k, v, mask=window))(
      q, k, v))
  assert "cond" not in jaxpr and "switch" not in jaxpr


def test_band_memory_linear_in_length():
  """Local fwd+bwd temp memory grows ~linearly: 8x tokens -> under 9x bytes."""
  def temp_bytes(t):
    q, k, v = (jax.ShapeDtypeStruct((1, t, 2, 64), jnp.float32),) * 3
    mask = Mask(causal=True, window=(255, 0))
    loss = lambda q, k, v: jnp.sum(attention.flash_attention(q, k, v, mask=mask))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(2048), temp_bytes(16384)
  assert large / small < 9.0, (small, large)


def test_band_block_sizes_respected():
  """`BlockSizes.block_q` sets the band's q tile; results do not depend on it."""
  q, k, v = random_qkv(13, 1, 500, 500, 2, 1, 32)
  mask = Mask(causal=True, window=(20, 0))
  outs = [attention.flash_attention(q, k, v, mask=mask, block_sizes=BlockSizes(bq, bq))
          for bq in (16, 64, 256)]
  for out in outs[1:]:
    assert_close(out, outs[0])


def test_window_before_the_keys_takes_the_tiled_path():
  """Negative q_offset (queries before key 0): flash_attention still equals the reference."""
  q, k, v = random_qkv(14, 1, 40, 100, 2, 1, 32)
  mask = Mask(causal=True, window=(5, 0), q_offset=-20)
  out, grads = vjp_of(lambda q, k, v: attention.flash_attention(q, k, v, mask=mask), q, k, v)
  ref, grads_ref = vjp_of(lambda q, k, v: attention.reference_attention(q, k, v, mask=mask),
                          q, k, v)
  assert_close(out, ref)
  for g, g_ref in zip(grads, grads_ref):
    assert_close(g, g_ref, grad=True)
  assert float(jnp.abs(out[:, :20]).max()) == 0.0  # the first 20 queries see no key
