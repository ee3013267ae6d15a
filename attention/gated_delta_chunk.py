"""The gated delta rule in chunkwise-parallel form (pure JAX): the "xla" implementation.

Equals `attention.gated_delta_reference` (the per-token scan). Cut the sequence into chunks of
C tokens; inside a chunk, with `G_i = g_1 + ... + g_i` (log decay accumulated from the chunk's
start), `S_0` the state entering the chunk and `r_i = S_i - a_i S_{i-1}` written by token i as
`k_i r_i^T`, the recurrence unrolls to

    r_i = b_i (v_i - e^{G_i} S_0^T k_i - sum_{j<i} e^{G_i - G_j} (k_i . k_j) r_j)

a unit lower-triangular system `(I + A) R = B V - diag(b e^G) K S_0`, with
`A_ij = b_i e^{G_i - G_j} k_i . k_j` (j < i). Its solution is the WY representation of the
chunk's product of Householder-like factors (Yang et al., "Gated Delta Networks"; fla's
`chunk_gated_delta_rule`):

    W = (I + A)^{-1} diag(b e^G) K     [C, dk]      U = (I + A)^{-1} diag(b) V     [C, dv]
    R = U - W S_0
    O = diag(e^G) Q S_0 + (Q K^T * D) R                 D_ij = e^{G_i - G_j}, j <= i
    S_C = e^{G_C} S_0 + (K * e^{G_C - G})^T R

W, U and `Q K^T * D` come from all chunks at once (batched matmuls and the triangular inverse
by recursive blocking, `unit_lower_inverse`: O(T C d + T C^2)); only `R` and the state go chunk
by chunk (`lax.scan`, O(T d^2)); the outputs are again one batched product. Segment resets
(document starts) cut the chunk's token-to-token terms (`D`, `A`) across a reset and the `S_0`
terms for tokens after one (`attention.gated_delta_reference.chunk_reset_counts`).

Float32 throughout (inputs are cast); gradients by JAX autodiff of this code (the inverse has a
closed-form custom VJP): the scan saves one state per chunk, so backward memory is
O(T C + (T / C) dk dv) per head (the per-token reference stores T states).
Cost: O(T C (dk + dv) + T C^2 + T dk dv) FLOPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention.block_sizes import GatedDeltaBlockSizes
from attention.common import next_pow2
from attention.gated_delta_reference import (HIGHEST, chunk_cumsum, chunk_reset_counts,
                                             pad_time)


def _einsum(spec: str, *args):
  return jnp.einsum(spec, *args, precision=HIGHEST)


class _Chunks:
  """The inputs cut into chunks: `q, k [B, K, N, C, dk]`, `v [B, K, G, N, C, dv]`, `G, beta
  [B, K, G, N, C]` (G: `chunk_cumsum`), `counts [B, 1, 1, N, C]` (`chunk_reset_counts`)."""

  def __init__(self, q, k, v, g, beta, reset, chunk: int):
    b, t, kh, dk = q.shape
    h, dv = v.shape[2:]
    self.group, self.n, self.c = h // kh, -(-t // chunk), chunk
    tp = self.n * chunk
    cut = lambda x: x.reshape(b, self.n, chunk, kh, -1)  # B Tp K d -> B N C K d
    self.q = cut(pad_time(q, tp)).transpose(0, 3, 1, 2, 4)
    self.k = cut(pad_time(k, tp)).transpose(0, 3, 1, 2, 4)
    v = pad_time(v.astype(jnp.float32), tp).reshape(b, self.n, chunk, kh, self.group, dv)
    self.v = v.transpose(0, 3, 4, 1, 2, 5)
    per_head = lambda x: jnp.swapaxes(pad_time(x.astype(jnp.float32), tp), 1, 2)  # B H Tp
    grouped = lambda x: x.reshape(b, kh, self.group, self.n, chunk)
    self.g = grouped(chunk_cumsum(per_head(g), chunk))
    self.beta = grouped(per_head(beta))
    reset = jnp.zeros((b, t), bool) if reset is None else reset
    self.counts = chunk_reset_counts(pad_time(reset, tp), chunk).reshape(b, 1, 1, self.n, chunk)


def _decays(x: _Chunks):
  """`(D [B, K, G, N, C, C], e [.., C], e_end [B, K, G, N], f [.., C])`: the in-chunk decay
  `D_ij = e^{G_i - G_j}` (j <= i, same document), `e_i = e^{G_i}` (0 after a reset: the carried
  state is gone), `e_end = e^{G_C}` and `f_i = e^{G_C - G_i}` (token i's write, at the chunk's
  end; 0 if a reset follows it in the chunk)."""
  counts, g = x.counts, x.g
  same = counts[..., :, None] == counts[..., None, :]
  visible = same & jnp.tril(jnp.ones((x.c, x.c), bool))
  diff = g[..., :, None] - g[..., None, :]
  decay = jnp.exp(jnp.where(visible, diff, -jnp.inf))
  carried = counts == 0
  e = jnp.where(carried, jnp.exp(g), 0.0)
  e_end = e[..., -1]
  f = jnp.where(counts == counts[..., -1:], jnp.exp(g[..., -1:] - g), 0.0)
  return decay, e, e_end, f


def _diagonal_blocks(a, size: int):
  """`[..., C, C]` -> its `C / size` diagonal blocks `[..., C / size, size, size]`."""
  c = a.shape[-1]
  a = a.reshape(*a.shape[:-2], c // size, size, c // size, size)
  return jnp.moveaxis(jnp.diagonal(a, axis1=-4, axis2=-2), -1, -3)


@jax.custom_vjp
def unit_lower_inverse(a):
  """`(I + A)^{-1}` for strictly lower triangular `A [..., C, C]` (C a power of two).

  Recursive blocking, bottom-up: the inverse of `[[I + A11, 0], [A21, I + A22]]` is
  `[[T11, 0], [-T22 A21 T11, T22]]`, so log2(C) levels of batched matmuls build it from 1 x 1
  blocks (as stable as substitution; ~2 C^3 / 3 FLOPs). XLA's triangular_solve expands to
  slow loops on CPU (~100x slower here). Gradient: `dA = -T^T dT T^T` on the strictly lower part
  (the only entries read).
  """
  c = a.shape[-1]
  t = jnp.ones((*a.shape[:-2], c, 1, 1), a.dtype)  # C diagonal blocks of size 1
  size = 1
  while size < c:
    pairs = t.reshape(*a.shape[:-2], c // (2 * size), 2, size, size)
    t11, t22 = pairs[..., 0, :, :], pairs[..., 1, :, :]
    a21 = _diagonal_blocks(a, 2 * size)[..., size:, :size]
    t21 = -jnp.matmul(t22, jnp.matmul(a21, t11, precision=HIGHEST), precision=HIGHEST)
    t = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1),
                         jnp.concatenate([t21, t22], -1)], -2)
    size *= 2
  return t[..., 0, :, :]


def _inverse_fwd(a):
  t = unit_lower_inverse(a)
  return t, t


def _inverse_bwd(t, dt):
  tt = jnp.swapaxes(t, -1, -2)
  return (jnp.tril(-jnp.matmul(tt, jnp.matmul(dt, tt, precision=HIGHEST), precision=HIGHEST),
                   -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _wy(x: _Chunks, decay, e):
  """`(W [B, K, G, N, C, dk], U [B, K, G, N, C, dv])`: `(I + A)^{-1}` applied to both."""
  kk = _einsum("BKNid,BKNjd->BKNij", x.k, x.k)[:, :, None]  # shared by the G v heads
  strict = jnp.tril(jnp.ones((x.c, x.c), bool), -1)
  t = unit_lower_inverse(jnp.where(strict, x.beta[..., :, None] * decay * kk, 0.0))
  w = _einsum("BKGNij,BKGNjd->BKGNid", t, (x.beta * e)[..., None] * x.k[:, :, None])
  return w, _einsum("BKGNij,BKGNjv->BKGNiv", t, x.beta[..., None] * x.v)


def _states(w, u, k, e_end, f, initial):
  """Chunk by chunk: returns the states entering each chunk `[B, K, G, N, dk, dv]`, the writes
  `R [B, K, G, N, C, dv]` and the final state `[B, K, G, dk, dv]`."""
  fk = f[..., None] * k[:, :, None]  # B K G N C dk

  def chunk(state, xs):
    w_n, u_n, fk_n, e_end_n = xs
    r = u_n - _einsum("BKGCd,BKGdv->BKGCv", w_n, state)
    new = e_end_n[..., None, None] * state + _einsum("BKGCd,BKGCv->BKGdv", fk_n, r)
    return new, (state, r)

  n_major = lambda a: jnp.moveaxis(a, 3, 0)
  final, (starts, r) = lax.scan(chunk, initial, (n_major(w), n_major(u), n_major(fk),
                                                 n_major(e_end)))
  return jnp.moveaxis(starts, 0, 3), jnp.moveaxis(r, 0, 3), final


def chunk_gated_delta(q, k, v, g, beta, initial_state, reset,
                      block_sizes: GatedDeltaBlockSizes | None = None,
                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The "xla" entry of `gated_delta.IMPLEMENTATIONS` (inputs validated by the front door).

  Args: `q` scaled and `k` (normalised) float32 `[B, T, K, dk]`; `v [B, T, H, dv]`, `g, beta
  [B, T, H]`; `initial_state [B, H, dk, dv]` float32 or None; `reset [B, T]` bool or None.
  Returns float32 `(o [B, T, H, dv], final_state [B, H, dk, dv])`.
  """
  del interpret  # the front door refuses it for "xla"
  sizes = (block_sizes or GatedDeltaBlockSizes()).validate_xla()
  b, t, kh, dk = q.shape
  h, dv = v.shape[2:]
  x = _Chunks(q, k, v, g, beta, reset, min(sizes.chunk_size, next_pow2(t)))
  decay, e, e_end, f = _decays(x)
  w, u = _wy(x, decay, e)
  initial = (jnp.zeros((b, kh, x.group, dk, dv), jnp.float32) if initial_state is None
             else initial_state.reshape(b, kh, x.group, dk, dv))
  starts, r, final = _states(w, u, x.k, e_end, f, initial)
  qk = _einsum("BKNid,BKNjd->BKNij", x.q, x.k)[:, :, None] * decay
  o = (_einsum("BKNCd,BKGNdv->BKGNCv", x.q, starts) * e[..., None]
       + _einsum("BKGNij,BKGNjv->BKGNiv", qk, r))
  o = o.transpose(0, 3, 4, 1, 2, 5).reshape(b, x.n * x.c, h, dv)[:, :t]
  return o, final.reshape(b, h, dk, dv)
