"""Lightning indexer: scores, exact blockwise top-k, FP8 path, KL loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import attention
from attention import Mask, fp8, indexer, topk
from attention.masks import dense_mask
from tests.helpers import assert_close, random_qkv, random_segments


def random_indexer(seed: int, batch: int, q_len: int, kv_len: int, heads: int = 3, dim: int = 8):
  kq, kk, kw = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, q_len, heads, dim)),
          jax.random.normal(kk, (batch, kv_len, dim)),
          jax.random.normal(kw, (batch, q_len, heads)) * heads ** -0.5)


MASKS = {
    "none": lambda b, t, s: Mask(),
    "causal": lambda b, t, s: Mask(causal=True),
    "window": lambda b, t, s: Mask(causal=True, window=(9, 0)),
    "offset": lambda b, t, s: Mask(causal=True, q_offset=jnp.array([s - t, 2])[:b]),
    "segments": lambda b, t, s: Mask(causal=True, q_segment_ids=random_segments(1, b, t),
                                     kv_segment_ids=random_segments(1, b, s)),
}


def test_scores_formula():
  q, k, w = random_indexer(0, 2, 5, 7)
  got = indexer.indexer_scores(q, k, w)
  want = np.einsum("btj,btjs->bts", np.asarray(w),
                   np.maximum(np.einsum("btjd,bsd->btjs", np.asarray(q), np.asarray(k)), 0))
  assert_close(got, want)
  causal = indexer.indexer_scores(q, k, w, mask=Mask(causal=True))
  assert np.all(np.isneginf(np.asarray(causal)[~np.asarray(dense_mask(Mask(causal=True), 2, 5, 7))]))


@pytest.mark.parametrize("mask_name,top_k", [(name, 6) for name in MASKS] +
                         [("causal", 1), ("none", 40), ("window", 40)])
def test_topk_is_exact_set(mask_name, top_k):
  b, t, s = 2, 37, 37 if mask_name != "offset" else 45
  q, k, w = random_indexer(1, b, t, s)
  mask = MASKS[mask_name](b, t, s)
  scores = np.asarray(indexer.indexer_scores(q, k, w, mask=mask)).reshape(b * t, s)
  topk_fn = jax.jit(indexer.indexer_topk, static_argnames=("top_k", "block_q", "num_widths"))
  got = np.asarray(topk_fn(q, k, w, top_k=top_k, mask=mask, block_q=8, num_widths=4))
  assert got.shape == (b, t, top_k) and got.dtype == np.int32
  got = got.reshape(b * t, top_k)
  n_visible = np.isfinite(scores).sum(-1)
  kk = np.minimum(top_k, n_visible)
  # lax.top_k of the dense scores; ties (ReLU zeros) go to lower positions in both.
  want = np.asarray(jax.lax.top_k(jnp.asarray(scores), min(top_k, s))[1])
  for row, sel, ref, n in zip(scores, got, want, kk):
    assert np.all(sel[n:] == -1)
    assert np.all(np.diff(sel[:n]) > 0)  # ascending, hence no duplicates
    assert set(sel[:n]) == set(ref[:n])


def test_topk_matches_lax_top_k_random_rows():
  r, w, k = 12, 3000, 257
  scores = jax.random.normal(jax.random.key(3), (r, w)) * jnp.exp(
      jax.random.normal(jax.random.key(4), (r, 1)) * 3)  # no ties, varied scales and signs
  visible = jnp.ones((r, w), bool)
  got = jax.jit(lambda s, v: topk.select_topk(s, v, k))(scores, visible)
  np.testing.assert_array_equal(got, np.sort(lax.top_k(scores, k)[1], axis=-1))


def lexsort_topk(scores, visible, k):
  """NumPy reference: visible positions by score descending, then position ascending."""
  out = np.full((len(scores), k), -1, np.int32)
  for i, (row, vis) in enumerate(zip(scores, visible)):
    pos = np.flatnonzero(vis)
    order = np.sort(pos[np.lexsort((pos, -row[pos]))][:k])
    out[i, :len(order)] = order
  return out


@pytest.mark.parametrize("k", [1, 100, 700])
def test_select_long_rows_with_ties_and_hidden_keys(k):
  """Rows long enough for the sampled starting bracket; many ties, random visibility."""
  r, w = 6, 2048
  rng = np.random.default_rng(k)
  scores = np.round(rng.normal(size=(r, w)) * 4) / 4  # ~25 distinct values: heavy ties
  scores[1] *= 1e-30  # tiny magnitudes
  visible = rng.random((r, w)) < np.array([1.0, 0.9, 0.5, 0.3, 0.05, 0.0])[:, None]
  got = jax.jit(lambda s, v: topk.select_topk(s, v, k))(jnp.asarray(scores, jnp.float32), visible)
  np.testing.assert_array_equal(got, lexsort_topk(scores.astype(np.float32), visible, k))


def test_select_long_rows_through_candidates_and_fallback():
  """Rows of W >= 4 candidate_cap(k) are first cut to the keys above a sampled threshold:
  random rows equal lax.top_k's set, rows with ties / hidden keys / fewer than k visible the
  lexsort reference. Then row 3's strided sample (every 32nd position) holds only the smallest
  scores, so its threshold keeps the whole row (> cap): all rows fall back to the direct path."""
  k = 64
  w = 4 * topk.candidate_cap(k) + 7  # not a multiple of 32
  rng = np.random.default_rng(11)
  scores = rng.normal(size=(5, w)).astype(np.float32)
  scores[1] = np.round(scores[1] * 64) / 64  # ties
  scores[2] = np.round(scores[2] * 4) / 4  # heavy ties: many equal to the threshold
  visible = rng.random((5, w)) < np.array([1.0, 1.0, 0.6, 1.0, 0.01])[:, None]  # row 4: < k
  select = jax.jit(lambda s, v: topk.select_topk(s, v, k))
  got = np.asarray(select(scores, visible))
  np.testing.assert_array_equal(got[[0, 3]], np.sort(lax.top_k(scores[[0, 3]], k)[1], axis=-1))
  np.testing.assert_array_equal(got, lexsort_topk(scores, visible, k))
  scores[3, ::32] = -1e3 - np.arange(len(scores[3, ::32]))
  np.testing.assert_array_equal(select(scores, visible), lexsort_topk(scores, visible, k))


def test_select_ties_keep_exactly_k():
  scores = jnp.array([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0, -1.0],
                      [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
  visible = jnp.array([[True] * 7, [True, False, True, True, True, True, True]])
  got = jax.jit(lambda s, v: topk.select_topk(s, v, 4))(scores, visible)
  np.testing.assert_array_equal(got, [[0, 1, 2, 4], [0, 2, 3, 4]])


def test_topk_pads_with_minus_one_and_no_visible_rows():
  q, k, w = random_indexer(5, 1, 6, 6)
  seg = jnp.array([[0, 0, -1, 1, 1, 1]])
  got = np.asarray(indexer.indexer_topk(q, k, w, top_k=4, block_q=4, mask=Mask(
      causal=True, q_segment_ids=seg, kv_segment_ids=seg)))
  assert np.all(got[0, 2] == -1)  # a padding query sees nothing
  np.testing.assert_array_equal(got[0, 0], [0, -1, -1, -1])
  np.testing.assert_array_equal(got[0, 5], [3, 4, 5, -1])


@pytest.mark.slow
def test_topk_memory_at_32k_is_blockwise():
  t, top_k = 32768, 2048
  args = (jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32),
          jax.ShapeDtypeStruct((1, t, 32), jnp.float32),
          jax.ShapeDtypeStruct((1, t, 4), jnp.float32))
  fn = lambda q, k, w: indexer.indexer_topk(q, k, w, top_k=top_k, mask=Mask(causal=True))
  temp = jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp < 1 << 30, temp
  assert temp < t * t * 4 // 8  # far from the O(T * S) dense scores


def test_fp8_close_to_float32():
  q, k, w = random_indexer(6, 1, 64, 64, heads=4, dim=32)
  exact = indexer.indexer_scores(q, k, w, mask=Mask(causal=True))
  approx = indexer.indexer_scores(q, k, w, mask=Mask(causal=True), fp8=True)
  finite = np.isfinite(np.asarray(exact))
  np.testing.assert_array_equal(finite, np.isfinite(np.asarray(approx)))
  err = np.abs(np.asarray(approx)[finite] - np.asarray(exact)[finite])
  assert err.max() < 0.15 * np.abs(np.asarray(exact)[finite]).max()
  overlap = float(indexer.topk_overlap(q, k, w, top_k=16, mask=Mask(causal=True)))
  assert 0.85 <= overlap <= 1.0
  # Keys already in FP8 (as the decode cache holds them) score the same as float keys.
  keys = fp8.quantize_fp8(k, block=32)
  assert keys.values.dtype == jnp.float8_e4m3fn and keys.scale.shape == (*k.shape[:-1], 1)
  assert_close(indexer.indexer_scores(q, keys, w, mask=Mask(causal=True), fp8=True), approx)
  with pytest.raises(ValueError, match="FP8 with block 32"):
    indexer.indexer_scores(q, keys, w, fp8=fp8.Fp8Format(block=16))


@pytest.mark.parametrize("fmt", [None, fp8.Fp8Format(64), fp8.Fp8Format(32)],
                         ids=["f32", "fp8-1-block", "fp8-2-blocks"])
def test_one_query_scores_and_topk_match_the_formula(fmt):
  """T = 1 (a decode step) scores keys-major: equal to the NumPy formula on the dequantised
  FP8 inputs (one or two scale blocks per vector) or on float32; top-k = lax.top_k's set."""
  q, k, w = random_indexer(13, 2, 1, 300, heads=3, dim=64)
  mask = Mask(causal=True, q_offset=jnp.array([299, 150]))
  got = jax.jit(lambda q, k, w: indexer.indexer_scores(q, k, w, mask=mask, fp8=fmt or False))(
      q, k, w)
  qd, kd = (q, k) if fmt is None else (fp8.quantize(q, fmt).dequantize(),
                                       fp8.quantize(k, fmt).dequantize())
  want = np.einsum("btj,btjs->bts", np.asarray(w), np.maximum(
      np.einsum("btjd,bsd->btjs", np.asarray(qd), np.asarray(kd)), 0))
  visible = np.arange(300)[None, None] <= np.array([299, 150])[:, None, None]
  np.testing.assert_array_equal(np.isfinite(np.asarray(got)), visible)
  assert_close(np.where(visible, got, 0), np.where(visible, want, 0))
  if fmt == fp8.Fp8Format(64):  # the selection does not depend on the format: check it once
    top = jax.jit(lambda q, k, w: indexer.indexer_topk(q, k, w, top_k=20, mask=mask, fp8=fmt))(
        q, k, w)
    np.testing.assert_array_equal(top[:, 0], np.sort(lax.top_k(got[:, 0], 20)[1], axis=-1))


def test_kl_zero_when_equal_and_never_nan():
  q, k, w = random_indexer(7, 2, 9, 9)
  mask = Mask(causal=True, q_segment_ids=jnp.array([[0] * 4 + [-1] * 5, [1] * 9]),
              kv_segment_ids=jnp.array([[0] * 4 + [-1] * 5, [1] * 9]))
  scores = indexer.indexer_scores(q, k, w, mask=mask)
  target = jax.nn.softmax(jnp.where(jnp.isfinite(scores), scores, -1e30), axis=-1)
  target = jnp.where(jnp.isfinite(scores), target, 0.0)
  loss, grad = jax.value_and_grad(indexer.indexer_kl_loss)(scores, target)
  assert abs(float(loss)) < 1e-6
  assert np.all(np.isfinite(np.asarray(grad)[np.isfinite(np.asarray(scores))]))
  other = indexer.indexer_kl_loss(scores, jnp.where(jnp.isfinite(scores), 1.0, 0.0))
  assert float(other) > 0 and np.isfinite(float(other))
  rows = indexer.indexer_kl_loss(scores, target, reduction="none")
  assert rows.shape == (2, 9) and np.all(np.isfinite(np.asarray(rows)))


def test_kl_dense_and_sparse_targets():
  q_main, k_main, _ = random_qkv(8, 1, 12, 12, 4, 2, 8)
  mask = Mask(causal=True)
  target = attention.attention_target(q_main, k_main, mask=mask)
  np.testing.assert_allclose(np.asarray(target).sum(-1), 1.0, rtol=1e-5)
  # The target is the head-average of the reference attention probabilities.
  logits = jnp.einsum("btkgh,bskh->bkgts", q_main.reshape(1, 12, 2, 2, 8), k_main) * 8 ** -0.5
  logits = jnp.where(dense_mask(mask, 1, 12, 12)[:, None, None], logits, -jnp.inf)
  want = jax.nn.softmax(logits, -1).mean(axis=(1, 2))
  assert_close(target, want)
  # Sparse form with every visible key selected equals the dense form.
  iq, ik, iw = random_indexer(9, 1, 12, 12)

  @jax.jit  # one compilation instead of op-by-op dispatch
  def dense_sparse_grads(iq, ik, iw, target):
    indices = indexer.indexer_topk(iq, ik, iw, top_k=12, mask=mask)
    dense = indexer.indexer_kl_loss(indexer.indexer_scores(iq, ik, iw, mask=mask), target)
    sparse_target = attention.attention_target(q_main, k_main, mask=mask, indices=indices)
    sparse_loss = lambda a: indexer.indexer_kl_loss(
        indexer.indexer_scores_at(a, ik, iw, indices), sparse_target)
    return dense, sparse_loss(iq), jax.grad(sparse_loss)(iq)

  dense, sparse, grads = dense_sparse_grads(iq, ik, iw, target)
  np.testing.assert_allclose(float(sparse), float(dense), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(grads))) and np.any(np.asarray(grads) != 0)


def test_bad_inputs_raise():
  q, k, w = random_indexer(10, 1, 4, 4)
  # Shapes: the jaxtyping check at the boundary (tests/conftest.py) or the function's ValueError.
  with pytest.raises((ValueError, TypeError), match="index_k"):
    indexer.indexer_scores(q, k[..., :3], w)
  with pytest.raises((ValueError, TypeError), match="index_w"):
    indexer.indexer_scores(q, k, w[..., :1])
  with pytest.raises(ValueError, match="top_k must be a positive int"):
    indexer.indexer_topk(q, k, w, top_k=0)
  with pytest.raises(ValueError, match="reduction must be one of"):
    indexer.indexer_kl_loss(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2)), reduction="avg")


def test_selected_mass_is_recall():
  b, t, n, h = 1, 24, 2, 8
  q, k, w = random_indexer(5, b, t, t)
  mq, mk, _ = random_qkv(6, b, t, t, n, n, h)
  mask = Mask(causal=True)

  @jax.jit  # one compilation instead of op-by-op dispatch
  def masses(q, k, w, mq, mk):
    target = attention.attention_target(mq, mk, mask=mask)
    everything = indexer.indexer_topk(q, k, w, top_k=t, mask=mask)
    some = indexer.indexer_topk(q, k, w, top_k=4, mask=mask)
    return attention.selected_mass(target, everything), attention.selected_mass(target, some)

  everything, mass = masses(q, k, w, mq, mk)
  np.testing.assert_allclose(everything, 1.0, atol=1e-5)
  mass = np.asarray(mass)
  assert np.all(mass[0, :4] > 1 - 1e-5) and np.all((mass > 0) & (mass <= 1 + 1e-5))
