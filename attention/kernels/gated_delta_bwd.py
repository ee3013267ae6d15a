"""Pallas (Triton) backward kernel of the chunkwise gated delta rule.

One program per (v block, batch row, v head), as the forward, walks the chunks last to first,
carrying the state cotangent `dS [dk, bv]` (float32). Each chunk restarts from the state the
forward saved on entering it (`states [N, dk, bv]`) and recomputes its terms
(`gated_delta_fwd.chunk_terms`: D, K K^T, X = ((I + A)^{-1})^T, W, U), then with `R = U - W S`,
`P = (Q K^T) * D`, `dO` and `dS` (the cotangent of the chunk's end state)::

    dR  = P^T dO + (f K) dS                    dP = dO R^T       (f = e^{G_C - G})
    dS0 = (e Q)^T dO + e^{G_C} dS - W^T dR     the state cotangent entering the chunk
    dW  = -dR S^T;  d(beta e K) = X dW;  d(beta V) = X dR      (W = X^T beta e K, U = X^T beta V)
    dA  = -X (dR (beta V)^T + dW (beta e K)^T) X, on j < i    (d (I + A)^{-1})

and the chain through `A_ij = beta_i D_ij k_i . k_j`, `D_ij = e^{G_i - G_j}`, `e`, `f` and
`e^{G_C}` to dq, dk, dv, dbeta and dG (G the in-chunk cumsum; the wrapper turns dG into dg).

dv is this program's own columns. dq, dk, dbeta and dG are sums over every v block (and dq, dk
over the v heads that share a q/k head): each program writes its partial `[nV, B, Tp, H, ...]`
and the wrapper sums them in XLA, so no atomics.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attention.common import varying_struct
from attention.kernels import flash_tiles as tiles
from attention.kernels.gated_delta_fwd import (Chunk, Terms, chunk_terms, dot, load_chunk,
                                               specs, split_refs)


def _chunk_grads(c: Chunk, t: Terms, s0, do, ds, chunk: int):
  """Gradients of one chunk: `(dq, dk, dv, dbeta, dG, dS0)` (module doc)."""
  r = t.u - dot(t.w, s0)
  qk = dot(c.q, c.k, trans_b=True)
  fk = t.f[:, None] * c.k
  dr = dot(qk * t.decay, do, trans_a=True) + dot(fk, ds)
  dp = dot(do, r, trans_b=True)
  dqk = dp * t.decay
  q_s = dot(do, s0, trans_b=True)    # dO S^T  [C, dk]
  r_ds = dot(r, ds, trans_b=True)    # R dS^T  [C, dk]
  ds0 = (dot(t.e[:, None] * c.q, do, trans_a=True) + t.e_end * ds
         - dot(t.w, dr, trans_a=True))
  dw = -dot(dr, s0, trans_b=True)
  dkb, dvb = dot(t.x, dw), dot(t.x, dr)
  dt = dot(dr, t.vb, trans_b=True) + dot(dw, t.kb, trans_b=True)
  da = -dot(dot(t.x, dt), t.x)       # only its j < i part matters: `strict` is 0 elsewhere
  dkk = da * c.beta[:, None] * t.strict
  k_dkb = jnp.sum(c.k * dkb, axis=1)
  dq = t.e[:, None] * q_s + dot(dqk, c.k)
  dk = (dot(dqk, c.q, trans_a=True) + t.f[:, None] * r_ds + (c.beta * t.e)[:, None] * dkb
        + dot(dkk, c.k) + dot(dkk, c.k, trans_a=True))
  dbeta = jnp.sum(c.v * dvb, axis=1) + t.e * k_dkb + jnp.sum(da * t.strict * t.kk, axis=1)
  de = jnp.sum(c.q * q_s, axis=1) + c.beta * k_dkb
  df = jnp.sum(c.k * r_ds, axis=1)
  ddiff = dp * qk * t.decay + dkk * t.kk  # d / d(G_i - G_j)
  de_end = jnp.sum(jnp.sum(s0 * ds, axis=1))
  end = jnp.sum(df * t.f) + de_end * t.e_end
  dg = (jnp.sum(ddiff, axis=1) - jnp.sum(ddiff, axis=0) + de * t.e - df * t.f
        + jnp.where(jnp.arange(chunk) == chunk - 1, end, 0.0))
  return dq, dk, c.beta[:, None] * dvb, dbeta, dg, ds0


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, states_ref, do_ref, dfinal_ref, *refs,
                     chunk: int, num_chunks: int, has_segments: bool):
  """Refs as the forward's plus states `[N, dk, bv]`, dout `[Tp, bv]`, dfinal `[dk, bv]`;
  outputs dq, dk `[Tp, dk]` (this program's partial), dv `[Tp, bv]`, dbeta, dg `[Tp]`
  (partial), dh0 `[dk, bv]`."""
  counts_ref, (dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref, dh0_ref) = split_refs(refs,
                                                                              has_segments)

  def step(i, ds):
    n = num_chunks - 1 - i
    c = load_chunk(n, chunk, q_ref, k_ref, v_ref, g_ref, beta_ref, counts_ref)
    rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    dq, dk, dv, dbeta, dg, ds0 = _chunk_grads(c, chunk_terms(c, chunk), states_ref[n, :, :],
                                              do_ref[rows, :], ds, chunk)
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = dv
    dbeta_ref[rows] = dbeta
    dg_ref[rows] = dg
    return ds0

  dh0_ref[...] = lax.fori_loop(0, num_chunks, step, dfinal_ref[...])


def backward_call(q, k, v, g, beta, counts, states, do, dfinal, *, chunk: int, block_v: int,
                  num_warps: int, num_stages: int, interpret: bool = False):
  """Runs the backward kernel (inputs as `forward_call`'s, plus its `states`, `do [B, Tp, H,
  dv]` and `dfinal [B, H, dk, dv]`).

  Returns `(dq, dk [nV, B, Tp, H, dk], dv [B, Tp, H, dv], dbeta, dg [nV, B, H, Tp], dh0 [B, H,
  dk, dv])` float32, nV = dv / block_v; dq, dk, dbeta, dg are partial sums (sum over nV; dq, dk
  also over the v heads of a q/k head); dg is the gradient of the in-chunk cumsum `g`.
  """
  batch, t_pad, qk_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  num_chunks, num_v = t_pad // chunk, value_dim // block_v
  s = specs(t_pad, num_chunks, key_dim, block_v, heads // qk_heads)
  inputs = [q, k, v, g, beta, states, do, dfinal]
  in_specs = [s.qk, s.qk, s.v, s.row, s.row, s.states, s.v, s.state]
  if counts is not None:
    inputs, in_specs = inputs + [counts], in_specs + [s.counts]
  partial_qk = pl.BlockSpec((None, None, t_pad, None, key_dim), lambda i, b, h: (i, b, 0, h, 0))
  partial_row = pl.BlockSpec((None, None, None, t_pad), lambda i, b, h: (i, b, h, 0))
  kernel = functools.partial(_backward_kernel, chunk=chunk, num_chunks=num_chunks,
                             has_segments=counts is not None)
  f32 = lambda *shape: varying_struct(shape, jnp.float32, inputs)
  return tiles.launch(
      kernel, inputs, name="gated_delta_bwd", grid=(num_v, batch, heads), in_specs=in_specs,
      out_specs=[partial_qk, partial_qk, s.v, partial_row, partial_row, s.state],
      out_shape=[f32(num_v, batch, t_pad, heads, key_dim), f32(num_v, batch, t_pad, heads, key_dim),
                 f32(batch, t_pad, heads, value_dim), f32(num_v, batch, heads, t_pad),
                 f32(num_v, batch, heads, t_pad), f32(batch, heads, key_dim, value_dim)],
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)
