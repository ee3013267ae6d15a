"""The gated delta rule (Gated DeltaNet): the per-token reference, the decoding step, and what
every implementation shares (input checks, q/k normalisation, segment resets).

Yang, Kautz and Hatamizadeh, "Gated Delta Networks" (ICLR 2025); the linear-attention layers of
Qwen3-Next and Kimi Linear. Per token t, batch row and value head, with the state
`S [dk, dv]` (float32; the `[B, H, dk, dv]` orientation of fla's `h`):

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T       a_t = exp(g_t), g_t <= 0
    o_t = S_t^T (scale q_t)                                       b_t = beta_t in (0, 1)

i.e. decay, then a delta-rule write: `r_t = b_t (v_t - (a_t S_{t-1})^T k_t)` replaces what the
decayed state recalls for `k_t` (`S_t = a_t S_{t-1} + k_t r_t^T`). This is the paper's
`S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T` transposed (the paper's state is
dv x dk). q and k are L2-normalised over their last axis (`x / sqrt(sum x^2 + 1e-6)`, as
Qwen3-Next and fla's `use_qk_l2norm_in_kernel`) unless the caller passes `l2_normalize=False`
(then they should be unit vectors already: `I - b k k^T` is a contraction only for |k| <= 1).

Layouts: `q, k [B, T, K, dk]`, `v [B, T, H, dv]`, `g, beta [B, T, H]`, state `[B, H, dk, dv]`,
with `H % K == 0`: v head h reads q/k head `h // (H // K)` (Qwen3-Next's repeat_interleave;
q/k are never repeated in memory). `segment_ids [B, T]`: the state is reset to zero before
every token whose id differs from the previous token's (packed documents); the initial state
feeds the first token's document, and the final state is the state after token T-1.

This is not a softmax attention (no `fn(q, k, v, mask)`): it is not in `attention.registry`.
The chunkwise forms (`attention.gated_delta_chunk`, the Pallas kernels) equal this reference.
Cost: O(T d^2) sequential steps; reverse-mode autodiff of the scan stores every state,
O(T dk dv) memory per head.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from attention.reference import SUPPORTED_DTYPES, default_scale

L2_EPS = 1e-6
HIGHEST = lax.Precision.HIGHEST


class Dims(NamedTuple):
  batch: int
  length: int
  qk_heads: int
  v_heads: int
  key_dim: int
  value_dim: int

  @property
  def group(self) -> int:
    return self.v_heads // self.qk_heads


def _check_dtype(name: str, x, allowed=SUPPORTED_DTYPES):
  dtype = jnp.result_type(x)
  if dtype not in tuple(map(jnp.dtype, allowed)):
    names = ", ".join(jnp.dtype(d).name for d in allowed)
    raise ValueError(f"{name} must have dtype in ({names}), got {dtype}.")


def check_inputs(q, k, v, g, beta, state=None, segment_ids=None, *, step: bool = False) -> Dims:
  """Validates shapes and dtypes (ValueError naming the bad value), before any tracing.

  Sequences: `q, k [B, T, K, dk]`, `v [B, T, H, dv]`, `g, beta [B, T, H]`, `segment_ids [B, T]`.
  `step=True`: one token, `q, k [B, K, dk]`, `v [B, H, dv]`, `g, beta [B, H]` (T reported as 1).
  `state [B, H, dk, dv]` float32 (or None).
  """
  lead = 2 if step else 3
  for name, x, rank in (("q", q, lead + 1), ("k", k, lead + 1), ("v", v, lead + 1),
                        ("g", g, lead), ("beta", beta, lead)):
    if jnp.ndim(x) != rank:
      layout = "[B, K, dk]" if step else "[B, T, K, dk]"
      raise ValueError(f"{name} must have rank {rank} (q, k {layout}; v with H heads and dv; g "
                       f"and beta without the head dim), got shape {jnp.shape(x)}.")
    _check_dtype(name, x)
  if jnp.shape(q) != jnp.shape(k):
    raise ValueError(f"q and k must have the same shape, got {jnp.shape(q)} and {jnp.shape(k)}.")
  *qk_lead, kh, dk = jnp.shape(k)
  *v_lead, h, dv = jnp.shape(v)
  if v_lead != qk_lead or jnp.shape(g) != (*v_lead, h) or jnp.shape(beta) != jnp.shape(g):
    raise ValueError(f"v must be {(*qk_lead, 'H', 'dv')} and g, beta {(*qk_lead, 'H')} for q, k "
                     f"{jnp.shape(q)}; got v {jnp.shape(v)}, g {jnp.shape(g)}, beta "
                     f"{jnp.shape(beta)}.")
  if kh < 1 or h % kh:
    raise ValueError(f"value heads ({h}) must be a multiple of q/k heads ({kh}): v head h reads "
                     f"q/k head h // (H // K).")
  dims = Dims(qk_lead[0], 1 if step else qk_lead[1], kh, h, dk, dv)
  if not step and dims.length < 1:
    raise ValueError(f"the sequence must have at least one token, got T = {dims.length}.")
  if state is not None:
    if jnp.shape(state) != (dims.batch, h, dk, dv):
      raise ValueError(f"the state must be [B, H, dk, dv] = {(dims.batch, h, dk, dv)}, got "
                       f"{jnp.shape(state)}.")
    _check_dtype("the state", state, (jnp.float32,))
  if segment_ids is not None:
    if jnp.shape(segment_ids) != (dims.batch, dims.length):
      raise ValueError(f"segment_ids must be [B, T] = {(dims.batch, dims.length)}, got "
                       f"{jnp.shape(segment_ids)}.")
    if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
      raise ValueError(f"segment_ids must be integers, got {jnp.result_type(segment_ids)}.")
  return dims


def l2_normalized(x) -> jax.Array:
  """`x / sqrt(sum(x^2, -1) + 1e-6)` in float32."""
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def prepare_qk(q, k, scale: float | None, l2_normalize: bool):
  """float32 `(scale * q_hat, k_hat)`: normalised (if asked) then q scaled (default dk^-0.5)."""
  scale = default_scale(q.shape[-1], scale)
  if l2_normalize:
    q, k = l2_normalized(q), l2_normalized(k)
  return q.astype(jnp.float32) * scale, k.astype(jnp.float32)


def resets(segment_ids, length: int) -> jax.Array | None:
  """`[B, T]` bool: the state is zeroed before token t (its id differs from token t-1's)."""
  if segment_ids is None:
    return None
  ids = jnp.asarray(segment_ids)
  return jnp.pad(ids[:, 1:] != ids[:, :-1], ((0, 0), (1, 0)))[:, :length]


# --- the recurrence, on grouped heads: state [B, K, G, dk, dv] ----------------------------------


def _grouped(x, dims: Dims, *, feature: bool = True):
  """`[..., H, d]` (or `[..., H]` with `feature=False`) -> `[..., K, G, d]` (`[..., K, G]`):
  v head h is (q/k head h // G, member h % G)."""
  lead, tail = (x.shape[:-2], x.shape[-1:]) if feature else (x.shape[:-1], ())
  return x.reshape(*lead, dims.qk_heads, dims.group, *tail)


def _step(state, q, k, v, g, beta):
  """One token, float32: state `[B, K, G, dk, dv]`, `q, k [B, K, dk]` (q scaled), `v [B, K, G,
  dv]`, `g, beta [B, K, G]`. Returns `(new state, o [B, K, G, dv])`."""
  state = jnp.exp(g)[..., None, None] * state
  recalled = jnp.einsum("BKGdv,BKd->BKGv", state, k, precision=HIGHEST)
  r = beta[..., None] * (v - recalled)
  state = state + jnp.einsum("BKd,BKGv->BKGdv", k, r, precision=HIGHEST)
  return state, jnp.einsum("BKGdv,BKd->BKGv", state, q, precision=HIGHEST)


def gated_delta_step(
    q: Float[Array, "B K Dk"],
    k: Float[Array, "B K Dk"],
    v: Float[Array, "B H Dv"],
    g: Float[Array, "B H"],
    beta: Float[Array, "B H"],
    state: Float[Array, "B H Dk Dv"],
    *,
    scale: float | None = None,
    l2_normalize: bool = True,
) -> tuple[Float[Array, "B H Dv"], Float[Array, "B H Dk Dv"]]:
  """One decoding step of the gated delta rule from a carried float32 state (module doc).

  Args: one token's `q, k [B, K, dk]`, `v [B, H, dv]`, `g, beta [B, H]`, and `state [B, H, dk,
  dv]` float32 (zeros for an empty context). Same `scale` / `l2_normalize` as the sequence form.
  Returns `(o [B, H, dv]` in v's dtype, `new_state [B, H, dk, dv]` float32). O(H dk dv).
  """
  dims = check_inputs(q, k, v, g, beta, state, step=True)
  q32, k32 = prepare_qk(q, k, scale, l2_normalize)
  f32 = lambda x: _grouped(x.astype(jnp.float32), dims, feature=False)
  state = state.reshape(dims.batch, dims.qk_heads, dims.group, dims.key_dim, dims.value_dim)
  state, o = _step(state, q32, k32, _grouped(v.astype(jnp.float32), dims), f32(g), f32(beta))
  return (o.reshape(v.shape).astype(v.dtype),
          state.reshape(dims.batch, dims.v_heads, dims.key_dim, dims.value_dim))


def gated_delta_reference(
    q: Float[Array, "B T K Dk"],
    k: Float[Array, "B T K Dk"],
    v: Float[Array, "B T H Dv"],
    g: Float[Array, "B T H"],
    beta: Float[Array, "B T H"],
    *,
    scale: float | None = None,
    initial_state: Float[Array, "B H Dk Dv"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    return_final_state: bool = False,
    l2_normalize: bool = True,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B H Dk Dv"]]:
  """The gated delta rule token by token (`lax.scan`): the oracle of every implementation.

  Arguments as `attention.gated_delta_rule` (module doc: recurrence, layouts, resets).
  Returns `o [B, T, H, dv]` in v's dtype, and the float32 final state `[B, H, dk, dv]` if
  `return_final_state`. Cost O(T H dk dv) time, sequential in T.
  """
  dims = check_inputs(q, k, v, g, beta, initial_state, segment_ids)
  q32, k32 = prepare_qk(q, k, scale, l2_normalize)
  b, t, kh, gr, dk, dv = (dims.batch, dims.length, dims.qk_heads, dims.group, dims.key_dim,
                          dims.value_dim)
  state = (jnp.zeros((b, kh, gr, dk, dv), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32).reshape(b, kh, gr, dk, dv))
  reset = resets(segment_ids, t)
  reset = jnp.zeros((b, t), bool) if reset is None else reset
  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  xs = (time_major(q32), time_major(k32), time_major(_grouped(v.astype(jnp.float32), dims)),
        time_major(_grouped(g.astype(jnp.float32), dims, feature=False)),
        time_major(_grouped(beta.astype(jnp.float32), dims, feature=False)), time_major(reset))

  def token(state, x):
    q_t, k_t, v_t, g_t, beta_t, reset_t = x
    state = jnp.where(reset_t[:, None, None, None, None], 0.0, state)
    return _step(state, q_t, k_t, v_t, g_t, beta_t)

  state, o = lax.scan(token, state, xs)
  o = jnp.moveaxis(o, 0, 1).reshape(b, t, dims.v_heads, dv).astype(v.dtype)
  if return_final_state:
    return o, state.reshape(b, dims.v_heads, dk, dv)
  return o


# --- what the chunkwise forms share -------------------------------------------------------------


def pad_time(x, length: int):
  """Zero-pads axis 1 (time) of `x` to `length`: padded tokens have g = 0 and beta = 0, so they
  leave the state unchanged (a = 1, no write), and their outputs are sliced off."""
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def chunk_cumsum(g, chunk: int):
  """`[..., Tp]` -> the log decay accumulated inside each chunk, `G_i = g_0 + ... + g_i` (i the
  position in its chunk), float32 `[..., Tp]` (Tp a multiple of `chunk`)."""
  shape = g.shape
  g = g.astype(jnp.float32).reshape(*shape[:-1], shape[-1] // chunk, chunk)
  return jnp.cumsum(g, axis=-1).reshape(shape)


def chunk_reset_counts(reset, chunk: int):
  """`[B, Tp]` bool resets -> int32 `[B, Tp]`: resets inside the token's chunk up to and
  including it. Two tokens of a chunk share a document iff their counts are equal; a token sees
  the state carried into its chunk iff its count is 0."""
  b, t = reset.shape
  counts = jnp.cumsum(reset.astype(jnp.int32).reshape(b, t // chunk, chunk), axis=-1)
  return counts.reshape(b, t)
