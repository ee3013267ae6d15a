"""Score modifiers of the attention contract: logit soft-capping and ALiBi, shared by every backend.

With `s = q . k * scale` (float32) for query position `i = q_offset + t` and key position `j`,
every implementation computes, in this order::

    s = cap * tanh(s / cap)            logits_soft_cap=cap (Gemma 2 / 3, Grok); None: no cap
    s = s - slope_n * |i - j|          alibi_slopes=[N] (Press et al., "Train Short, Test Long")
    s = where(visible(i, j), s, -inf)  the Mask; then softmax over keys, lse = logsumexp(s)

so the cap bounds the content logits and the ALiBi bias is added after it (a capped logit plus
a distance penalty), then the mask. Both are computed inside the tiles from positions: no
`[T, S]` tensor, memory O(L).

ALiBi distance convention: `|i - j|`. Under a causal mask every visible key has `j <= i`, so
this is exactly Press et al.'s `-m_n (i - j)`; without causality (encoders, windows with a
right side) the penalty is symmetric in distance (bidirectional ALiBi, as in MosaicBERT), never
a bonus for keys ahead. Slopes are constants: they get no gradient.
`geometric_alibi_slopes(N)` gives the standard `2^(-8 n / N)`, n = 1..N.

Learned sinks (`sink_logits=[N]`, GPT-OSS): one more logit per head, `sink_n`, joins every
row's softmax denominator with a zero value vector::

    lse' = logaddexp(lse, sink_n);  out' = out * exp(lse - lse')

so a row may put part of its mass "nowhere" (a row with no visible key: out 0, lse' = sink_n).
`apply_sink_logits` is that exact merge of the attention's `(out, lse)` with the sink's
`(0, sink_n)`; the front doors apply it after any backend, so gradients reach the sink logits
(through `lse'`) and q, k, v (through the backends' differentiable `(out, lse)`).

Backward: with `u = tanh(s / cap)`, `d cap*u / ds = 1 - u^2` multiplies the score gradient
(`ScoreMods.apply` returns it); the bias is additive, so its derivative with respect to the
scores is 1.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreMods:
  """Soft-cap (static float or None) and ALiBi slopes (`[N]` float32 array leaf or None)."""

  soft_cap: float | None = dataclasses.field(default=None, metadata=dict(static=True))
  alibi_slopes: Float[Array, "N"] | None = None

  @property
  def active(self) -> bool:
    return self.soft_cap is not None or self.alibi_slopes is not None

  def apply(self, s, slopes=None, q_pos=None, kv_pos=None):
    """`modify(s, self.soft_cap, slopes, ...)`, the slopes only read with ALiBi."""
    return modify(s, self.soft_cap, slopes if self.alibi_slopes is not None else None, q_pos,
                  kv_pos)


def modify(s, soft_cap: float | None, slopes=None, q_pos=None, kv_pos=None):
  """`(s', dcap)`: float32 scores soft-capped (`soft_cap` not None) and ALiBi-biased (`slopes`
  not None), and `ds'/ds` of the cap (None without a cap).

  `slopes`, `q_pos`, `kv_pos` broadcast against `s` (the caller lays them out for its tile: a
  kernel passes its head's scalar slope). Pure jnp: used in XLA tiles and in Pallas kernels.
  """
  dcap = None
  if soft_cap is not None:
    u = jnp.tanh(s * (1.0 / soft_cap))
    s, dcap = u * soft_cap, 1.0 - u * u
  if slopes is not None:
    s = s - slopes * jnp.abs(q_pos - kv_pos).astype(jnp.float32)
  return s, dcap


NONE = ScoreMods()


def make(logits_soft_cap, alibi_slopes, num_heads: int) -> ScoreMods:
  """Validated `ScoreMods` (ValueError before tracing, naming the bad option)."""
  cap = None
  if logits_soft_cap is not None:
    if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, numbers.Real) or (
        not math.isfinite(logits_soft_cap) or logits_soft_cap <= 0):
      raise ValueError(f"logits_soft_cap must be a positive finite float or None, got "
                       f"{logits_soft_cap!r}.")
    cap = float(logits_soft_cap)
  slopes = None
  if alibi_slopes is not None:
    if jnp.shape(alibi_slopes) != (num_heads,):
      raise ValueError(f"alibi_slopes must have shape [N] = [{num_heads}] (one slope per query "
                       f"head), got shape {jnp.shape(alibi_slopes)}.")
    slopes = jnp.asarray(alibi_slopes, jnp.float32)
  return ScoreMods(cap, slopes)


def geometric_alibi_slopes(num_heads: int) -> np.ndarray:
  """Press et al.'s ALiBi slopes `2^(-8 n / N)` for n = 1..N, float32 `[N]`."""
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}.")
  return np.exp2(-8.0 * np.arange(1, num_heads + 1) / num_heads).astype(np.float32)


def refuse(operation: str, **options) -> None:
  """ValueError naming the first option that is set (not None / False) but unsupported."""
  for name, value in options.items():
    if value is not None and value is not False:
      shown = f"an array of shape {jnp.shape(value)}" if jnp.ndim(value) else repr(value)
      raise ValueError(f"{operation} does not support {name} (got {shown}); use "
                       f"flash_attention or reference_attention for it.")


def check_sink_logits(sink_logits, num_heads: int):
  """`sink_logits` as a float32 `[N]` array (None passes); ValueError on another shape."""
  if sink_logits is None:
    return None
  if jnp.shape(sink_logits) != (num_heads,):
    raise ValueError(f"sink_logits must have shape [N] = [{num_heads}] (one learned logit per "
                     f"query head), got shape {jnp.shape(sink_logits)}.")
  dtype = jnp.result_type(sink_logits)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"sink_logits must be floating point, got dtype {dtype}.")
  return jnp.asarray(sink_logits, jnp.float32)


def apply_sink_logits(out, lse, sink_logits):
  """`(out', lse')` of `(out [B, T, N, Hv], lse [B, N, T])` with the sink logits `[N]` (float32,
  or None: unchanged) in the denominator (module docstring). Differentiable; no NaN for rows
  with no visible key (lse -inf: weight 0)."""
  if sink_logits is None:
    return out, lse
  merged = jnp.logaddexp(lse, sink_logits[None, :, None])  # B N T, finite
  weight = jnp.exp(lse - merged)  # B N T in [0, 1)
  scaled = out.astype(jnp.float32) * jnp.swapaxes(weight, 1, 2)[..., None]
  return scaled.astype(out.dtype), merged


def merge_attention(out_a, lse_a, out_b, lse_b):
  """`(out, lse)` of one softmax over two disjoint key sets from each set's `(out [B, T, N, Hv],
  lse [B, N, T])` (natural log, -inf: no key): `lse = logaddexp(lse_a, lse_b)`,
  `out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse)`; rows with no key in either: out 0,
  lse -inf (never NaN). Differentiable; out in `out_a`'s dtype."""
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  weight = lambda x: jnp.swapaxes(jnp.exp(x - safe), 1, 2)[..., None]  # B T N 1
  out = out_a.astype(jnp.float32) * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b)
  return out.astype(out_a.dtype), lse
