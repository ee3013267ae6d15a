"""Pallas (Triton) forward kernel of the chunkwise gated delta rule, and the per-chunk terms it
shares with the backward kernel (`gated_delta_bwd`).

One program per (v block, batch row, v head) walks the chunks in order, keeping the state
columns `S [dk, bv]` (float32) in registers; the state's dv columns evolve independently, so
v blocks are exact. Per chunk of C tokens (`attention.gated_delta_chunk` derives it)::

    D    = e^{G_i - G_j} [j <= i, same document]            C x C decay (G: in-chunk cumsum)
    A    = beta_i D_ij (k_i . k_j) [j < i]                   strictly lower
    X    = ((I + A)^{-1})^T                                  back substitution, C - 1 row steps
    W    = X^T (beta e^G K),  U = X^T (beta V)               the WY representation
    R    = U - W S                                           what each token writes
    O    = e^G (Q S) + (Q K^T * D) R
    S   <- e^{G_C} S + (K * e^{G_C - G})^T R                 (saved before the update: the
                                                             backward restarts from it)

The triangular inverse is C - 1 steps of `row_j = e_j - sum_i A_ij row_i` on a register-held
C x C tile (elementwise, not tensor cores): O(C^3) per chunk, next to the O(C^2 d + C d^2)
of its eight dots. Inputs arrive padded by `gated_delta_pallas` (time to whole chunks, head dims to
powers of two >= 16), float32. Cost per program: O(T (C d + d bv)) FLOPs, O(T / C) states out.
The pure-JAX twin is `attention.gated_delta_chunk`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.common import varying_struct
from attention.kernels import flash_tiles as tiles

PRECISION = lax.Precision.HIGHEST  # float32 dots in exact float32 (Triton inputPrecision=ieee)


def dot(a, b, trans_a: bool = False, trans_b: bool = False):
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=PRECISION)


class Chunk(NamedTuple):
  """One chunk's loaded inputs: `q, k [C, dk]`, `v [C, bv]`, `g` (in-chunk cumsum), `beta`,
  `counts` (`[C]`; counts None without segment ids)."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  g: jax.Array
  beta: jax.Array
  counts: jax.Array | None


def load_chunk(n, chunk: int, q_ref, k_ref, v_ref, g_ref, beta_ref, counts_ref) -> Chunk:
  rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
  counts = None if counts_ref is None else counts_ref[rows]
  return Chunk(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows], beta_ref[rows],
               counts)


class Terms(NamedTuple):
  """What the forward and backward both derive from a chunk (C x C tiles and `[C]` vectors)."""

  decay: jax.Array     # D, [j <= i]
  strict: jax.Array    # D, [j < i]
  kk: jax.Array        # K K^T
  x: jax.Array         # ((I + A)^{-1})^T
  e: jax.Array         # e^{G_i} (0 after a reset in the chunk)
  f: jax.Array         # e^{G_C - G_i} (0 if a reset follows token i in the chunk)
  e_end: jax.Array     # e^{G_C} (0 if the chunk holds a reset), scalar
  kb: jax.Array        # beta e^G K  [C, dk]
  vb: jax.Array        # beta V      [C, bv]
  w: jax.Array         # X^T kb
  u: jax.Array         # X^T vb


def _last(x, chunk: int):
  """`x[chunk - 1]` of a `[C]` vector, as a scalar (a masked sum: no dynamic slicing)."""
  return jnp.sum(jnp.where(jnp.arange(chunk) == chunk - 1, x, jnp.zeros_like(x)))


def _inverse_transposed(a, chunk: int):
  """`((I + A)^{-1})^T` for strictly lower `A [C, C]`: `X_j = e_j - sum_{i > j} A_ij X_i`,
  rows from the last up (row C - 1 is `e_{C-1}` already)."""
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)

  def row(step, x):
    j = chunk - 2 - step
    a_j = jnp.sum(jnp.where(cols == j, a, 0.0), axis=1)  # A[:, j], laid along the rows i
    new = jnp.where(jnp.arange(chunk) == j, 1.0, 0.0) - jnp.sum(a_j[:, None] * x, axis=0)
    return jnp.where(rows == j, new[None, :], x)

  return lax.fori_loop(0, chunk - 1, row, jnp.where(rows == cols, 1.0, 0.0))


def chunk_terms(c: Chunk, chunk: int) -> Terms:
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  lower = rows >= cols
  e, f = jnp.exp(c.g), jnp.exp(_last(c.g, chunk) - c.g)
  e_end = jnp.exp(_last(c.g, chunk))
  if c.counts is not None:
    lower = lower & (c.counts[:, None] == c.counts[None, :])
    count_end = _last(c.counts, chunk)
    e, f = jnp.where(c.counts == 0, e, 0.0), jnp.where(c.counts == count_end, f, 0.0)
    e_end = jnp.where(count_end == 0, e_end, 0.0)
  decay = jnp.where(lower, jnp.exp(jnp.where(lower, c.g[:, None] - c.g[None, :], 0.0)), 0.0)
  strict = jnp.where(rows > cols, decay, 0.0)
  kk = dot(c.k, c.k, trans_b=True)
  x = _inverse_transposed(c.beta[:, None] * strict * kk, chunk)
  kb = (c.beta * e)[:, None] * c.k
  vb = c.beta[:, None] * c.v
  return Terms(decay, strict, kk, x, e, f, e_end, kb, vb, dot(x, kb, trans_a=True),
               dot(x, vb, trans_a=True))


def split_refs(refs, has_segments: bool):
  """`(counts_ref or None, the remaining refs)`: counts come last among the inputs."""
  return (refs[0], refs[1:]) if has_segments else (None, refs)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, h0_ref, *refs, chunk: int,
                    num_chunks: int, has_segments: bool):
  """Refs: q, k `[Tp, dk]` (the q/k head of this v head), v `[Tp, bv]`, g, beta `[Tp]`, h0
  `[dk, bv]`, counts `[Tp]` (segments only); outputs o `[Tp, bv]`, states `[N, dk, bv]` (the
  state entering each chunk), final `[dk, bv]`."""
  counts_ref, (o_ref, states_ref, final_ref) = split_refs(refs, has_segments)

  def step(n, state):
    c = load_chunk(n, chunk, q_ref, k_ref, v_ref, g_ref, beta_ref, counts_ref)
    t = chunk_terms(c, chunk)
    states_ref[n, :, :] = state
    r = t.u - dot(t.w, state)
    qk = dot(c.q, c.k, trans_b=True) * t.decay
    o_ref[pl.ds(pl.multiple_of(n * chunk, chunk), chunk), :] = (
        t.e[:, None] * dot(c.q, state) + dot(qk, r))
    return t.e_end * state + dot(t.f[:, None] * c.k, r, trans_a=True)

  final_ref[...] = lax.fori_loop(0, num_chunks, step, h0_ref[...])


class Specs(NamedTuple):
  """BlockSpecs over the grid `(v block, batch row, v head)`."""

  qk: pl.BlockSpec     # `[Tp, dk]` of q/k head h // group
  v: pl.BlockSpec      # `[Tp, bv]` of v head h, columns of v block iv (v, o, dout, dv)
  row: pl.BlockSpec    # `[Tp]` of a `[B, H, Tp]` table (g, beta)
  counts: pl.BlockSpec  # `[Tp]` of `[B, Tp]`
  state: pl.BlockSpec  # `[dk, bv]` of `[B, H, dk, dv]` (h0, final, its cotangent, dh0)
  states: pl.BlockSpec  # `[N, dk, bv]` of `[B, H, N, dk, dv]`


def specs(t_pad: int, num_chunks: int, key_dim: int, block_v: int, group: int) -> Specs:
  return Specs(
      qk=pl.BlockSpec((None, t_pad, None, key_dim), lambda i, b, h: (b, 0, h // group, 0)),
      v=pl.BlockSpec((None, t_pad, None, block_v), lambda i, b, h: (b, 0, h, i)),
      row=pl.BlockSpec((None, None, t_pad), lambda i, b, h: (b, h, 0)),
      counts=pl.BlockSpec((None, t_pad), lambda i, b, h: (b, 0)),
      state=pl.BlockSpec((None, None, key_dim, block_v), lambda i, b, h: (b, h, 0, i)),
      states=pl.BlockSpec((None, None, num_chunks, key_dim, block_v),
                          lambda i, b, h: (b, h, 0, 0, i)))


def forward_call(q, k, v, g, beta, h0, counts, *, chunk: int, block_v: int, num_warps: int,
                 num_stages: int, interpret: bool = False):
  """Runs the forward kernel on padded float32 inputs.

  Args: `q, k [B, Tp, K, dk]`, `v [B, Tp, H, dv]`, `g` (in-chunk cumsum), `beta [B, H, Tp]`,
  `h0 [B, H, dk, dv]`, `counts [B, Tp]` int32 or None; Tp a multiple of `chunk`, dv of `block_v`.
  Returns `(o [B, Tp, H, dv], states [B, H, Tp / chunk, dk, dv], final [B, H, dk, dv])`.
  """
  batch, t_pad, qk_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  num_chunks = t_pad // chunk
  s = specs(t_pad, num_chunks, key_dim, block_v, heads // qk_heads)
  inputs, in_specs = [q, k, v, g, beta, h0], [s.qk, s.qk, s.v, s.row, s.row, s.state]
  if counts is not None:
    inputs, in_specs = inputs + [counts], in_specs + [s.counts]
  kernel = functools.partial(_forward_kernel, chunk=chunk, num_chunks=num_chunks,
                             has_segments=counts is not None)
  f32 = lambda *shape: varying_struct(shape, jnp.float32, inputs)
  return tiles.launch(
      kernel, inputs, name="gated_delta_fwd", grid=(value_dim // block_v, batch, heads),
      in_specs=in_specs, out_specs=[s.v, s.states, s.state],
      out_shape=[f32(batch, t_pad, heads, value_dim),
                 f32(batch, heads, num_chunks, key_dim, value_dim),
                 f32(batch, heads, key_dim, value_dim)],
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)
