"""MoBA: the gate against a NumPy transcription of the paper's rule, the attention against the
reference under the mask of that selection (values and gradients, XLA and Pallas interpret),
and what it refuses. With every block selected MoBA is dense causal attention: test_grid.py
("registered_moba") checks that over the shared grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import Mask, moba
from attention.reference import reference_attention_with_lse
from tests.attention.test_sparse import jit_vjp
from tests.helpers import assert_close, random_qkv, random_segments, vjp_of


def paper_selection(q, k, block_size: int, moba_topk: int, q_offset: int = 0) -> np.ndarray:
  """`[B, T, K, nbk]` bool: the blocks each query attends, by MoBA's rule as MoonshotAI's
  `moba_naive` writes it: gate = q . mean(k of block), -inf on blocks not entirely before the
  query's own block, +inf on the own block, the top `moba_topk` blocks (the own one included)
  whose gate is not -inf. float64; GQA: the group's gate is the sum of its heads' gates."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  nbk = -(-s // block_size)
  means = np.stack([k[:, j * block_size:(j + 1) * block_size].mean(axis=1) for j in range(nbk)],
                   axis=1)  # B nbk K H
  gate = np.einsum("btkh,bjkh->btkj", q.reshape(b, t, kh, n // kh, h).sum(3), means)
  own = (q_offset + np.arange(t)) // block_size  # T
  later = np.arange(nbk)[None, :] >= own[:, None]  # T nbk: not causally complete
  gate = np.where(later[None, :, None], -np.inf, gate)
  gate = np.where((np.arange(nbk)[None, :] == own[:, None])[None, :, None], np.inf, gate)
  order = np.argsort(-gate, axis=-1, kind="stable")[..., :moba_topk]
  chosen = np.zeros(gate.shape, bool)
  np.put_along_axis(chosen, order, True, axis=-1)
  return chosen & (gate > -np.inf)


def _as_sets(block_ids) -> np.ndarray:
  ids = np.asarray(block_ids)
  out = np.empty(ids.shape[:-1], object)
  for index in np.ndindex(ids.shape[:-1]):
    out[index] = frozenset(int(x) for x in ids[index] if x >= 0)
  return out


@pytest.mark.parametrize("heads,kv_heads,q_offset", [(2, 2, 0), (4, 2, 0), (4, 1, 13)],
                         ids=["mha", "gqa", "mqa-offset"])
def test_gate_matches_the_paper_rule(heads, kv_heads, q_offset):
  b, t, bs, top = 2, 50, 8, 2
  q, k, _ = random_qkv(heads + q_offset, b, t, t + q_offset, heads, kv_heads, 16)
  got = moba.moba_gate(q, k, block_size=bs, top_k_blocks=top, mask=Mask(causal=True,
                                                                          q_offset=q_offset))
  assert got.shape == (b, t, kv_heads, top + 1)
  want = paper_selection(q, k, bs, top + 1, q_offset)  # their moba_topk counts the own block
  want_sets = np.empty(want.shape[:-1], object)
  for index in np.ndindex(want.shape[:-1]):
    want_sets[index] = frozenset(np.flatnonzero(want[index]).tolist())
  assert (_as_sets(got) == want_sets).all()


def test_gate_respects_window_and_segments():
  """A gated block always reaches into the window and holds the query's segment."""
  b, t, bs = 1, 64, 4
  q, k, _ = random_qkv(3, b, t, t, 2, 1, 8)
  seg = random_segments(5, b, t, 3)
  mask = Mask(causal=True, window=(23, 0), q_segment_ids=seg, kv_segment_ids=seg)
  ids = np.asarray(moba.moba_gate(q, k, block_size=bs, top_k_blocks=3, mask=mask))[0, :, 0, :3]
  seg = np.asarray(seg)[0]
  for i, row in enumerate(ids):
    for j in row[row >= 0]:
      assert (j + 1) * bs - 1 >= i - 23 and seg[i] in seg[j * bs:(j + 1) * bs], (i, row)


def test_moba_matches_reference_under_its_selection():
  """MoBA == dense attention restricted (causal mask AND the paper's selection). (The Pallas
  kernels on per-kv-head block lists: test_block_sparse.py.)"""
  b, t, n, kh, bs, top = 2, 50, 4, 2, 8, 2
  q, k, v = random_qkv(21, b, t, t, n, kh, 8)
  mask = Mask(causal=True)
  fn = lambda q, k, v: attention.get("moba")(q, k, v, mask=mask, block_size=bs,
                                             top_k_blocks=top)
  out, grads = jit_vjp(fn, q, k, v)
  chosen = paper_selection(q, k, bs, top + 1)  # B T K nbk
  selected = jnp.asarray(np.repeat(chosen, bs, axis=-1)[..., :t].transpose(0, 2, 1, 3))
  ref = lambda q, k, v: reference_attention_with_lse(q, k, v, mask=mask, selected=selected)[0]
  want, want_grads = vjp_of(ref, q, k, v)
  assert_close(out, want, err_msg="out")
  for name, got, expected in zip("qkv", grads, want_grads):
    assert_close(got, expected, grad=True, err_msg=f"d{name}")
  # Sparse for real: some visible keys were left out.
  assert np.any(~np.asarray(selected) & np.tril(np.ones((t, t), bool)))


def test_moba_refuses_what_it_cannot_honour():
  q, k, v = random_qkv(22, 1, 16, 16, 2, 1, 8)
  moba_fn = attention.get("moba")
  with pytest.raises(ValueError, match="needs a causal mask"):
    moba_fn(q, k, v, mask=Mask(window=(4, 4)))
  with pytest.raises(ValueError, match="needs a causal mask"):
    moba_fn(q, k, v)
  with pytest.raises(ValueError, match="alibi_slopes"):
    moba_fn(q, k, v, mask=Mask(causal=True), alibi_slopes=jnp.ones(2))
  with pytest.raises(ValueError, match="top_k_blocks must be an int >= 0"):
    moba_fn(q, k, v, mask=Mask(causal=True), top_k_blocks=-1)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    moba_fn(q, k, v, mask=Mask(causal=True), block_size=2.5)


def test_own_block_only_is_blockwise_local_attention():
  """top_k_blocks = 0: each query sees its own block only (block-diagonal causal attention)."""
  q, k, v = random_qkv(23, 1, 20, 20, 2, 2, 8)
  got = jax.jit(lambda q, k, v: moba.moba_attention(q, k, v, mask=Mask(causal=True), block_size=8,
                                                     top_k_blocks=0))(q, k, v)
  ids = jnp.arange(20) // 8
  mask = Mask(causal=True, q_segment_ids=ids[None], kv_segment_ids=ids[None])
  assert_close(got, attention.reference_attention(q, k, v, mask=mask))
