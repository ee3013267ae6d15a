"""Pallas flash attention kernels: interpret mode vs `reference_attention`, CUDA lowering, tiles.

Interpret mode is slow on CPU, so shapes stay tiny (T <= 128, head_dim 32/64) with 16/32 tiles;
the same configurations are lowered for CUDA (forward and `jax.grad`), which is fast and catches
kernels that would not compile for Triton. Schedules are checked against the dense mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import BlockSizes, Mask, flash_attention, reference_attention
from attention import masks as masks_lib
from attention.kernels import flash_pallas
from attention.kernels import flash_tiles as tiles
from attention.reference import reference_attention_with_lse
from tests.helpers import assert_close, random_qkv, random_segments, vjp_of

# Small tiles so that short sequences still span several blocks of each kind.
SMALL = BlockSizes(block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=32, block_q_dq=32,
                   block_kv_dq=16)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int = 2
  q_len: int = 64
  kv_len: int = 64
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 32
  causal: bool = False
  window: tuple[int, int] | None = None
  segments: int = 0  # number of segments (0: none); the last 5 positions are padding
  q_offset: int | tuple[int, ...] = 0

  def inputs(self, dtype, seed: int = 0):
    q, k, v = random_qkv(seed, self.batch, self.q_len, self.kv_len, self.heads, self.kv_heads,
                         self.head_dim, dtype)
    q_seg = kv_seg = None
    if self.segments:
      assert self.q_len == self.kv_len
      q_seg = kv_seg = random_segments(seed, self.batch, self.q_len, self.segments, pad=5)
    offset = jnp.asarray(self.q_offset, jnp.int32) if isinstance(self.q_offset, tuple) else (
        self.q_offset)
    mask = Mask(causal=self.causal, window=self.window, q_segment_ids=q_seg,
                kv_segment_ids=kv_seg, q_offset=offset)
    return q, k, v, mask


CASES = [
    Case("full"),
    Case("causal", causal=True),
    Case("diagonal", window=(0, 0)),
    Case("window_3_0", causal=True, window=(3, 0)),
    Case("window_64_64", q_len=128, kv_len=128, window=(64, 64), batch=1),
    Case("segments_causal", causal=True, segments=3),
    Case("segments_window", window=(20, 9), segments=4),
    Case("gqa_8_2", heads=8, kv_heads=2, causal=True),
    Case("mqa", heads=4, kv_heads=1, window=(10, 10)),
    Case("len_1", q_len=1, kv_len=1, causal=True),
    Case("len_7", q_len=7, kv_len=7, causal=True),
    Case("len_100", q_len=100, kv_len=100, causal=True, window=(40, 0), batch=1),
    Case("decode_offset", q_len=7, kv_len=100, causal=True, q_offset=93),
    Case("chunk_offsets", q_len=32, kv_len=96, causal=True, window=(47, 0), q_offset=(64, 50)),
    Case("no_key_rows", q_len=24, kv_len=40, causal=True, q_offset=-5),
    Case("head_dim_64", head_dim=64, causal=True, batch=1),
    Case("head_dim_24", head_dim=24, window=(8, 8), batch=1),
]
DTYPE_CASES = ["causal", "segments_causal", "chunk_offsets", "gqa_8_2"]
BY_NAME = {c.name: c for c in CASES}


def _pallas(mask, block_sizes=SMALL, interpret=True):
  return lambda q, k, v: flash_attention(q, k, v, mask=mask, implementation="pallas",
                                         block_sizes=block_sizes, interpret=interpret)


def _check_against_reference(case: Case, dtype):
  q, k, v, mask = case.inputs(dtype)
  out, grads = vjp_of(jax.jit(_pallas(mask)), q, k, v)
  ref_out, ref_grads = vjp_of(lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert_close(out, ref_out, dtype, err_msg=f"{case.name} out")
  for name, got, want in zip("qkv", grads, ref_grads):
    assert got.dtype == want.dtype
    assert np.all(np.isfinite(np.asarray(got, np.float32))), f"{case.name} d{name} not finite"
    assert_close(got, want, dtype, grad=True, err_msg=f"{case.name} d{name}")


# --- interpret mode vs the reference -------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_float32(case):
  _check_against_reference(case, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", DTYPE_CASES)
def test_matches_reference_half(name, dtype):
  _check_against_reference(BY_NAME[name], dtype)


def test_rows_without_keys_are_zero():
  q, k, v, mask = BY_NAME["no_key_rows"].inputs(jnp.float32)
  out, lse = flash_pallas.flash_forward_pallas(q, k, v, mask, 32 ** -0.5, SMALL, interpret=True)
  np.testing.assert_array_equal(np.asarray(out[:, :5]), 0.0)  # positions -5..-1: no keys
  assert np.all(np.isneginf(np.asarray(lse[..., :5])))
  ref_out, ref_lse = reference_attention_with_lse(q, k, v, mask=mask)
  assert_close(lse[..., 5:], ref_lse[..., 5:])
  assert_close(out, ref_out)


def test_traced_mask_leaves():
  """Segment ids and a per-row q_offset passed through jit as traced arrays (mask is a pytree)."""
  q, k, v, _ = BY_NAME["chunk_offsets"].inputs(jnp.float32)
  seg = random_segments(1, 2, 96, 3, pad=5)
  mask = Mask(causal=True, window=(47, 0), q_segment_ids=seg[:, 64:], kv_segment_ids=seg,
              q_offset=jnp.array([64, 50], jnp.int32))

  @jax.jit
  def grads(q, k, v, mask):
    loss = lambda q, k, v: jnp.sum(jnp.sin(_pallas(mask)(q, k, v)))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  ref_loss = lambda q, k, v: jnp.sum(jnp.sin(reference_attention(q, k, v, mask=mask)))
  for got, want in zip(grads(q, k, v, mask), jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)):
    assert_close(got, want, grad=True)


def test_default_block_sizes_and_public_dispatch():
  q, k, v, mask = BY_NAME["len_100"].inputs(jnp.float32)
  got = flash_attention(q, k, v, mask=mask, implementation=None, interpret=True)
  assert_close(got, reference_attention(q, k, v, mask=mask))


# --- CUDA lowering (no GPU needed) ----------------------------------------------------------------


def _lower_for_cuda(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


LOWER_CASES = ([(c, d) for c in CASES for d in (jnp.float32, jnp.bfloat16)]
               + [(BY_NAME[name], jnp.float16) for name in DTYPE_CASES])


@pytest.mark.parametrize("case,dtype", LOWER_CASES,
                         ids=[f"{c.name}-{jnp.dtype(d).name}" for c, d in LOWER_CASES])
def test_lowers_for_cuda_forward_and_backward(case, dtype):
  q, k, v, mask = case.inputs(dtype)
  fwd = _pallas(mask, interpret=False)
  assert _lower_for_cuda(fwd, q, k, v).count("xla.gpu.triton") == 1
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  assert text.count("xla.gpu.triton") == 3  # forward (recomputed for residuals), dK/dV, dQ


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_default_tiles_lower_for_cuda(head_dim, dtype):
  """Production shapes with the default tiles (lowering only: far too big for interpret mode)."""
  q, k, v = random_qkv(0, 1, 1024, 1024, 4, 2, head_dim, dtype)
  seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 256)[None]
  for mask in (Mask(causal=True), Mask(causal=True, window=(255, 0)),
               Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)):
    fwd = _pallas(mask, block_sizes=None, interpret=False)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert text.count("xla.gpu.triton") == 3


# --- block sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,match", [
    (dict(block_q=8), ">= 16"),
    (dict(block_kv_dq=8), ">= 16"),
    (dict(block_q=512, block_kv=512), "shared memory"),
    (dict(block_kv_bwd=1024), "shared memory"),
])
def test_invalid_block_sizes_raise_before_lowering(sizes, match):
  q, k, v = random_qkv(0, 1, 64, 64, 2, 2, 128, jnp.bfloat16)
  block_sizes = dataclasses.replace(BlockSizes.default_pallas(128, jnp.bfloat16), **sizes)
  with pytest.raises(ValueError, match=match):
    jax.jit(_pallas(Mask(causal=True), block_sizes, interpret=False)).trace(q, k, v)


@pytest.mark.parametrize("value", [0, 24, 100])
def test_block_sizes_must_be_powers_of_two(value):
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=value)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_default_pallas_block_sizes_validate(head_dim, dtype):
  BlockSizes.default_pallas(head_dim, dtype).validate_pallas(head_dim, dtype)


# --- schedules: exactly the visible tiles, and no mask where none is needed -----------------------


def _visible_tiles(case: Case, bq: int, bk: int):
  """Dense `[B, nq, nk]` any-visible / all-visible (no padded key) per tile, from the mask."""
  q, k, _, mask = case.inputs(jnp.float32)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  nq, nk = tiles.cdiv(t, bq), tiles.cdiv(s, bk)
  dense = np.zeros((b, nq * bq, nk * bk), bool)
  dense[:, :t, :s] = np.asarray(masks_lib.dense_mask(mask, b, t, s))
  blocks = dense.reshape(b, nq, bq, nk, bk)
  any_vis = blocks.any(axis=(2, 4))
  pos_only = Mask(causal=mask.causal, window=mask.window, q_offset=mask.q_offset)
  dense_pos = np.zeros_like(dense)
  dense_pos[:, :, :s] = np.asarray(masks_lib.dense_mask(pos_only, b, nq * bq, s))
  pos_blocks = dense_pos.reshape(b, nq, bq, nk, bk)
  # any_pos counts padded query rows too: kernels bound loops by positions, rows included.
  return mask, b, t, s, any_vis, pos_blocks.any(axis=(2, 4)), pos_blocks.all(axis=(2, 4))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_schedules_cover_visible_tiles(case):
  bq, bk = 16, 16
  mask, b, t, s, any_vis, any_pos, all_vis = _visible_tiles(case, bq, bk)
  offsets = masks_lib.q_offsets(mask, b)
  tabs = ()
  if mask.has_segments:
    tabs = (tiles.segment_table(mask.q_segment_ids, bq), tiles.segment_table(mask.kv_segment_ids,
                                                                               bk))
  nq, nk = any_vis.shape[1:]
  for sched, axis in ((tiles.q_major_schedule(mask, offsets, nq, bq, s, bk, *tabs), 2),
                      (tiles.kv_major_schedule(mask, offsets, nk, bk, s, t, bq, *tabs), 1)):
    sched = np.asarray(sched)
    lo, hi, full_lo, full_hi = (sched[:, r, :, None] for r in range(4))
    idx = np.arange(any_vis.shape[axis])[None, None]
    visited, unmasked = (lo <= idx) & (idx < hi), (full_lo <= idx) & (idx < full_hi)
    if axis == 1:
      visited, unmasked = visited.transpose(0, 2, 1), unmasked.transpose(0, 2, 1)
    assert np.all(visited[any_vis]), "a tile with visible keys is skipped"
    assert np.all(all_vis[unmasked]), "a tile that needs the mask is visited unmasked"
    if not mask.has_segments:  # position masks: contiguous, so the ranges are exact
      np.testing.assert_array_equal(visited, any_pos)


def test_window_costs_linear_in_length():
  """Tiles visited at 64K tokens, default forward tiles: window 4096 vs causal (goal: >= 8x)."""
  length, (bq, bk) = 65536, (128, 64)
  offsets = jnp.zeros((1,), jnp.int32)
  count = lambda m: int(np.sum(np.diff(np.asarray(
      tiles.q_major_schedule(m, offsets, length // bq, bq, length, bk))[:, :2], axis=1)))
  causal, window = count(Mask(causal=True)), count(masks_lib.local_mask(4096))
  assert causal / window > 7.5, (causal, window)
  assert window <= (length // bq) * (4096 // bk + 3)
