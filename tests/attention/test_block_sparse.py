"""Block-sparse attention (XLA + Pallas interpret) against its dense oracle, values and gradients;
the effective block lists; what the Triton IR of the CUDA lowering holds.

The oracle is `block_sparse_reference`: `reference_attention` under the mask AND the selected
keys (`block_sparse_mask`). Every-block selections equal dense attention: the shared grid
(tests/attention/test_grid.py) runs those. Interpret mode is slow: tiny shapes, one jit each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import BlockSparseBlockSizes, Mask, block_sparse, selection
from tests.attention.test_sparse import jit_vjp
from tests.attention.triton_ir import triton_kernels
from tests.helpers import assert_close, random_qkv, random_segments


def random_block_indices(seed, shape, num_blocks, minus_one=0.2):
  """Random block ids (repeats allowed: they must count once), some slots -1."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, num_blocks, shape)
  idx[rng.random(shape) < minus_one] = -1
  return jnp.asarray(idx, jnp.int32)


def _segments(b, t, s):
  return dict(q_segment_ids=random_segments(4, b, t, 3), kv_segment_ids=random_segments(4, b, s, 3))


# (B, T, S, N, K, Hv, nb, per_head, mask kwargs, options); few programs (B * T * K) per case:
# interpret mode runs them one by one.
CASES = {
    # MQA (G = 4), blocks shared by the heads, cut by the diagonal and by packed documents;
    # Hv != H, soft-cap and the lse (its gradient too).
    "segments_features": (1, 40, 40, 4, 1, 24, 3, False,
                          lambda b, t, s: dict(causal=True, **_segments(b, t, s)),
                          dict(logits_soft_cap=1.5, return_lse=True)),
    # One list per kv head, a causal window cutting blocks, queries after cached keys (per-row
    # offsets), a short last block.
    "window_offsets": (2, 9, 50, 4, 2, None, 3, True,
                       lambda b, t, s: dict(causal=True, window=(20, 0),
                                            q_offset=jnp.array([41, 30], jnp.int32)), {}),
}


def _inputs(case, dtype=jnp.float32):
  b, t, s, n, kh, hv, nb, per_head, mask_kw, _ = CASES[case]
  q, k, v = random_qkv(sum(map(ord, case)), b, t, s, n, kh, 8, dtype)
  if hv is not None:
    v = jax.random.normal(jax.random.key(len(case)), (b, s, kh, hv)).astype(dtype)
  return q, k, v, Mask(**mask_kw(b, t, s)), (b, t, kh, nb) if per_head else (b, t, nb), s


def _vjp_with_lse(fn, q, k, v):
  """`jit_vjp` for functions returning `out` or `(out, lse)` (random cotangents for both)."""
  def wrapped(q, k, v):
    out = fn(q, k, v)
    if isinstance(out, tuple):
      out, lse = out
      out = out + 0.3 * jnp.swapaxes(jnp.where(jnp.isfinite(lse), lse, 0.0), 1, 2)[..., None]
    return out
  return jit_vjp(wrapped, q, k, v)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_block_sparse_reference(case, implementation):
  q, k, v, mask, shape, s = _inputs(case)
  options = CASES[case][-1]
  bs = 16 if implementation == "pallas" else 8
  indices = random_block_indices(len(case), shape, -(-s // bs))
  sizes = BlockSparseBlockSizes(block_entries=4) if implementation == "xla" else (
      BlockSparseBlockSizes(block_rows=16))
  fn = lambda q, k, v: block_sparse.block_sparse_attention(
      q, k, v, indices, block_size=bs, mask=mask, implementation=implementation,
      interpret=implementation == "pallas", block_sizes=sizes, **options)
  ref = lambda q, k, v: block_sparse.block_sparse_reference(q, k, v, indices, block_size=bs,
                                                            mask=mask, **options)
  out, grads = _vjp_with_lse(fn, q, k, v)
  want, want_grads = _vjp_with_lse(ref, q, k, v)
  assert_close(out, want, err_msg="out")
  for name, got, expected in zip("qkv", grads, want_grads):
    assert_close(got, expected, grad=True, err_msg=f"d{name}")


def test_bf16_pallas_matches_reference():
  q, k, v, mask, shape, s = _inputs("window_offsets", jnp.bfloat16)
  indices = random_block_indices(1, shape, -(-s // 16))
  fn = lambda q, k, v: block_sparse.block_sparse_attention(
      q, k, v, indices, block_size=16, mask=mask, implementation="pallas", interpret=True)
  out, grads = jit_vjp(fn, q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want, want_grads = jit_vjp(lambda q, k, v: block_sparse.block_sparse_reference(
      q, k, v, indices, block_size=16, mask=mask), *f32)
  assert out.dtype == jnp.bfloat16
  assert_close(out, want, jnp.bfloat16)
  for got, expected in zip(grads, want_grads):
    assert_close(got, expected, jnp.bfloat16, grad=True)


def test_effective_block_indices_sorted_distinct_and_visible():
  """Duplicates and out-of-range ids dropped, blocks the positions hide dropped, the rest sorted
  first; -1 after them."""
  idx = jnp.array([[[3, 1, 3, -1], [0, 7, 0, 2], [2, 2, 2, 2]]], jnp.int32)  # B=1, T=3, nb=4
  # Queries at positions 40..42 (q_offset 40), causal window of 12: keys 28..42, blocks 3..5 of 8.
  mask = Mask(causal=True, window=(12, 0), q_offset=40)
  got = block_sparse.effective_block_indices(idx, mask, 8, 1, 3, 48, 2)
  assert got.shape == (1, 3, 1, 4)
  assert got[0, :, 0].tolist() == [[3, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]]
  got = block_sparse.effective_block_indices(idx, Mask(), 8, 1, 3, 48, 2)  # 7 >= 6 blocks
  assert got[0, :, 0].tolist() == [[1, 3, -1, -1], [0, 2, -1, -1], [2, -1, -1, -1]]


def test_chunk_table_cuts_each_blocks_entries():
  """The XLA backward's chunks: at most `be` entries, one key block each, every entry once."""
  idx = jnp.array([[[[0, 2]], [[0, 2]], [[0, -1]], [[2, 1]], [[0, 2]]]], jnp.int32)  # B T X nb
  entry_t, _, ptr = selection.inverted_selection(idx, 3, 1, 2)
  assert ptr.tolist() == [[[0, 4, 5, 9]]]
  chunks = selection.num_chunks(10, 3, 2)
  block, start, end = (np.asarray(x)[0, 0] for x in selection.chunk_table(ptr, 2, chunks))
  used = start < end
  assert block[used].tolist() == [0, 0, 1, 2, 2]
  assert [np.asarray(entry_t)[0, 0, a:b].tolist() for a, b in zip(start[used], end[used])] == [
      [0, 1], [2, 4], [3], [0, 1], [3, 4]]
  assert np.all(start[~used] == 9) and np.all(end[~used] == 9)


def test_rows_with_nothing_visible_are_zero_not_nan():
  """XLA path (the Pallas kernels' empty rows: test_grid.py's "lse_no_key_rows" case)."""
  q, k, v = random_qkv(12, 1, 4, 40, 2, 2, 8)
  # Query 0 selects nothing, query 1 a block after it, query 2 a block of another segment.
  idx = jnp.array([[[-1, -1], [2, -1], [0, -1], [0, 0]]], jnp.int32)
  seg = jnp.concatenate([jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 24), jnp.int32)], axis=1)
  mask = Mask(causal=True, q_offset=17, q_segment_ids=jnp.array([[1, 1, 1, 0]]),
              kv_segment_ids=seg)
  fn = lambda q, k, v: block_sparse.block_sparse_attention(
      q, k, v, idx, block_size=16, mask=mask, implementation="xla", return_lse=True)[0]
  out, grads = jit_vjp(fn, q, k, v)
  assert np.all(np.asarray(out)[0, :3] == 0) and np.all(np.asarray(out)[0, 3] != 0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_bad_inputs_raise():
  q, k, v = random_qkv(16, 1, 4, 32, 2, 2, 8)
  idx = jnp.zeros((1, 4, 2), jnp.int32)
  attend = block_sparse.block_sparse_attention
  with pytest.raises(ValueError, match="block_indices must have shape"):
    attend(q, k, v, jnp.zeros((1, 3, 2), jnp.int32), block_size=8)
  with pytest.raises(ValueError, match="block_indices must be integers"):
    attend(q, k, v, jnp.zeros((1, 4, 2)), block_size=8)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    attend(q, k, v, idx, block_size=0)
  with pytest.raises(ValueError, match="alibi_slopes"):
    attend(q, k, v, idx, block_size=8, alibi_slopes=jnp.ones(2))
  with pytest.raises(ValueError, match="power of two >= 16"):
    attend(q, k, v, idx, block_size=8, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="block_rows is not used by the 'xla'"):
    attend(q, k, v, idx, block_size=8, block_sizes=BlockSparseBlockSizes(block_rows=16))
  with pytest.raises(ValueError, match="block_rows must be a power of two"):
    BlockSparseBlockSizes(block_rows=8)


def _lowering_inputs(dtype):
  """Odd lengths, segments, a window and an offset, Hv = 40 != H = 24 (both padded), G = 4."""
  b, t, s, kh = 1, 37, 45, 2
  q, k, _ = random_qkv(5, b, t, s, 4 * kh, kh, 24, dtype)
  v = jax.random.normal(jax.random.key(6), (b, s, kh, 40)).astype(dtype)
  mask = Mask(causal=True, window=(20, 0), q_offset=8, q_segment_ids=random_segments(1, b, t, 3),
              kv_segment_ids=random_segments(2, b, s, 3))
  return q, k, v, mask, random_block_indices(7, (b, t, kh, 3), 3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_ir_tensor_cores_and_no_atomics(dtype):
  """Forward, dQ and dK/dV (through out and lse, with soft-cap and segments) lower for CUDA to
  `tt.dot`s on the input dtype with >= 16 rows, float32 ones exact (`ieee`), and no atomics."""
  q, k, v, mask, indices = _lowering_inputs(dtype)

  def loss(q, k, v):
    out, lse = block_sparse.block_sparse_attention(
        q, k, v, indices, block_size=16, mask=mask, logits_soft_cap=2.0, return_lse=True,
        implementation="pallas")
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  kernels = triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  assert [name.split("#")[0] for name in kernels] == [
      "block_sparse_attention_fwd", "block_sparse_attention_dq", "block_sparse_attention_dkdv"]
  element = "f32" if dtype == jnp.float32 else "bf16"
  for name, kernel in kernels.items():
    assert not [op for op in kernel.ops if "atomic" in op], name
    assert len(kernel.dots) >= 2, name
    for precision, lhs, rhs in kernel.dots:
      assert lhs.endswith(f"x{element}>") and rhs.endswith(f"x{element}>"), (name, lhs, rhs)
      assert int(lhs.split("<")[1].split("x")[0]) >= 16, (name, lhs)
      assert precision == "ieee" or dtype != jnp.float32, (name, precision)
