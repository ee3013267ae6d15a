"""DeepSeek Sparse Attention (DSA) lightning indexer: scores, blockwise exact top-k, KL loss.

Index score of query `t` for key `s` (DeepSeek-V3.2-Exp, see shared/specs/dsa.md)::

    I[b, t, s] = sum_j  w[b, t, j] * ReLU( q_I[b, t, j, :] . k_I[b, s, :] )

with `index_q [B, T, J, D]` (J = H_I indexer heads of D = d_I dims), ONE key per token
`index_k [B, S, D]` shared by all indexer heads (MQA style), head weights `index_w [B, T, J]`.
Keys a query cannot see under `attention.Mask` (causal, window, segments, `q_offset`) score -inf.

FP8 path (`fp8=True` or an `attention.fp8.Fp8Format`): q_I and k_I are quantised to
float8_e4m3fn with one float32 scale per block of the last axis (`attention/fp8.py`; True = one
block of min(D, 128), DeepSeek's layout at D = 128); the dot products accumulate in float32;
ReLU, the head weights and the scales are applied after. `index_k` may also arrive quantised
(`fp8.Quantized`, as the DSA decode cache stores it). The Hadamard rotation DeepSeek applies
before FP8 is the caller's (`fp8.hadamard` on q_I and k_I; the DSA layer does it).

The dot products live in `attention/index_dots.py` (one query per batch row, a decode step, is
scored keys-major there, the cache read in its own layout and FP8 keys converted chunk by chunk).

`indexer_topk` never materialises `[T, S]`: it walks blocks of `block_q` queries (`lax.map`),
scores each block against the key range its mask can reach (causal/window: one of a few static
widths, so a causal prefix costs ~S/2 on average), and selects the top-k of every row exactly
with a bisection on the float32 bit pattern (`attention.topk.select_topk`). Memory
O(T * k + block_q * S). The KL target and the DSA attention itself are in `attention/dsa.py`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from attention import fp8 as fp8_lib
from attention import masks as masks_lib
from attention.common import pad_to_size
from attention.masks import UNBOUNDED, Mask
from attention.index_dots import prepare_keys, relu_dot_scores
from attention.topk import select_topk

def check_indexer_inputs(index_q, index_k, index_w) -> tuple[int, int, int, int, int]:
  """Validates `index_q [B, T, J, D]`, `index_k [B, S, D]`, `index_w [B, T, J]`.

  Returns `(B, T, S, J, D)`.
  """
  if jnp.ndim(index_q) != 4:
    raise ValueError(f"index_q must have rank 4 [batch, seq, index_heads, index_dim], got shape "
                     f"{jnp.shape(index_q)}.")
  b, t, j, d = jnp.shape(index_q)
  k_shape = tuple(index_k.shape if isinstance(index_k, fp8_lib.Quantized) else jnp.shape(index_k))
  if len(k_shape) != 3 or k_shape[0] != b or k_shape[2] != d:
    raise ValueError(f"index_k must have shape [B, S, D] = [{b}, S, {d}] (one key per token, "
                     f"shared by the indexer heads), got {k_shape}.")
  if jnp.shape(index_w) != (b, t, j):
    raise ValueError(f"index_w must have shape [B, T, J] = {(b, t, j)}, got "
                     f"{jnp.shape(index_w)}.")
  return b, t, k_shape[1], j, d


# --- scores ---------------------------------------------------------------------------------


def indexer_scores(
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"] | fp8_lib.Quantized,
    index_w: Float[Array, "B T J"],
    *,
    mask: Mask | None = None,
    fp8: bool | fp8_lib.Fp8Format | None = False,
) -> Float[Array, "B T S"]:
  """Dense lightning-indexer scores `[B, T, S]` float32; keys hidden by `mask` are -inf.

  O(T * S * J * D) compute and O(T * S) memory: for tests, small inputs and the KL target.
  """
  b, t, s, _, _ = check_indexer_inputs(index_q, index_k, index_w)
  mask = masks_lib.validate(mask, (b, t), (b, s))
  fmt = fp8_lib.resolve(fp8)
  scores = relu_dot_scores(index_q, index_w, prepare_keys(index_k, fmt), fmt)
  return jnp.where(masks_lib.dense_mask(mask, b, t, s), scores, -jnp.inf)


# --- blockwise top-k over queries ---------------------------------------------------------------


def _key_widths(mask: Mask, kv_len: int, top_k: int, num_widths: int) -> tuple[int, ...]:
  """Static key-window widths a q block may use: one (S) unless causal/window bound the reach."""
  left, right = mask.bounds
  if left >= UNBOUNDED and right >= UNBOUNDED:
    return (kv_len,)
  widths = {min(kv_len, max(top_k, -(-kv_len * m // num_widths))) for m in range(1, num_widths + 1)}
  return tuple(sorted(widths))


class _Block(NamedTuple):
  """One block of queries of `indexer_topk`: `q [B, bq, J, D]`, `w [B, bq, J]`, absolute
  positions `q_pos [B, bq]`, segment ids `[B, bq]` or None, `valid [B, bq]` (not padding)."""

  q: Array
  w: Array
  q_pos: Array
  q_seg: Array | None
  valid: Array


def _reach(mask: Mask, q_pos, kv_len: int):
  """Key positions `[first, last]` that some query of the block can see."""
  left, right = mask.bounds
  first = jnp.maximum(jnp.min(q_pos) - left, 0) if left < UNBOUNDED else 0
  last = jnp.minimum(jnp.max(q_pos) + right, kv_len - 1) if right < UNBOUNDED else kv_len - 1
  return jnp.minimum(first, last), last


def _window_topk(mask: Mask, blk: _Block, keys, fmt, width: int, first, k_eff: int, top_k: int):
  """Top-k of one block among the `width` keys from `first` (clipped): `[B, bq, top_k]`."""
  k_all, kv_seg = keys  # [B, S, D] float32 or Quantized, [B, S] or None
  b, bq = blk.q_pos.shape
  s = kv_seg.shape[1] if kv_seg is not None else jax.tree.leaves(k_all)[0].shape[1]
  start = jnp.clip(first, 0, s - width)
  if width == s:  # the whole key range: no slice (it would copy the keys)
    cols = lambda x: x
  else:
    cols = lambda x: None if x is None else jax.tree.map(
        lambda a: lax.dynamic_slice_in_dim(a, start, width, axis=1), x)
  kv_pos = start + jnp.arange(width, dtype=jnp.int32)
  visible = masks_lib.element_mask(mask, blk.q_pos, kv_pos[None], blk.q_seg, cols(kv_seg))
  visible &= blk.valid[:, :, None]  # padded queries see nothing
  scores = relu_dot_scores(blk.q, blk.w, cols(k_all), fmt)  # B bq W
  kw = min(k_eff, width)
  pos = select_topk(scores.reshape(b * bq, width), visible.reshape(b * bq, width), kw)
  pos = jnp.where(pos >= 0, pos + start, -1).reshape(b, bq, kw)
  return jnp.pad(pos, ((0, 0), (0, 0), (0, top_k - kw)), constant_values=-1)


# Queries per `indexer_topk` step, per backend: on CPU 16 rows of scores stay in L2; a GPU needs
# wide steps (T / 16 = 8192 sequential steps at 128K would time loop overhead, not the top-k):
# 256 rows x S float32 scores = 128 MiB at S = 128K, plus the selection's O(rows * S) passes.
TOPK_BLOCK_Q = {"cpu": 16, "gpu": 256}


# `indexer_topk`'s default number of key widths: one per this many keys, at most 4. Each width is
# a `lax.switch` branch that compiles its own top-k (~1 s of CPU compile each); below ~128 keys a
# step, the narrower windows save no measurable run time (CPU, S = 128: 1.8 ms a call with one
# width or four), so short sequences compile one width.
KEYS_PER_WIDTH, MAX_WIDTHS = 128, 4


def default_topk_block_q(backend: str | None = None) -> int:
  """`indexer_topk`'s default `block_q` on `backend` (default: JAX's default backend)."""
  return TOPK_BLOCK_Q.get(backend or jax.default_backend(), TOPK_BLOCK_Q["cpu"])


def indexer_topk(
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"] | fp8_lib.Quantized,
    index_w: Float[Array, "B T J"],
    *,
    top_k: int,
    mask: Mask | None = None,
    fp8: bool | fp8_lib.Fp8Format | None = False,
    block_q: int | None = None,
    num_widths: int | None = None,
) -> Int[Array, "B T top_k"]:
  """Per query, the positions of its `top_k` highest indexer scores among visible keys.

  Returns `[B, T, top_k]` int32: query t keeps `min(top_k, #visible keys)` positions in
  ascending position order (exactly the top-k set of `indexer_scores`, ties broken towards
  lower positions, never a duplicate); unused slots are -1.

  Blockwise: `lax.map` over blocks of `block_q` queries. A block scores only the key window
  `[start, start + W)` its causal/window mask can reach, with `W` the smallest of `num_widths`
  static widths (multiples of S / num_widths) that covers it (a `lax.switch`), then runs
  `select_topk` on `[B * block_q, W]`. Compute O(T * S_reach * (J * D + passes)); memory
  O(T * top_k + block_q * S). `block_q=None` picks per backend (`default_topk_block_q`: 16
  on CPU, 256 on GPU); `num_widths=None` one width per `KEYS_PER_WIDTH` keys (1 to `MAX_WIDTHS`).
  """
  b, t, s, _, _ = check_indexer_inputs(index_q, index_k, index_w)
  mask = masks_lib.validate(mask, (b, t), (b, s))
  masks_lib.refuse_sinks(mask, "indexer_topk")  # its key reach is the window's
  if block_q is None:
    block_q = default_topk_block_q()
  if num_widths is None:
    num_widths = min(MAX_WIDTHS, max(1, s // KEYS_PER_WIDTH))
  for name, value in (("top_k", top_k), ("block_q", block_q), ("num_widths", num_widths)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  bq, k_eff = min(block_q, t), min(top_k, s)
  nq = -(-t // bq)
  fmt = fp8_lib.resolve(fp8)
  keys = (prepare_keys(index_k, fmt), None)
  q, w = pad_to_size(index_q, 1, nq * bq), pad_to_size(index_w, 1, nq * bq)
  offsets = masks_lib.q_offsets(mask, b)
  q_seg = None
  if mask.has_segments:
    q_seg = pad_to_size(jnp.asarray(mask.q_segment_ids, jnp.int32), 1, nq * bq, -1)
    keys = (keys[0], jnp.asarray(mask.kv_segment_ids, jnp.int32))
  widths = _key_widths(mask, s, k_eff, num_widths)

  def block(i):
    rows = lambda x: None if x is None else lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1)
    q_pos = offsets[:, None] + i * bq + jnp.arange(bq, dtype=jnp.int32)[None]  # B bq
    blk = _Block(rows(q), rows(w), q_pos, rows(q_seg), q_pos < offsets[:, None] + t)
    first, last = _reach(mask, q_pos, s)
    fns = [functools.partial(_window_topk, mask, blk, keys, fmt, wd, first, k_eff, top_k)
           for wd in widths]
    if len(fns) == 1:
      return fns[0]()
    branch = jnp.sum(jnp.asarray(widths, jnp.int32) < last - first + 1)  # smallest width >= need
    return lax.switch(jnp.minimum(branch, len(widths) - 1), fns)

  out = lax.map(block, jnp.arange(nq))  # nq B bq top_k
  return out.transpose(1, 0, 2, 3).reshape(b, nq * bq, top_k)[:, :t]


# --- KL training loss ---------------------------------------------------------------------------


def indexer_scores_at(
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"] | fp8_lib.Quantized,
    index_w: Float[Array, "B T J"],
    indices: Int[Array, "B T k"],
    *,
    fp8: bool | fp8_lib.Fp8Format | None = False,
) -> Float[Array, "B T k"]:
  """Indexer scores of the selected keys only (`-inf` on -1 slots). O(T * k * J * D)."""
  b, t, s, _, _ = check_indexer_inputs(index_q, index_k, index_w)
  check_indices(indices, b, t)
  fmt = fp8_lib.resolve(fp8)
  keys = prepare_keys(index_k, fmt)
  safe = jnp.clip(indices, 0, s - 1)
  k_sel = jax.tree.map(lambda x: jax.vmap(lambda a, i: a[i])(x, safe), keys)  # B T k D
  scores = relu_dot_scores(index_q, index_w, k_sel, fmt)
  return jnp.where(indices >= 0, scores, -jnp.inf)


def check_indices(indices, b: int, t: int):
  """Raises ValueError unless `indices` is `[B, T, k]` (shared top-k key positions)."""
  if jnp.ndim(indices) != 3 or jnp.shape(indices)[:2] != (b, t):
    raise ValueError(f"indices must have shape [B, T, k] = [{b}, {t}, k], got "
                     f"{jnp.shape(indices)}.")


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
    index_k: Float[Array, "B S D"] | fp8_lib.Quantized,
    index_w: Float[Array, "B T J"],
    *,
    top_k: int,
    mask: Mask | None = None,
    fp8: bool | fp8_lib.Fp8Format | None = True,
    rotate: bool = False,
    **options,
) -> Float[Array, ""]:
  """Share of the float32 top-k set that the FP8 path also selects (1.0 = identical sets).

  `rotate`: the FP8 path scores `fp8.hadamard(q_I)`, `fp8.hadamard(k_I)` (same function in
  exact arithmetic). Averaged over all selected slots; O(T * top_k * log top_k) beyond the two
  selections.
  """
  exact = indexer_topk(index_q, index_k, index_w, top_k=top_k, mask=mask, **options)
  if rotate:
    index_q, index_k = fp8_lib.hadamard(index_q), fp8_lib.hadamard(index_k)
  approx = indexer_topk(index_q, index_k, index_w, top_k=top_k, mask=mask, fp8=fp8, **options)
  big = jnp.iinfo(jnp.int32).max
  approx_sorted = jnp.sort(jnp.where(approx >= 0, approx, big), axis=-1)
  pos = jax.vmap(jax.vmap(jnp.searchsorted))(approx_sorted, exact)
  found = jnp.take_along_axis(approx_sorted, jnp.minimum(pos, top_k - 1), axis=-1) == exact
  hits = jnp.sum(found & (exact >= 0))
  return hits / jnp.maximum(jnp.sum(exact >= 0), 1)
