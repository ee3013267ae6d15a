"""Top-k gather attention (XLA + Pallas) and DSA against dense references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import Mask, SparseBlockSizes, indexer, reference_attention, sparse
from attention.masks import dense_mask
from tests.helpers import assert_close, random_qkv, random_segments, vjp_of


def jit_vjp(fn, q, k, v):
  """`vjp_of` compiled as one program (eager op-by-op dispatch is slow on CPU)."""
  return jax.jit(lambda q, k, v: vjp_of(fn, q, k, v))(q, k, v)


def selected_reference(q, k, v, indices, mask):
  """Dense softmax over exactly the selected, visible keys (duplicates removed)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  idx = np.asarray(indices)
  if idx.ndim == 3:
    idx = np.repeat(idx[:, :, None], kh, axis=2)
  chosen = np.zeros((b, t, kh, s + 1), bool)
  bi, ti, xi, _ = np.indices(idx.shape)
  chosen[bi, ti, xi, np.where(idx >= 0, idx, s)] = True
  visible = chosen[..., :s] & np.asarray(dense_mask(mask, b, t, s))[:, :, None]  # B T K S
  g = n // kh

  def fn(q, k, v):
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q.reshape(b, t, kh, g, h), k) * h ** -0.5
    logits = jnp.where(visible[:, :, :, None], logits, -jnp.inf)
    m = jnp.max(logits, -1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, -1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    return jnp.einsum("BTKGS,BSKH->BTKGH", p, v).reshape(b, t, n, h)

  return fn


def random_indices(seed, shape, kv_len, minus_one=0.2):
  """Distinct random keys per row, some slots -1."""
  rng = np.random.default_rng(seed)
  rows = [rng.permutation(kv_len)[:shape[-1]] for _ in range(int(np.prod(shape[:-1])))]
  idx = np.stack(rows).reshape(shape)
  idx[rng.random(shape) < minus_one] = -1
  return jnp.asarray(idx, jnp.int32)


CASES = {  # (B, T, S, N, K, k, per_head, mask)
    "full": (2, 9, 13, 4, 4, 5, False, lambda b, t, s: Mask()),
    "causal_gqa": (2, 11, 11, 4, 2, 6, False, lambda b, t, s: Mask(causal=True)),
    "per_head_mqa_offset": (1, 7, 15, 4, 1, 4, True,
                            lambda b, t, s: Mask(causal=True, q_offset=s - t)),
    "per_head_window": (2, 10, 10, 6, 3, 5, True, lambda b, t, s: Mask(causal=True, window=(4, 0))),
    "segments": (2, 12, 12, 2, 2, 7, False, lambda b, t, s: Mask(
        causal=True, q_segment_ids=random_segments(2, b, t), kv_segment_ids=random_segments(2, b, s))),
}


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_matches_selected_reference(case, implementation):
  b, t, s, n, kh, top, per_head, make_mask = CASES[case]
  q, k, v = random_qkv(sum(map(ord, case)), b, t, s, n, kh, 8)
  indices = random_indices(len(case), (b, t, kh, top) if per_head else (b, t, top), s)
  mask = make_mask(b, t, s)
  fn = lambda q, k, v: sparse.sparse_attention(
      q, k, v, indices, mask=mask, implementation=implementation,
      interpret=implementation == "pallas",
      block_sizes=SparseBlockSizes(block_q=4) if implementation == "xla" else None)
  out, grads = jit_vjp(fn, q, k, v)
  want, want_grads = vjp_of(selected_reference(q, k, v, indices, mask), q, k, v)
  assert_close(out, want, err_msg="out")
  for name, got, ref in zip("qkv", grads, want_grads):
    assert_close(got, ref, grad=True, err_msg=f"d{name}")


def test_all_visible_keys_equal_reference_attention_bf16():
  b, t, n, kh = 2, 10, 4, 2
  q, k, v = random_qkv(11, b, t, t, n, kh, 16, jnp.bfloat16)
  indices = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t, t))  # all keys; causal cuts
  mask = Mask(causal=True)
  fn = lambda q, k, v: sparse.sparse_attention(q, k, v, indices, mask=mask)
  out, grads = jit_vjp(fn, q, k, v)
  want, want_grads = vjp_of(lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v)
  assert out.dtype == jnp.bfloat16
  assert_close(out, want, jnp.bfloat16)
  for got, ref in zip(grads, want_grads):
    assert_close(got, ref, jnp.bfloat16, grad=True)


def test_empty_rows_are_zero_not_nan():
  q, k, v = random_qkv(12, 1, 4, 6, 2, 2, 8)
  indices = jnp.array([[[-1, -1], [5, -1], [0, 1], [3, 3]]], jnp.int32)  # 5 is after query 1
  for implementation in ("xla", "pallas"):
    fn = lambda q, k, v: sparse.sparse_attention(q, k, v, indices, mask=Mask(causal=True),
                                                 implementation=implementation,
                                                 interpret=implementation == "pallas")
    out, grads = jit_vjp(fn, q, k, v)
    assert np.all(np.asarray(out)[0, :2] == 0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


@pytest.mark.parametrize("t", [9, pytest.param(24, marks=pytest.mark.slow)])
def test_dsa_with_large_top_k_equals_dense_causal(t):
  q, k, v = random_qkv(13, 2, t, t, 4, 2, 8)
  kq, kk, kw = jax.random.split(jax.random.key(t), 3)
  index_q = jax.random.normal(kq, (2, t, 2, 8))
  index_k = jax.random.normal(kk, (2, t, 8))
  index_w = jax.random.normal(kw, (2, t, 2))
  mask = Mask(causal=True)
  fn = lambda q, k, v: attention.get("dsa")(q, k, v, mask=mask, index_q=index_q,
                                             index_k=index_k, index_w=index_w, top_k=t + 3)
  out, grads = jit_vjp(fn, q, k, v)
  want, want_grads = vjp_of(lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v)
  assert_close(out, want)
  for got, ref in zip(grads, want_grads):
    assert_close(got, ref, grad=True)


def test_dsa_attends_to_indexer_selection_without_duplicates():
  b, t, top = 1, 20, 5
  q, k, v = random_qkv(14, b, t, t, 2, 1, 8)
  kq, kk, kw = jax.random.split(jax.random.key(0), 3)
  iq, ik, iw = (jax.random.normal(kq, (b, t, 2, 4)), jax.random.normal(kk, (b, t, 4)),
                jax.random.normal(kw, (b, t, 2)))
  mask = Mask(causal=True)
  indices = indexer.indexer_topk(iq, ik, iw, top_k=top, mask=mask)
  rows = np.asarray(indices).reshape(-1, top)
  for row in rows:
    kept = row[row >= 0]
    assert len(set(kept)) == len(kept)
  out = jax.jit(lambda q, k, v: attention.dsa_attention(q, k, v, mask=mask, index_q=iq, index_k=ik,
                                                     index_w=iw, top_k=top))(q, k, v)
  assert_close(out, selected_reference(q, k, v, indices, mask)(q, k, v))
  # The indexer gets no gradient through the selection.
  g = jax.jit(jax.grad(lambda a: attention.dsa_attention(
      q, k, v, mask=mask, index_q=a, index_k=ik, index_w=iw, top_k=top).sum()))(iq)
  assert np.all(np.asarray(g) == 0)


def _lower_cuda(fn, *args):
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("per_head", [False, True])
def test_pallas_lowers_for_cuda(per_head):
  q, k, v = random_qkv(15, 1, 8, 8, 4, 2, 16, jnp.bfloat16)
  indices = random_indices(3, (1, 8, 2, 3) if per_head else (1, 8, 3), 8)
  fn = lambda q, k, v: sparse.sparse_attention(q, k, v, indices, mask=Mask(causal=True),
                                               implementation="pallas")
  _lower_cuda(fn, q, k, v)
  _lower_cuda(lambda q, k, v: vjp_of(fn, q, k, v), q, k, v)


def test_bad_inputs_raise():
  q, k, v = random_qkv(16, 1, 4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="indices must have shape"):
    sparse.sparse_attention(q, k, v, jnp.zeros((1, 3, 2), jnp.int32))
  with pytest.raises(ValueError, match="indices must be integers"):
    sparse.sparse_attention(q, k, v, jnp.zeros((1, 4, 2), jnp.float32))
  with pytest.raises(ValueError, match="implementation must be one of"):
    sparse.sparse_attention(q, k, v, jnp.zeros((1, 4, 2), jnp.int32), implementation="cuda")
