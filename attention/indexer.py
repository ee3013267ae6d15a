"""DeepSeek Sparse Attention (DSA) lightning indexer: scores, blockwise exact top-k, KL loss.

Index score of query `t` for key `s` (DeepSeek-V3.2-Exp, see shared/specs/dsa.md)::

    I[b, t, s] = sum_j  w[b, t, j] * ReLU( q_I[b, t, j, :] . k_I[b, s, :] )

with `index_q [B, T, J, D]` (J = H_I indexer heads of D = d_I dims), ONE key per token
`index_k [B, S, D]` shared by all indexer heads (MQA style), head weights `index_w [B, T, J]`.
Keys a query cannot see under `attention.Mask` (causal, window, segments, `q_offset`) score -inf.

FP8 path (`fp8=True`): q_I and k_I are quantised to float8_e4m3fn with one float32 scale per
vector (absmax / 448); the dot products accumulate in float32; ReLU, the head weights (times
the q scale, which is positive so it commutes with ReLU) and the key scale are applied after.

`indexer_topk` never materialises `[T, S]`: it walks blocks of `block_q` queries (`lax.map`),
scores each block against the key range its mask can reach (causal/window: one of a few static
widths, so a causal prefix costs ~S/2 on average), and selects the top-k of every row exactly
with a bisection on the float32 bit pattern (see `select_topk`). Memory O(T * k + block_q * S).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from attention import masks as masks_lib
from attention.masks import Mask

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_indexer_inputs(index_q, index_k, index_w) -> tuple[int, int, int, int, int]:
  """Validates `index_q [B, T, J, D]`, `index_k [B, S, D]`, `index_w [B, T, J]`.

  Returns `(B, T, S, J, D)`.
  """
  if jnp.ndim(index_q) != 4:
    raise ValueError(f"index_q must have rank 4 [batch, seq, index_heads, index_dim], got shape "
                     f"{jnp.shape(index_q)}.")
  b, t, j, d = jnp.shape(index_q)
  if jnp.ndim(index_k) != 3 or jnp.shape(index_k)[0] != b or jnp.shape(index_k)[2] != d:
    raise ValueError(f"index_k must have shape [B, S, D] = [{b}, S, {d}] (one key per token, "
                     f"shared by the indexer heads), got {jnp.shape(index_k)}.")
  if jnp.shape(index_w) != (b, t, j):
    raise ValueError(f"index_w must have shape [B, T, J] = {(b, t, j)}, got "
                     f"{jnp.shape(index_w)}.")
  return b, t, jnp.shape(index_k)[1], j, d


# --- scores -------------------------------------------------------------------------------------


def quantize_fp8(x: Float[Array, "... D"]) -> tuple[Array, Float[Array, "..."]]:
  """float8_e4m3fn values and one float32 scale per vector (last axis): `x ~= x8 * scale`."""
  x = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=-1)
  scale = jnp.where(absmax > 0, absmax / FP8_MAX, 1.0)
  return (x / scale[..., None]).astype(FP8_DTYPE), scale


def _prepare_keys(index_k, fp8: bool):
  """Keys as used by `_score_tile`: `(k [B, S, D], k_scale [B, S] or None)`."""
  if fp8:
    return quantize_fp8(index_k)
  return index_k.astype(jnp.float32), None


def _score_tile(q, w, k, k_scale):
  """Unmasked scores `[B, t, s]` float32 of queries `q [B, t, J, D]`, `w [B, t, J]`, keys `k`."""
  w = w.astype(jnp.float32)
  if k_scale is not None:  # FP8: k is float8 already; quantise q, fold its scale into w.
    q, q_scale = quantize_fp8(q)
    w = w * q_scale
  else:
    q = q.astype(jnp.float32)
  dots = jnp.einsum("BtJD,BsD->BtJs", q, k, preferred_element_type=jnp.float32)
  scores = jnp.einsum("BtJs,BtJ->Bts", jax.nn.relu(dots), w)
  if k_scale is not None:
    scores = scores * k_scale[:, None, :]
  return scores


def indexer_scores(
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"],
    index_w: Float[Array, "B T J"],
    *,
    mask: Mask | None = None,
    fp8: bool = False,
) -> Float[Array, "B T S"]:
  """Dense lightning-indexer scores `[B, T, S]` float32; keys hidden by `mask` are -inf.

  O(T * S * J * D) compute and O(T * S) memory: for tests, small inputs and the KL target.
  """
  b, t, s, _, _ = check_indexer_inputs(index_q, index_k, index_w)
  mask = masks_lib.validate(mask, (b, t), (b, s))
  k, k_scale = _prepare_keys(index_k, fp8)
  scores = _score_tile(index_q, index_w, k, k_scale)
  return jnp.where(masks_lib.dense_mask(mask, b, t, s), scores, -jnp.inf)


# --- exact top-k selection ----------------------------------------------------------------------


def _order_key(x: Float[Array, "R W"]) -> Array:
  """uint32 keys with the order of float32 `x` (-0.0 sorts just below +0.0)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


_WORD = 32  # flags packed per uint32 word by `_bit_words`


def _bit_words(flags: Bool[Array, "R W"]) -> tuple[Array, Array]:
  """Packs each row's flags into uint32 words (bit i of word c = flag c * 32 + i).

  Returns `(words [R, n], before [R, n])` with `before` the number of True flags in the
  earlier words of the row (an exclusive prefix count, by popcount + associative scan).
  """
  r, w = flags.shape
  f = jnp.pad(flags, ((0, 0), (0, -w % _WORD))).reshape(r, -1, _WORD).astype(jnp.uint32)
  words = jnp.sum(f << jnp.arange(_WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
  counts = lax.population_count(words).astype(jnp.int32)
  return words, lax.associative_scan(jnp.add, counts, axis=-1) - counts


def _bit_in_word(word, rank) -> Array:
  """Position (0..31) of the `rank`-th (0-based) set bit of each uint32 `word`: 5 halvings."""
  pos = jnp.zeros(word.shape, jnp.uint32)
  rank = rank.astype(jnp.uint32)
  for width in (16, 8, 4, 2, 1):
    low = lax.population_count((word >> pos) & jnp.uint32((1 << width) - 1))
    go = rank >= low
    pos = jnp.where(go, pos + width, pos)
    rank = jnp.where(go, rank - low, rank)
  return pos.astype(jnp.int32)


def _nth_true(flags: Bool[Array, "R W"], n: Int[Array, "R"]) -> Int[Array, "R"]:
  """Per row, the position of the `n`-th (0-based) True flag; -1 where `n < 0` or too few."""
  words, before = _bit_words(flags)
  total = before[:, -1] + lax.population_count(words[:, -1]).astype(jnp.int32)
  chunk = jnp.maximum(jnp.sum(before <= n[:, None], axis=-1) - 1, 0)  # last word starting <= n
  word = jnp.take_along_axis(words, chunk[:, None], axis=1)[:, 0]
  rank = n - jnp.take_along_axis(before, chunk[:, None], axis=1)[:, 0]
  pos = chunk * _WORD + _bit_in_word(word, jnp.maximum(rank, 0))
  return jnp.where((n >= 0) & (n < total), pos, -1)


def _first_true_positions(flags: Bool[Array, "R W"], k: int) -> Int[Array, "R k"]:
  """Positions of the first `k` True flags of each row, ascending (stream compaction).

  Slot j lies in the word whose `before` count is the largest <= j among non-empty words:
  each non-empty word marks the slot where its flags start (a scatter-max of word indices), a
  running max fills the slots in between, and a popcount search finds the bit in the word.
  O(R * (W + 5 k)): no sort, no per-slot search over the row. Slots past the count: junk.
  """
  r = flags.shape[0]
  words, before = _bit_words(flags)
  n = words.shape[1]
  start = jnp.where(lax.population_count(words) > 0, jnp.minimum(before, k), k)  # empty: dump
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (r, n))
  marks = jnp.zeros((r, k + 1), jnp.int32).at[jnp.arange(r)[:, None], start].max(index)
  chunk = lax.associative_scan(jnp.maximum, marks[:, :k], axis=-1)  # R k
  word = jnp.take_along_axis(words, chunk, axis=1, mode="promise_in_bounds")
  rank = jnp.arange(k, dtype=jnp.int32)[None] - jnp.take_along_axis(
      before, chunk, axis=1, mode="promise_in_bounds")
  return chunk * _WORD + _bit_in_word(word, rank)


def _sample_bracket(key, kk, done, lo, hi, c_lo, c_hi, stride: int = 32):
  """A tighter starting bracket for the bisection, from every `stride`-th key of each row.

  The kk-th largest key of a row sits near rank `kk / stride` of the strided sample; the sample
  keys `4 sqrt(rank) + 4` ranks on either side become the candidate `lo` / `hi`, which two
  counting passes over the full row verify: a candidate replaces the global bound only if it
  keeps the invariant (count(key >= lo) >= kk > count(key >= hi)), so the result stays exact
  whatever the data. Saves ~1/4 of the passes on indexer scores (~15% of the select time).
  """
  r, w = key.shape
  if w < 16 * stride:
    return lo, hi, c_lo, c_hi
  sample = jnp.sort(key[:, ::stride], axis=-1)  # R m, ascending
  m = sample.shape[1]
  rank = kk.astype(jnp.float32) * (m / w)  # expected rank from the top, 0-based ~ rank - 1
  slack = 4.0 * jnp.sqrt(rank) + 4.0
  from_top = lambda i: jnp.take_along_axis(
      sample, (m - 1 - jnp.clip(i, 0, m - 1)).astype(jnp.int32)[:, None], axis=1)[:, 0]
  lo2 = from_top(jnp.ceil(rank + slack))  # more than kk keys above it (probably)
  hi2 = from_top(jnp.floor(rank - slack))  # fewer than kk keys above it (probably)
  c_lo2 = jnp.sum(key >= lo2[:, None], axis=-1, dtype=jnp.int32)
  c_hi2 = jnp.sum(key >= hi2[:, None], axis=-1, dtype=jnp.int32)
  use_lo = ~done & (c_lo2 >= kk) & (lo2 > lo)
  use_hi = ~done & (c_hi2 < kk) & (hi2 < hi) & (hi2 > lo2)
  return (jnp.where(use_lo, lo2, lo), jnp.where(use_hi, hi2, hi),
          jnp.where(use_lo, c_lo2, c_lo), jnp.where(use_hi, c_hi2, c_hi))


def select_topk(scores: Float[Array, "R W"], visible, k: int) -> Int[Array, "R k"]:
  """Exact top-k positions of each row of `scores` among `visible` entries; -1 pads.

  Row r keeps `kk = min(k, #visible)` positions, listed in ascending position order; ties at the
  threshold are broken towards lower positions, so exactly `kk` are kept and none twice.

  Algorithm (no sort, no `lax.top_k`; every step is a vectorised pass over the row):
    1. Map float32 scores to uint32 keys with the same order (flip bits of negatives).
    2. Bisection on the key value: keep `lo` with count(key >= lo) >= kk and `hi` with
       count(key >= hi) < kk; stop a row when count(key >= mid) == kk (a gap was hit, no ties
       to break) or hi = lo + 1 (then lo is exactly the kk-th largest key). At most 32 passes,
       typically ~20 on indexer scores; for long rows the starting bracket comes from a
       strided sample (`_sample_bracket`, verified by two counting passes): ~15.
    3. keep = key > lo, plus the first `kk - count(key > lo)` entries equal to lo (ties; the
       cut is found with `_nth_true`). The kept positions are compacted in order by
       `_first_true_positions` (bit-packed words, popcounts, a scatter-max of word starts).
  Cost O(R * W * passes + R * k); memory O(R * W).
  """
  r, w = scores.shape
  if not 1 <= k <= w:
    raise ValueError(f"select_topk needs 1 <= k <= row length {w}, got k={k}.")
  # Invisible -> 0, visible -> at least 1, so thresholds >= 1 never keep an invisible entry.
  key = jnp.where(visible, jnp.maximum(_order_key(scores), 1), 0).astype(jnp.uint32)
  n_visible = jnp.sum(visible, axis=-1, dtype=jnp.int32)
  kk = jnp.minimum(n_visible, k)
  lo = jnp.min(jnp.where(visible, key, jnp.uint32(0xFFFFFFFF)), axis=-1)
  hi = jnp.max(key, axis=-1) + 1  # key < 2^32 - 1 unless NaN payloads
  # Rows with <= k visible keep everything visible: done at once (lo = min visible key).
  done = (kk == n_visible) | (kk == 0)
  # count(key >= lo) and count(key >= hi), used to interpolate the next guess.
  c_lo, c_hi = n_visible, jnp.zeros_like(n_visible)
  lo, hi, c_lo, c_hi = _sample_bracket(key, kk, done, lo, hi, c_lo, c_hi)
  done |= c_lo == kk

  def cond(state):
    lo, hi, _, _, done, _ = state
    return jnp.any(~done & (hi - lo > 1))

  def body(state):
    lo, hi, c_lo, c_hi, done, step = state
    span = hi - lo
    # Even steps interpolate (counts are smooth in the key), odd steps bisect (worst case).
    frac = (c_lo - kk).astype(jnp.float32) / jnp.maximum(c_lo - c_hi, 1).astype(jnp.float32)
    guess = (frac * span.astype(jnp.float32)).astype(jnp.uint32)
    offset = jnp.where(step % 2 == 0, guess, span // 2)
    mid = lo + jnp.clip(offset, 1, jnp.maximum(span, 2) - 1)
    count = jnp.sum(key >= mid[:, None], axis=-1, dtype=jnp.int32)
    active = ~done & (span > 1)
    up = active & (count >= kk)
    down = active & (count < kk)
    return (jnp.where(up, mid, lo), jnp.where(down, mid, hi), jnp.where(up, count, c_lo),
            jnp.where(down, count, c_hi), done | (active & (count == kk)), step + 1)

  lo, hi, c_lo, _, done, _ = lax.while_loop(cond, body, (lo, hi, c_lo, c_hi, done, 0))
  # `done` rows: exactly kk keys >= lo. Others: lo is the kk-th largest key and ties at lo
  # must be cut: keep the first `kk - count(key > lo)` of them.
  exact = done[:, None]
  greater = jnp.where(exact, key >= lo[:, None], key > lo[:, None]) & (key > 0)
  equal = ~exact & (key == lo[:, None]) & (key > 0)
  need = kk - jnp.sum(greater, axis=-1, dtype=jnp.int32)
  cut = _nth_true(equal, need - 1)  # position of the last tie kept (-1: none)
  kept = greater | (equal & (jnp.arange(w, dtype=jnp.int32)[None] <= cut[:, None]))
  pos = _first_true_positions(kept, k)
  return jnp.where(jnp.arange(k)[None] < kk[:, None], pos, -1).astype(jnp.int32)


# --- blockwise top-k over queries ---------------------------------------------------------------


def _key_widths(mask: Mask, kv_len: int, top_k: int, num_widths: int) -> tuple[int, ...]:
  """Static key-window widths a q block may use: one (S) unless causal/window bound the reach."""
  left, right = mask.bounds
  if left >= masks_lib._INF and right >= masks_lib._INF:  # pylint: disable=protected-access
    return (kv_len,)
  widths = {min(kv_len, max(top_k, -(-kv_len * m // num_widths))) for m in range(1, num_widths + 1)}
  return tuple(sorted(widths))


def indexer_topk(
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"],
    index_w: Float[Array, "B T J"],
    *,
    top_k: int,
    mask: Mask | None = None,
    fp8: bool = False,
    block_q: int = 16,
    num_widths: int = 4,
) -> Int[Array, "B T top_k"]:
  """Per query, the positions of its `top_k` highest indexer scores among visible keys.

  Returns `[B, T, top_k]` int32: query t keeps `min(top_k, #visible keys)` positions in
  ascending position order (exactly the top-k set of `indexer_scores`, ties broken towards
  lower positions, never a duplicate); unused slots are -1.

  Blockwise: `lax.map` over blocks of `block_q` queries. A block scores only the key window
  `[start, start + W)` its causal/window mask can reach, with `W` the smallest of `num_widths`
  static widths (multiples of S / num_widths) that covers it (a `lax.switch`), then runs
  `select_topk` on `[B * block_q, W]`. Compute O(T * S_reach * (J * D + passes)); memory
  O(T * top_k + block_q * S). `block_q` rows of S float32 scores should fit in L2 on CPU.
  """
  b, t, s, _, _ = check_indexer_inputs(index_q, index_k, index_w)
  mask = masks_lib.validate(mask, (b, t), (b, s))
  if not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
  if not isinstance(block_q, int) or block_q < 1:
    raise ValueError(f"block_q must be a positive int, got {block_q!r}.")
  if not isinstance(num_widths, int) or num_widths < 1:
    raise ValueError(f"num_widths must be a positive int, got {num_widths!r}.")
  bq = min(block_q, t)
  nq = -(-t // bq)
  tp = nq * bq
  k_eff = min(top_k, s)
  keys, k_scale = _prepare_keys(index_k, fp8)
  pad_t = ((0, 0), (0, tp - t))
  q = jnp.pad(index_q, pad_t + ((0, 0), (0, 0)))
  w = jnp.pad(index_w, pad_t + ((0, 0),))
  offsets = masks_lib.q_offsets(mask, b)
  q_seg = kv_seg = None
  if mask.has_segments:
    q_seg = jnp.pad(jnp.asarray(mask.q_segment_ids, jnp.int32), pad_t, constant_values=-1)
    kv_seg = jnp.asarray(mask.kv_segment_ids, jnp.int32)
  widths = _key_widths(mask, s, k_eff, num_widths)
  left, right = mask.bounds

  def block(i):
    q_i = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)  # B bq J D
    w_i = lax.dynamic_slice_in_dim(w, i * bq, bq, axis=1)  # B bq J
    q_pos = offsets[:, None] + i * bq + jnp.arange(bq, dtype=jnp.int32)[None]  # B bq
    q_seg_i = None if q_seg is None else lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
    # Key positions any query of the block can reach: [first, last].
    first = jnp.maximum(jnp.min(q_pos) - left, 0) if left < masks_lib._INF else 0  # pylint: disable=protected-access
    last = jnp.minimum(jnp.max(q_pos) + right, s - 1) if right < masks_lib._INF else s - 1  # pylint: disable=protected-access
    first = jnp.minimum(first, last)

    def window(width):
      start = jnp.clip(first, 0, s - width)
      k_w = lax.dynamic_slice_in_dim(keys, start, width, axis=1)  # B W D
      ks_w = None if k_scale is None else lax.dynamic_slice_in_dim(k_scale, start, width, axis=1)
      kv_pos = start + jnp.arange(width, dtype=jnp.int32)
      kv_seg_w = None if kv_seg is None else lax.dynamic_slice_in_dim(kv_seg, start, width, 1)
      visible = masks_lib.element_mask(mask, q_pos, kv_pos[None], q_seg_i, kv_seg_w)
      visible &= (q_pos < offsets[:, None] + t)[:, :, None]  # padded queries see nothing
      scores = _score_tile(q_i, w_i, k_w, ks_w)  # B bq W
      kw = min(k_eff, width)
      pos = select_topk(scores.reshape(b * bq, width), visible.reshape(b * bq, width), kw)
      pos = jnp.where(pos >= 0, pos + start, -1).reshape(b, bq, kw)
      return jnp.pad(pos, ((0, 0), (0, 0), (0, top_k - kw)), constant_values=-1)

    if len(widths) == 1:
      return window(widths[0])
    need = last - first + 1
    branch = jnp.sum(jnp.asarray(widths, jnp.int32) < need)  # smallest width >= need
    return lax.switch(jnp.minimum(branch, len(widths) - 1),
                      [functools.partial(window, wd) for wd in widths])

  out = lax.map(block, jnp.arange(nq))  # nq B bq top_k
  return out.transpose(1, 0, 2, 3).reshape(b, tp, top_k)[:, :t]


# --- KL training loss ---------------------------------------------------------------------------


def indexer_scores_at(
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"],
    index_w: Float[Array, "B T J"],
    indices: Int[Array, "B T k"],
    *,
    fp8: bool = False,
) -> Float[Array, "B T k"]:
  """Indexer scores of the selected keys only (`-inf` on -1 slots). O(T * k * J * D)."""
  b, t, s, _, _ = check_indexer_inputs(index_q, index_k, index_w)
  _check_indices(indices, b, t, "indices")
  keys, k_scale = _prepare_keys(index_k, fp8)
  safe = jnp.clip(indices, 0, s - 1)
  k_sel = jax.vmap(lambda x, i: x[i])(keys, safe)  # B T k D
  w = index_w.astype(jnp.float32)
  if fp8:
    q, q_scale = quantize_fp8(index_q)
    w = w * q_scale
  else:
    q = index_q.astype(jnp.float32)
  dots = jnp.einsum("BTJD,BTkD->BTJk", q, k_sel, preferred_element_type=jnp.float32)
  scores = jnp.einsum("BTJk,BTJ->BTk", jax.nn.relu(dots), w)
  if fp8:
    scores = scores * jax.vmap(lambda x, i: x[i])(k_scale, safe)
  return jnp.where(indices >= 0, scores, -jnp.inf)


def _check_indices(indices, b: int, t: int, name: str):
  if jnp.ndim(indices) != 3 or jnp.shape(indices)[:2] != (b, t):
    raise ValueError(f"{name} must have shape [B, T, k] = [{b}, {t}, k], got "
                     f"{jnp.shape(indices)}.")


def attention_target(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    indices: Int[Array, "B T k"] | None = None,
) -> Float[Array, "B T S"] | Float[Array, "B T k"]:
  """KL target p: main attention probabilities summed over heads, L1-normalised, no gradient.

  Dense (`indices=None`): `[B, T, S]`, O(T * S * N) memory (warm-up stage, short sequences).
  Sparse: `[B, T, k]` over the selected slots (softmax over the slots that are >= 0 and
  visible under `mask`), O(T * k * N * H) compute. Rows with no visible key are all 0.
  """
  from attention.reference import check_qkv, default_scale  # pylint: disable=g-import-not-at-top
  b, t, s, n, kh, h = check_qkv(q, k, k)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  qg = q.reshape(b, t, kh, n // kh, h)
  if indices is None:
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k, preferred_element_type=jnp.float32)
    visible = masks_lib.dense_mask(mask, b, t, s)[:, :, None, None]  # B T 1 1 S
  else:
    _check_indices(indices, b, t, "indices")
    from attention.sparse import effective_indices  # pylint: disable=g-import-not-at-top
    idx = effective_indices(indices, mask, b, t, s, kh)[:, :, 0]  # B T k, -1 = ignored
    k_sel = jax.vmap(lambda x, i: x[i])(k, jnp.maximum(idx, 0))  # B T k K H
    logits = jnp.einsum("BTKGH,BTkKH->BTKGk", qg, k_sel, preferred_element_type=jnp.float32)
    visible = (idx >= 0)[:, :, None, None]
  logits = jnp.where(visible, logits * scale, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(l > 0, l, 1.0)  # B T K G S|k
  p = jnp.sum(probs, axis=(2, 3))
  total = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def selected_mass(
    target: Float[Array, "B T S"],
    indices: Int[Array, "B T k"],
) -> Float[Array, "B T"]:
  """Indexer recall per query: the share of the dense attention distribution `target`
  (`attention_target(q, k, mask=mask)`, rows summing to 1) that falls on the selected keys
  (-1 slots ignored; `indexer_topk` never selects a key twice). 1.0 = nothing missed."""
  b, t, s = jnp.shape(target)
  _check_indices(indices, b, t, "indices")
  picked = jnp.take_along_axis(target, jnp.clip(indices, 0, s - 1), axis=-1)
  return jnp.sum(jnp.where(indices >= 0, picked, 0.0), axis=-1)


REDUCTIONS = ("mean", "sum", "none")


def indexer_kl_loss(
    index_scores: Float[Array, "B T S"] | Float[Array, "B T k"],
    target: Float[Array, "B T S"] | Float[Array, "B T k"],
    *,
    reduction: str = "mean",
) -> Float[Array, ""] | Float[Array, "B T"]:
  """KL(p || softmax(I)) per query row, `p = target`, `I = index_scores`; float32.

  Dense (warm-up) form: `index_scores = indexer_scores(...)` `[B, T, S]` (-inf where hidden) and
  `target = attention_target(q, k, mask=mask)`. Sparse form (restricted to the selected set):
  `index_scores = indexer_scores_at(..., indices)` and `target = attention_target(q, k,
  mask=mask, indices=indices)`, both `[B, T, k]`. Entries with score -inf are outside the
  support: softmax(I) and p are renormalised over the rest (p there must be 0, or is dropped).
  A row with no finite score, or an all-zero target, contributes 0. The loss is exactly 0 when
  softmax(I) equals p, and never NaN. Gradients flow into `index_scores` only.

  reduction: "mean" over rows with some finite score, "sum" over rows (DeepSeek's sum over t,
  averaged over the batch by the caller if wanted), or "none" -> `[B, T]`.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  if jnp.shape(index_scores) != jnp.shape(target) or jnp.ndim(index_scores) != 3:
    raise ValueError(f"index_scores and target must both be [B, T, S] or [B, T, k] with equal "
                     f"shapes, got {jnp.shape(index_scores)} and {jnp.shape(target)}.")
  scores = index_scores.astype(jnp.float32)
  support = jnp.isfinite(scores)
  p = jnp.where(support, lax.stop_gradient(target).astype(jnp.float32), 0.0)
  p_total = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(p_total > 0, p_total, 1.0)
  m = jnp.max(jnp.where(support, scores, -jnp.inf), axis=-1, keepdims=True)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  shifted = jnp.where(support, scores - m, 0.0)
  log_z = jnp.log(jnp.sum(jnp.where(support, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
                  + (~jnp.any(support, axis=-1, keepdims=True)))
  log_q = shifted - log_z
  log_p = jnp.log(jnp.where(p > 0, p, 1.0))
  kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)  # B T
  if reduction == "none":
    return kl
  if reduction == "sum":
    return jnp.sum(kl)
  rows = jnp.any(support, axis=-1) & (p_total[..., 0] > 0)
  return jnp.sum(kl) / jnp.maximum(jnp.sum(rows), 1)


def topk_overlap(
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"],
    index_w: Float[Array, "B T J"],
    *,
    top_k: int,
    mask: Mask | None = None,
    **options,
) -> Float[Array, ""]:
  """Share of the float32 top-k set that the FP8 path also selects (1.0 = identical sets).

  Averaged over all selected slots; O(T * top_k * log top_k) beyond the two selections.
  """
  exact = indexer_topk(index_q, index_k, index_w, top_k=top_k, mask=mask, **options)
  approx = indexer_topk(index_q, index_k, index_w, top_k=top_k, mask=mask, fp8=True, **options)
  big = jnp.iinfo(jnp.int32).max
  approx_sorted = jnp.sort(jnp.where(approx >= 0, approx, big), axis=-1)
  pos = jax.vmap(jax.vmap(jnp.searchsorted))(approx_sorted, exact)
  found = jnp.take_along_axis(approx_sorted, jnp.minimum(pos, top_k - 1), axis=-1) == exact
  hits = jnp.sum(found & (exact >= 0))
  return hits / jnp.maximum(jnp.sum(exact >= 0), 1)
