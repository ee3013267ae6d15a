"""Dense O(L^2) softmax attention: the oracle every other variant is tested against.

Materialises the `[B, N, T, S]` scores and the `[B, T, S]` mask; float32 statistics.
GQA/MQA: q heads are grouped as `[K, G]` (kv head k serves q heads `k*G .. k*G+G-1`, as in
`jax.nn.dot_product_attention`), so K/V are never repeated in memory.
A query with no visible key returns zeros (not NaN, not a uniform average).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attention import masks as masks_lib
from attention import scores as scores_lib
from attention.masks import Mask

# Dtypes whose softmax statistics accumulate in float32.
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_qkv(q, k, v, *, value_dim: bool = False) -> tuple[int, int, int, int, int, int]:
  """Validates `q [B, T, N, H]`, `k [B, S, K, H]`, `v [B, S, K, H]` (floating, T, S >= 1);
  with `value_dim=True` (callers that support it) `v [B, S, K, Hv]` may have its own head dim.
  Returns `(B, T, S, N, K, H)`."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape "
                       f"{jnp.shape(x)}.")
    dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype (float32, bfloat16, float16, fp8), "
                       f"got {dtype}.")
  (b, t, n, h), (bk, s, kh, hk) = jnp.shape(q), jnp.shape(k)
  if t < 1 or s < 1:
    raise ValueError(f"q and k need at least one position each (T >= 1, S >= 1), got T = {t}, "
                     f"S = {s}.")
  if jnp.shape(v)[:3] != jnp.shape(k)[:3]:
    raise ValueError(f"k and v must have the same shape except the head dim ([B, S, K]), got "
                     f"{jnp.shape(k)} and {jnp.shape(v)}.")
  if not value_dim and jnp.shape(v) != jnp.shape(k):
    raise ValueError(f"k and v must have the same shape here: this function does not support a "
                     f"value head dim different from the key's, got {jnp.shape(k)} and "
                     f"{jnp.shape(v)} (reference, flash and sparse attention do).")
  if bk != b:
    raise ValueError(f"q and k must have the same batch size, got {b} and {bk}.")
  if hk != h:
    raise ValueError(f"q and k must have the same head_dim, got {h} and {hk}.")
  if kh == 0 or n % kh:
    raise ValueError(f"q heads ({n}) must be a multiple of kv heads ({kh}) for GQA/MQA.")
  return b, t, s, n, kh, h


def default_scale(head_dim: int, scale: float | None) -> float:
  """`scale`, or `head_dim ** -0.5` for None; a ValueError for anything but a finite real."""
  if scale is None:
    return head_dim ** -0.5
  try:
    value = float(scale)
  except (TypeError, ValueError):
    raise ValueError(f"scale must be a finite float or None, got {scale!r}.") from None
  if not math.isfinite(value):
    raise ValueError(f"scale must be a finite float or None, got {scale!r}.")
  return value


def reference_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: Float[Array, "N"] | None = None,
    return_lse: bool = False,
    sink_logits: Float[Array, "N"] | None = None,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """softmax(mods(q k^T * scale) + mask) v, dense. O(T * S) memory and compute per head.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, Hv]` (Hv may differ from H).
    mask: visibility (`attention.Mask`); None = every query sees every key.
    scale: logit scale, default `H ** -0.5`.
    logits_soft_cap: `cap * tanh(s / cap)` on the scaled scores (`attention.scores`).
    alibi_slopes: `[N]` ALiBi slopes: `-slope_n * |i - j|` added after the cap.
    return_lse: also return the float32 natural-log log-sum-exp `[B, N, T]` of the scaled,
      capped, biased, masked scores (-inf for a row with no visible key); differentiable.
    sink_logits: `[N]` learned sink logits (GPT-OSS): one extra score per row with a zero
      value vector, here an explicit extra column of the softmax; the lse includes it.

  Returns:
    `out [B, T, N, Hv]` in q's dtype (rows with no visible key are 0), or `(out, lse)`.
  """
  _, _, _, n, _, _ = check_qkv(q, k, v, value_dim=True)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  mods = scores_lib.make(logits_soft_cap, alibi_slopes, n)
  sinks = scores_lib.check_sink_logits(sink_logits, n)
  out, lse = reference_attention_with_lse(q, k, v, mask=mask, scale=scale, mods=mods,
                                          sink_logits=sinks)
  return (out, lse) if return_lse else out


def reference_attention_with_lse(q, k, v, *, mask: Mask | None = None,
                                 scale: float | None = None,
                                 mods: scores_lib.ScoreMods = scores_lib.NONE, selected=None,
                                 sink_logits=None):
  """Dense attention that also returns the float32 log-sum-exp `[B, N, T]` (-inf if no key).

  `selected`: an optional boolean `[B, X, T, S]` (X = 1 or K kv heads) of the keys a query may
  use at all (a sparse selection, e.g. `block_sparse.block_sparse_mask`), intersected with
  `mask`: the oracle of the sparse operations. `sink_logits`: `[N]` float32 or None, a
  softmax column of its own with a zero value.
  """
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  g = n // kh
  scale = default_scale(h, scale)
  qg = q.reshape(b, t, kh, g, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  if mods.active:
    q_pos = masks_lib.q_offsets(mask, b)[:, None] + jnp.arange(t, dtype=jnp.int32)  # B T
    slopes = None if mods.alibi_slopes is None else mods.alibi_slopes.reshape(kh, g, 1, 1)
    logits, _ = mods.apply(logits, slopes, q_pos[:, None, None, :, None],
                           jnp.arange(s, dtype=jnp.int32))
  visible = masks_lib.dense_mask(mask, b, t, s)[:, None, None]  # B 1 1 T S
  if selected is not None:
    visible = visible & selected[:, :, None]  # B X 1 T S
  logits = jnp.where(visible, logits, -jnp.inf)
  if sink_logits is not None:  # B K G T S+1: the sink column, its value 0
    sink = jnp.broadcast_to(sink_logits.reshape(1, kh, g, 1, 1), (*logits.shape[:-1], 1))
    logits = jnp.concatenate([logits, sink], axis=-1)
    v = jnp.pad(v, ((0, 0), (0, 1), (0, 0), (0, 0)))
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnormalised = jnp.exp(logits - row_max)  # masked -> exactly 0
  denom = jnp.sum(unnormalised, axis=-1, keepdims=True)
  has_key = denom > 0
  probs = unnormalised / jnp.where(has_key, denom, 1.0)
  lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, denom, 1.0)), -jnp.inf)[..., 0]
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32))
  out = out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)
  return out, lse.reshape(b, n, t)
