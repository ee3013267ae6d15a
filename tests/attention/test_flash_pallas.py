"""Pallas flash attention kernels: CUDA lowering, tiles, schedules, kernel-specific cases.

The interpret-mode comparison with `reference_attention` runs in the shared grid
(test_grid.py, "flash_pallas_interpret", the short cases of tests/attention/grid.py); the same
short cases are lowered for CUDA here (forward and `jax.grad`), which is fast and catches
kernels that would not compile for Triton. Schedules are checked against the dense mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import BlockSizes, Mask, flash_attention, reference_attention
from attention import block_sizes as block_sizes_lib
from attention import masks as masks_lib
from attention.kernels import flash_pallas
from attention.kernels import flash_tiles as tiles
from attention.reference import reference_attention_with_lse
from tests.attention.grid import BY_NAME, CASES, DTYPE_CASES, Case
from tests.attention.triton_ir import triton_kernels
from tests.helpers import assert_close, random_qkv, random_segments

# Small tiles so that short sequences still span several blocks of each kind.
SMALL = BlockSizes(block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=32, block_q_dq=32,
                   block_kv_dq=16)


PALLAS_CASES = [c for c in CASES if c.small]


def _pallas(mask, block_sizes=SMALL, interpret=True, **options):
  return lambda q, k, v: flash_attention(q, k, v, mask=mask, implementation="pallas",
                                         block_sizes=block_sizes, interpret=interpret, **options)


# --- kernel-specific checks (the reference comparison over the grid is test_grid.py's) -----------


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


def _kernel_calls(text: str) -> int:
  """Triton kernels in a lowered module (jaxlib <= 0.10.2: `xla.gpu.triton`; newer: FFI)."""
  return text.count("__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi")


# The contract options' cases lower in f32 and bf16 through the two that hold all of them.
FEATURE_LOWER = ("alibi_decode_all", "alibi_bidir_segments", "sinks_window", "sinks_decode_all")
LOWER_CASES = ([(c, d) for c in PALLAS_CASES for d in (jnp.float32, jnp.bfloat16)
                if not c.features or c.name in FEATURE_LOWER]
               + [(BY_NAME[name], jnp.float16) for name in DTYPE_CASES])


def _output_sum(out) -> jax.Array:
  """A scalar loss from `out` or `(out, lse)` (with return_lse: through the lse too)."""
  if isinstance(out, tuple):
    out, lse = out
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
  return jnp.sum(out.astype(jnp.float32))


@pytest.mark.parametrize("case,dtype", LOWER_CASES,
                         ids=[f"{c.name}-{jnp.dtype(d).name}" for c, d in LOWER_CASES])
def test_lowers_for_cuda_forward_and_backward(case, dtype):
  q, k, v, mask = case.inputs(dtype)
  fwd = _pallas(mask, interpret=False, **case.options())
  assert _kernel_calls(_lower_for_cuda(fwd, q, k, v)) == 1
  loss = lambda q, k, v: _output_sum(fwd(q, k, v))
  text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  assert _kernel_calls(text) == 3  # forward (recomputed for residuals), dK/dV, dQ


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
    assert _kernel_calls(text) == 3


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["exact", "tf32"])
def test_triton_ir_dot_precision(allow_tf32):
  """float32 dots carry `ieee` (exact) unless TF32 is asked for; bf16 dots stay bf16 on tensor
  cores; with segment ids the loops hold no branch. Read from the Triton IR of the CUDA
  lowering (forward, dK/dV, dQ)."""
  for dtype, want in ((jnp.float32, "tf32" if allow_tf32 else "ieee"), (jnp.bfloat16, None)):
    q, k, v, mask = BY_NAME["segments_causal"].inputs(dtype)
    sizes = dataclasses.replace(SMALL, allow_tf32=allow_tf32)
    fwd = _pallas(mask, block_sizes=sizes, interpret=False)
    loss = lambda q, k, v, fwd=fwd: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    kernels = triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert [name.split("#")[0] for name in kernels] == ["flash_fwd", "flash_dkdv", "flash_dq"]
    for name, kernel in kernels.items():
      assert len(kernel.dots) >= 2, name
      # Segment ids: no branch around the K/V loads (nested scf.if is not software-pipelined).
      assert "scf.if" not in kernel.ops and kernel.ops.count("scf.for") >= 3, name
      for precision, lhs, rhs in kernel.dots:
        element = "f32" if dtype == jnp.float32 else "bf16"
        assert lhs.endswith(f"x{element}>") and rhs.endswith(f"x{element}>"), (name, lhs, rhs)
        if want:
          assert precision == want, (name, precision)


def test_allow_tf32_interpret_matches_reference():
  """The TF32 option runs the same kernels (exact on CPU: the interpreter ignores TF32)."""
  q, k, v, mask = BY_NAME["len_7"].inputs(jnp.float32)
  got = _pallas(mask, dataclasses.replace(SMALL, allow_tf32=True))(q, k, v)
  assert_close(got, reference_attention(q, k, v, mask=mask))


def test_allow_tf32_is_pallas_only():
  q, k, v, mask = BY_NAME["causal"].inputs(jnp.float32)
  with pytest.raises(ValueError, match="allow_tf32"):
    flash_attention(q, k, v, mask=mask, implementation="xla",
                    block_sizes=BlockSizes(allow_tf32=True))


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
  sizes = BlockSizes.default_pallas(head_dim, dtype).validate_pallas(head_dim, dtype)
  for kernel, size in sizes.shared_memory_bytes(head_dim, dtype).items():
    assert size <= block_sizes_lib.DEFAULT_SHARED_MEMORY_BUDGET, (kernel, size)


def test_float32_head_dim_128_forward_budget():
  """float32 d128 forward: 128x64 tiles with 2 stages = 192 KiB (3 stages would not fit)."""
  sizes = BlockSizes.default_pallas(128, jnp.float32)
  assert (sizes.block_q, sizes.block_kv) == (128, 64)
  assert sizes.pallas_launch("fwd", 128, jnp.float32)[1] == 2
  assert sizes.pallas_launch("fwd", 128, jnp.bfloat16)[1] == 3
  assert sizes.shared_memory_bytes(128, jnp.float32)["fwd"] == 192 * 1024


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
  pos_only = Mask(causal=mask.causal, window=mask.window, q_offset=mask.q_offset,
                  sinks=mask.sinks)
  dense_pos = np.zeros_like(dense)
  dense_pos[:, :, :s] = np.asarray(masks_lib.dense_mask(pos_only, b, nq * bq, s))
  pos_blocks = dense_pos.reshape(b, nq, bq, nk, bk)
  # any_pos counts padded query rows too: kernels bound loops by positions, rows included.
  return mask, b, t, s, any_vis, pos_blocks.any(axis=(2, 4)), pos_blocks.all(axis=(2, 4))


@pytest.mark.parametrize("case", PALLAS_CASES, ids=lambda c: c.name)
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
    if sched.shape[1] == 5:  # sinks: the blocks [0, sink_hi) before the band
      assert axis == 2 and mask.sinks
      visited |= idx < np.minimum(sched[:, 4, :, None], lo)
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
