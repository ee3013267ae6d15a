"""Pallas (Triton) kernels for top-k gather attention: forward, dQ, and (sparse_dkdv) dK/dV.

Same function as the XLA path in attention/sparse.py, on effective indices `[B, T, X, k]`
(-1 = ignored slot, X = 1 shared by all kv heads or X = K):

Forward, one program per (batch, query, kv head): the program holds the `G` query heads of
that kv head as a `[Gp, H]` tile, `Gp = max(16, next power of two >= G)` rows (zero rows pad
the group: in MQA all heads of a token share the selected keys, which is what makes this a
matrix product, as in FlashMLA's sparse kernels). It walks the query's index list in chunks of
`block_k` slots, gathers the selected key and value rows (`k_ref[idx]`, `[bk, H]`) and keeps an
online softmax with both products on tensor cores (`tt.dot`, float32 accumulation)::

    for each chunk c:  s = cap(q k[idx_c]^T * scale)   (-inf on -1 slots)   [Gp, bk]
                       m' = max(m, rowmax s); p = exp(s - m'); l = l e^(m-m') + rowsum p
                       acc = acc e^(m-m') + p v[idx_c]                        [Gp, H]
    out = acc / l;  lse = m + log l            (a query with no slot: out 0, lse -inf)

Backward: dQ with the same grid (p recomputed from the saved lse, `ds = p * (dp - delta)`,
`dq += ds k[idx]`), and dK/dV key-major over the inverted selection (`sparse_dkdv`): every
output row is written by exactly one program, so there are no atomics and the result is
deterministic.

Precision: bf16/f16 operands go to the tensor cores as they are (float32 accumulation); float32
operands multiply in exact float32 (`inputPrecision = ieee`, the flash kernels' policy).
Cost per query: O(k * Gp * H) tensor-core FLOPs and O(k * H) gathered bytes per kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.block_sizes import SparseBlockSizes, padded_head_dim
from attention.common import backward_lse, lse_vjp, row_delta, varying_struct
from attention.kernels import flash_tiles as tiles
from attention.kernels.sparse_dkdv import sparse_dkdv_pallas
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods, modify

DEFAULT_BLOCK_K = 64
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows


def padded_group(group: int) -> int:
  """Rows of a program's q tile: `max(16, next power of two >= group)`."""
  return max(MIN_DOT_ROWS, 1 << max(0, group - 1).bit_length())


def _chunk(idx_ref, c, block_k):
  idx = idx_ref[pl.ds(c * block_k, block_k)]
  valid = idx >= 0
  return jnp.where(valid, idx, 0), valid


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, scale, soft_cap, block_k,
                num_chunks, precision):
  """Refs: q `[Gp, H]`, k `[S, H]`, v `[S, Hv]` (one kv head), idx `[kp]`; out `[Gp, Hv]`,
  lse `[Gp]`."""
  q = q_ref[...]
  g, hv = q.shape[0], v_ref.shape[-1]

  def body(c, carry):
    m, l, acc = carry
    safe, valid = _chunk(idx_ref, c, block_k)
    k_rows, v_rows = k_ref[safe], v_ref[safe]  # bk H
    s = plgpu.dot(q, k_rows, trans_b=True, precision=precision) * scale  # Gp bk
    s, _ = modify(s, soft_cap)
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    pv = plgpu.dot(p.astype(v_rows.dtype), v_rows, precision=precision)  # Gp H
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[:, None] + pv

  init = (jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32),
          jnp.zeros((g, hv), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
  has_key = l > 0
  l_safe = jnp.where(has_key, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_key, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               soft_cap, block_k, num_chunks, precision):
  """Refs: q `[Gp, H]`, dout `[Gp, Hv]`, k `[S, H]`, v `[S, Hv]`, idx `[kp]`, lse (+inf:
  nothing selected) and delta `[Gp]`; output dq `[Gp, H]` float32."""
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # Gp 1

  def body(c, dq):
    safe, valid = _chunk(idx_ref, c, block_k)
    k_rows, v_rows = k_ref[safe], v_ref[safe]  # bk H
    s = plgpu.dot(q, k_rows, trans_b=True, precision=precision) * scale
    s, dcap = modify(s, soft_cap)
    p = jnp.where(valid[None, :], jnp.exp(s - lse), 0.0)  # Gp bk
    dp = plgpu.dot(do, v_rows, trans_b=True, precision=precision)
    ds = p * (dp - delta)
    if dcap is not None:
      ds = ds * dcap
    return dq + plgpu.dot(ds.astype(k_rows.dtype), k_rows, precision=precision)

  dq = jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq * scale


# --- layout ---------------------------------------------------------------------------------


def _layout(q, k, v, idx, block_k):
  """Padded kernel layouts: q `[B, T, K, Gp, Hp]`, k `[B, K, S, Hp]`, v `[B, K, S, Hvp]`, idx
  `[B, T, X, kp]` (q may be dout: its own head dim is padded)."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  gp, hp, hvp = padded_group(g), padded_head_dim(h), padded_head_dim(v.shape[3])
  bk = min(block_k, max(MIN_DOT_ROWS, 1 << max(0, idx.shape[-1] - 1).bit_length()))
  kp = -(-idx.shape[-1] // bk) * bk
  q = jnp.pad(q.reshape(b, t, kh, g, h), ((0, 0),) * 3 + ((0, gp - g), (0, hp - h)))
  k = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0),) * 3 + ((0, padded_head_dim(k.shape[3]) -
                                                           k.shape[3]),))
  v = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0),) * 3 + ((0, hvp - v.shape[3]),))
  idx = jnp.pad(idx, ((0, 0),) * 3 + ((0, kp - idx.shape[-1]),), constant_values=-1)
  return q, k, v, idx, bk


def _specs(q, k, idx):
  """Grid and BlockSpecs; `q_spec(d)` / `kv_spec(d)` for a head dim d (q/k's or v's)."""
  b, t, kh, gp, _ = q.shape
  s, kp, nx = k.shape[2], idx.shape[-1], idx.shape[2]
  q_spec = lambda d: pl.BlockSpec((None, None, None, gp, d), lambda i, j, x: (i, j, x, 0, 0))
  kv_spec = lambda d: pl.BlockSpec((None, None, s, d), lambda i, j, x: (i, x, 0, 0))
  idx_spec = pl.BlockSpec((None, None, None, kp),
                          lambda i, j, x: (i, j, x if nx > 1 else 0, 0))
  row_spec = pl.BlockSpec((None, None, None, gp), lambda i, j, x: (i, j, x, 0))
  return (b, t, kh), q_spec, kv_spec, idx_spec, row_spec


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def sparse_forward_pallas(q, k, v, idx, *, scale, soft_cap=None, block_k=DEFAULT_BLOCK_K,
                          num_warps=4, num_stages=2, interpret=False):
  """`out [B, T, N, Hv]` and `lse [B, N, T]` float32, from effective indices `[B, T, X, k]`."""
  b, t, n, _ = q.shape
  hv = v.shape[3]
  qp, kp_, vp, idxp, bk = _layout(q, k, v, idx, block_k)
  hp, hvp = qp.shape[-1], vp.shape[-1]
  grid, q_spec, kv_spec, idx_spec, row_spec = _specs(qp, kp_, idxp)
  kernel = functools.partial(_fwd_kernel, scale=scale, soft_cap=soft_cap, block_k=bk,
                             num_chunks=idxp.shape[-1] // bk,
                             precision=tiles.dot_precision(q.dtype, False))
  out, lse = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[q_spec(hp), kv_spec(hp), kv_spec(hvp), idx_spec],
      out_specs=[q_spec(hvp), row_spec],
      out_shape=[varying_struct((*qp.shape[:-1], hvp), q.dtype, (qp, kp_, vp, idxp)),
                 varying_struct(qp.shape[:-1], jnp.float32, (qp, kp_, vp, idxp))],
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="sparse_attention_fwd",
  )(qp, kp_, vp, idxp)
  g = n // k.shape[2]
  out = out[..., :g, :hv].reshape(b, t, n, hv)
  return out, jnp.swapaxes(lse[..., :g].reshape(b, t, n), 1, 2)


def sparse_backward_pallas(q, k, v, idx, out, lse, dout, *, scale, soft_cap=None, dlse=None,
                           block_k=DEFAULT_BLOCK_K, num_warps=4, num_stages=2, interpret=False):
  """`(dq, dk, dv)` from the saved `lse [B, N, T]` (and its cotangent `dlse`, `row_delta`): dQ
  query-major, dK/dV key-major (`sparse_dkdv`); no atomics."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  delta = row_delta(out, dout, dlse)  # B T N
  lse = backward_lse(jnp.swapaxes(lse, 1, 2))  # B T N; nothing selected -> +inf, p = 0
  qp, kp_, vp, idxp, bk = _layout(q, k, v, idx, block_k)
  dop = _layout(dout.astype(q.dtype), k, v, idx, block_k)[0]
  gp, hp, hvp = qp.shape[-2], qp.shape[-1], vp.shape[-1]
  rows = lambda x: jnp.pad(x.reshape(b, t, kh, g), ((0, 0),) * 3 + ((0, gp - g),))
  grid, q_spec, kv_spec, idx_spec, row_spec = _specs(qp, kp_, idxp)
  kernel = functools.partial(_dq_kernel, scale=scale, soft_cap=soft_cap, block_k=bk,
                             num_chunks=idxp.shape[-1] // bk,
                             precision=tiles.dot_precision(q.dtype, False))
  dq = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[q_spec(hp), kv_spec(hp), kv_spec(hvp), idx_spec, q_spec(hvp), row_spec,
                row_spec],
      out_specs=q_spec(hp),
      out_shape=varying_struct(qp.shape, jnp.float32, (qp, kp_, vp, idxp, dop, lse, delta)),
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="sparse_attention_dq",
  )(qp, kp_, vp, idxp, dop, rows(lse), rows(delta))
  dq = dq[..., :g, :h].reshape(b, t, n, h).astype(q.dtype)
  dk, dv = sparse_dkdv_pallas(q, k, v, idx, dout, lse, delta, scale=scale, soft_cap=soft_cap,
                              num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  return dq, dk, dv


_pallas_sparse = lse_vjp(
    lambda q, k, v, idx, scale, soft_cap, block_k, interpret: sparse_forward_pallas(
        q, k, v, idx, scale=scale, soft_cap=soft_cap, block_k=block_k, interpret=interpret),
    lambda q, k, v, idx, out, lse, dout, scale, soft_cap, block_k, interpret, dlse:
    sparse_backward_pallas(q, k, v, idx, out, lse, dout, scale=scale, soft_cap=soft_cap,
                           dlse=dlse, block_k=block_k, interpret=interpret),
    lse_grad=True)


def attend(q, k, v, idx, scale: float, block_sizes: SparseBlockSizes | None,
           interpret: bool = False, mods: ScoreMods = NO_MODS):
  """The "pallas" entry of `sparse.IMPLEMENTATIONS`: effective indices `[B, T, X, k]`;
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both (soft-cap: `mods.soft_cap`).

  One program per query, so `SparseBlockSizes.block_q` is refused; `block_k` slots per step.
  """
  block_sizes = (block_sizes or SparseBlockSizes()).only("pallas", "block_k")
  return _pallas_sparse(q, k, v, idx, scale, mods.soft_cap,
                        block_sizes.block_k or DEFAULT_BLOCK_K, bool(interpret))


def sparse_attention_pallas(q, k, v, idx, *, scale: float, interpret: bool = False):
  """Top-k gather attention with Pallas kernels; `idx` are effective indices `[B, T, X, k]`."""
  return attend(q, k, v, idx, scale, None, interpret)[0]
