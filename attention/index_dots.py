"""The lightning indexer's dot products: `sum_J w ReLU(q_I . k_I)`, float32 or FP8 keys.

`relu_dot_scores(q, w, keys, fmt)` is the unmasked score tile of `attention.indexer` (dense
scores, the blockwise top-k, the scores of selected keys); `prepare_keys` puts the keys in the
form it takes. One query per batch row (a decode step) goes to `one_query_scores`, which reads
the cache in its own layout and converts FP8 keys chunk by chunk (below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention import fp8 as fp8_lib

# Keys per step of a decode step's FP8 scores (`one_query_scores`): each step converts its
# chunk of float8 keys for the matmul while it is in cache, so the whole-cache bfloat16 copy
# (8 MiB per 131072 keys at d_I = 32, per batch row) is never written.
SCORE_CHUNK = 16384
_MIN_SCORE_CHUNK = 1024  # below this a loop step costs more than it saves: one step


def prepare_keys(index_k, fmt: fp8_lib.Fp8Format | None):
  """Keys as `relu_dot_scores` takes them: float32 `[B, S, D]`, or `Quantized` (FP8 path;
  keys already quantised, e.g. by the decode cache, are used as they are)."""
  if isinstance(index_k, fp8_lib.Quantized):
    d, c = index_k.values.shape[-1], index_k.scale.shape[-1]
    if fmt is None or d // c != fmt.block_for(d):
      raise ValueError(f"index_k is FP8 with block {d // c}; score it with fp8 = an "
                       f"Fp8Format of that block, got fp8={fmt!r}.")
    return index_k
  if fmt is None:
    return index_k.astype(jnp.float32)
  return fp8_lib.quantize(index_k, fmt)


def relu_dot_scores(q, w, k, fmt: fp8_lib.Fp8Format | None):
  """Unmasked scores `[B, t, s]` float32: `sum_J w ReLU(q . k)` for `q [B, t, J, D]`, `w [B, t, J]`
  and keys shared by the queries `[B, s, D]` or per query `[B, t, s, D]` (float32 or Quantized).

  FP8: q is quantised with the keys' blocks; products of float8 values accumulate in float32.
  With one block per vector both scales are positive scalars per (query head, key), so the
  q scale folds into w and the k scale multiplies after ReLU (as DeepSeek's `fp8_index`); with
  C blocks the C partial dots are scaled per block before they are summed (C x the tile).
  """
  per_query = jnp.ndim(k.values if fmt is not None else k) == 4
  if not per_query and q.shape[1] == 1:
    return one_query_scores(q, w, k, fmt)
  eq = "BtJD,BtsD->BtJs" if per_query else "BtJD,BsD->BtJs"
  w = w.astype(jnp.float32)
  if fmt is None:
    dots = jnp.einsum(eq, q.astype(jnp.float32), k, preferred_element_type=jnp.float32)
    return jnp.einsum("BtJs,BtJ->Bts", jax.nn.relu(dots), w)
  qq = fp8_lib.quantize(q, fmt)
  k_scale = k.scale if per_query else k.scale[:, None]  # B t|1 s C
  c = k_scale.shape[-1]
  if c == 1:
    dots = jnp.einsum(eq, fp8_lib.dot_operand(qq.values), fp8_lib.dot_operand(k.values),
                      preferred_element_type=jnp.float32)
    return jnp.einsum("BtJs,BtJ->Bts", jax.nn.relu(dots), w * qq.scale[..., 0]) * k_scale[..., 0]
  qv = qq.values.reshape(*q.shape[:3], c, -1)  # B t J C E
  kv = k.values.reshape(*k.values.shape[:-1], c, -1)  # B [t] s C E
  eq_c = "BtJCE,BtsCE->BtJsC" if per_query else "BtJCE,BsCE->BtJsC"
  dots = jnp.einsum(eq_c, fp8_lib.dot_operand(qv), fp8_lib.dot_operand(kv),
                    preferred_element_type=jnp.float32)
  dots = jnp.sum(dots * qq.scale[:, :, :, None, :] * k_scale[:, :, None], axis=-1)
  return jnp.einsum("BtJs,BtJ->Bts", jax.nn.relu(dots), w)


def _relu_sum(dots, w):
  """`sum_J w[:, J] ReLU(dots[..., J])` for `dots [B, s, J]`: an unrolled add (one fused loop)."""
  return sum(jax.nn.relu(dots[..., h]) * w[:, None, h] for h in range(dots.shape[-1]))


def score_chunk(length: int) -> int:
  """Keys per step: the largest power of two <= SCORE_CHUNK dividing `length` (one step if
  that is below _MIN_SCORE_CHUNK)."""
  chunk = SCORE_CHUNK
  while length % chunk:
    chunk //= 2
  return chunk if chunk >= _MIN_SCORE_CHUNK else length


def _by_chunks(fn, values, scale):
  """`fn(values_chunk, scale_chunk) -> [B, c]` over the key axis in steps of `score_chunk(S)` keys;
  returns `[B, S]`. Each step reads its chunk in place and converts it while it is in cache.

  The loop carries the inputs through an `optimization_barrier` with the step index: without
  it XLA's CPU compiler hoists the float8 conversion of the whole cache out of the loop (its
  dynamic slice of 8-bit floats is computed in float32), which is the copy this avoids.
  """
  b, s = values.shape[:2]
  chunk = score_chunk(s)
  if chunk == s:
    return fn(values, scale)

  def step(i, out):
    vals, scl, j = lax.optimization_barrier((values, scale, i))
    take = lambda x: lax.dynamic_slice_in_dim(x, j * chunk, chunk, axis=1)
    return lax.dynamic_update_slice_in_dim(out, fn(take(vals), take(scl)), i * chunk, axis=1)

  return lax.fori_loop(0, s // chunk, step, jnp.zeros((b, s), jnp.float32))


def one_query_scores(q, w, k, fmt: fp8_lib.Fp8Format | None):
  """`relu_dot_scores` for one query per batch row (a decode step): `[B, 1, s]` float32.

  The keys are the matmul's rows (`[s, D] x [D, J]` per batch row), so the cache is read in
  its own layout: the `[J, D] x [D, s]` form above makes XLA copy every key transposed first
  (~3/4 of a 131072-key decode step's indexer time on CPU). FP8 keys enter the matmul as
  `fp8.dot_operand` (exact bfloat16 on CPU; an exact float32 form measured 15-25% slower),
  converted `SCORE_CHUNK` keys at a time inside the loop (`_by_chunks`). The J heads are summed
  by an unrolled ReLU-weighted add. Same scale order as `relu_dot_scores`; O(s * J * D) compute,
  O(SCORE_CHUNK * D) converted keys in flight.
  """
  d = q.shape[-1]
  q, w = q[:, 0], w[:, 0].astype(jnp.float32)  # B J D, B J
  if fmt is None:
    return _relu_sum(jnp.einsum("BsD,BJD->BsJ", k, q.astype(jnp.float32)), w)[:, None]
  qq = fp8_lib.quantize(q, fmt)  # B J D, scales B J C
  qv = fp8_lib.dot_operand(qq.values)
  c = k.scale.shape[-1]
  e = d // c
  if c == 1:  # both scales are positive per (head, key): q's folds into w, k's goes last
    w = w * qq.scale[..., 0]

  def chunk_scores(values, scale):  # [B, c, D] float8, [B, c, C] -> [B, c]
    kv = fp8_lib.dot_operand(values)
    if c == 1:
      dots = jnp.einsum("BsD,BJD->BsJ", kv, qv, preferred_element_type=jnp.float32)
      return _relu_sum(dots, w) * scale[..., 0]
    # C partial dots, each scaled by its block scales, then summed
    dots = sum(jnp.einsum("BsE,BJE->BsJ", kv[..., i * e:(i + 1) * e], qv[..., i * e:(i + 1) * e],
                          preferred_element_type=jnp.float32)
               * qq.scale[:, None, :, i] * scale[:, :, None, i] for i in range(c))
    return _relu_sum(dots, w)

  return _by_chunks(chunk_scores, k.values, k.scale)[:, None]
