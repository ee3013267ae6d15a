"""Pallas (Triton) kernels for top-k gather attention: forward and backward.

Same function as the XLA path in attention/sparse.py, on effective indices `[B, T, X, k]`
(-1 = ignored slot, X = 1 shared by all kv heads or X = K):

Forward, one program per (batch, query, kv head): the program holds the `G` query heads of
that kv head, walks the query's index list in chunks of `block_k` slots, loads the selected key
and value rows by index (a gather load `k_ref[idx]`), and keeps an online softmax::

    for each chunk c:  s = q k[idx_c]^T * scale   (-inf on -1 slots)
                       m' = max(m, rowmax s); p = exp(s - m'); l = l e^(m-m') + rowsum p
                       acc = acc e^(m-m') + p v[idx_c]
    out = acc / l;  lse = m + log l            (a query with no slot: out 0, lse -inf)

Backward, same grid, recomputing p from the saved lse: dq is accumulated in the program;
dK/dV rows are scattered with `plgpu.atomic_add` (float32, masked on -1 slots) into
`[B, K, S + 1, H]` accumulators aliased to zero-initialised inputs (row S is a spare row that
ignored slots point at: interpret mode cannot mask atomics; their values are 0 there).
Interpret mode applies a chunk's adds as one gather/set, so it needs distinct indices within
a chunk of one query (as `indexer_topk` guarantees); on GPU duplicates add up correctly. Atomics are used because a key
row is selected by many queries in different programs; returning per-slot gradients instead
would cost O(T * k * H) memory. The order of float adds is not deterministic on GPU.

The per-query programs multiply with broadcasts + reductions instead of `tl.dot` (G and the
slot count per query are often below the 16x16 minimum of `tl.dot`). G, H and `block_k` are
padded to powers of two as Triton requires.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.block_sizes import SparseBlockSizes
from attention.common import lse_vjp, next_pow2

DEFAULT_BLOCK_K = 64


def _chunk(idx_ref, c, block_k):
  idx = idx_ref[pl.ds(c * block_k, block_k)]
  valid = idx >= 0
  return jnp.where(valid, idx, 0), valid


def _scores(q, k_rows, valid, scale):
  """q `[G, H]`, rows `[bk, H]` -> `[G, bk]` float32 (-inf on invalid slots)."""
  s = jnp.sum(q[:, None, :] * k_rows.astype(jnp.float32)[None, :, :], axis=-1) * scale
  return jnp.where(valid[None, :], s, -jnp.inf)


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, scale, block_k, num_chunks):
  q = q_ref[...].astype(jnp.float32)  # G H
  g, h = q.shape

  def body(c, carry):
    m, l, acc = carry
    safe, valid = _chunk(idx_ref, c, block_k)
    s = _scores(q, k_ref[safe], valid, scale)  # G bk
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    v_rows = v_ref[safe].astype(jnp.float32)  # bk H
    pv = jnp.sum(p[:, :, None] * v_rows[None, :, :], axis=1)  # G H
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[:, None] + pv

  init = (jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32),
          jnp.zeros((g, h), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
  has_key = l > 0
  l_safe = jnp.where(has_key, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_key, m + jnp.log(l_safe), -jnp.inf)


def _bwd_kernel(q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dk_in, dv_in,
                dq_ref, dk_ref, dv_ref, *, scale, block_k, num_chunks, masked_atomics):
  del dk_in, dv_in  # aliased to dk_ref, dv_ref (zero-initialised accumulators)
  q = q_ref[...].astype(jnp.float32)  # G H
  h = q.shape[-1]
  do = do_ref[...].astype(jnp.float32)
  lse = lse_ref[...]
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # nothing selected -> p = 0
  delta = delta_ref[...]

  def body(c, dq):
    safe, valid = _chunk(idx_ref, c, block_k)
    k_rows = k_ref[safe].astype(jnp.float32)
    v_rows = v_ref[safe].astype(jnp.float32)
    p = jnp.exp(_scores(q, k_rows, valid, scale) - lse[:, None])  # G bk
    dp = jnp.sum(do[:, None, :] * v_rows[None, :, :], axis=-1)
    ds = p * (dp - delta[:, None]) * scale
    dq = dq + jnp.sum(ds[:, :, None] * k_rows[None, :, :], axis=1)
    dk_rows = jnp.sum(ds[:, :, None] * q[:, None, :], axis=0)  # bk H
    dv_rows = jnp.sum(p[:, :, None] * do[:, None, :], axis=0)
    # Element indices [bk, H]; ignored slots go to the spare row S (their values are 0 anyway).
    trash = dk_ref.shape[0] - 1
    rows = jnp.broadcast_to(jnp.where(valid, safe, trash)[:, None], dk_rows.shape)
    cols = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32)[None, :], dk_rows.shape)
    mask = jnp.broadcast_to(valid[:, None], dk_rows.shape) if masked_atomics else None
    plgpu.atomic_add(dk_ref, (rows, cols), dk_rows, mask=mask)
    plgpu.atomic_add(dv_ref, (rows, cols), dv_rows, mask=mask)
    return dq

  dq = jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# --- layout ---------------------------------------------------------------------------------


def _layout(q, k, v, idx, block_k):
  """Padded kernel layouts: q `[B, T, K, Gp, Hp]`, k/v `[B, K, S, Hp]`, idx `[B, T, X, kp]`."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  gp, hp = next_pow2(g), next_pow2(h)
  bk = min(block_k, next_pow2(idx.shape[-1]))
  kp = -(-idx.shape[-1] // bk) * bk
  q = jnp.pad(q.reshape(b, t, kh, g, h), ((0, 0),) * 3 + ((0, gp - g), (0, hp - h)))
  k = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0),) * 3 + ((0, hp - h),))
  v = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0),) * 3 + ((0, hp - h),))
  idx = jnp.pad(idx, ((0, 0),) * 3 + ((0, kp - idx.shape[-1]),), constant_values=-1)
  return q, k, v, idx, bk


def _specs(q, k, idx):
  b, t, kh, gp, hp = q.shape
  s, kp, nx = k.shape[2], idx.shape[-1], idx.shape[2]
  q_spec = pl.BlockSpec((None, None, None, gp, hp), lambda i, j, x: (i, j, x, 0, 0))
  kv_spec = pl.BlockSpec((None, None, s, hp), lambda i, j, x: (i, x, 0, 0))
  idx_spec = pl.BlockSpec((None, None, None, kp),
                          lambda i, j, x: (i, j, x if nx > 1 else 0, 0))
  row_spec = pl.BlockSpec((None, None, None, gp), lambda i, j, x: (i, j, x, 0))
  return (b, t, kh), q_spec, kv_spec, idx_spec, row_spec


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def sparse_forward_pallas(q, k, v, idx, *, scale, block_k=DEFAULT_BLOCK_K, num_warps=4,
                          num_stages=2, interpret=False):
  """`out [B, T, N, H]` and `lse [B, N, T]` float32, from effective indices `[B, T, X, k]`."""
  b, t, n, h = q.shape
  qp, kp_, vp, idxp, bk = _layout(q, k, v, idx, block_k)
  grid, q_spec, kv_spec, idx_spec, row_spec = _specs(qp, kp_, idxp)
  kernel = functools.partial(_fwd_kernel, scale=scale, block_k=bk,
                             num_chunks=idxp.shape[-1] // bk)
  out, lse = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[q_spec, kv_spec, kv_spec, idx_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct(qp.shape[:-1], jnp.float32)],
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="sparse_attention_fwd",
  )(qp, kp_, vp, idxp)
  g = n // k.shape[2]
  out = out[..., :g, :h].reshape(b, t, n, h)
  return out, jnp.swapaxes(lse[..., :g].reshape(b, t, n), 1, 2)


def sparse_backward_pallas(q, k, v, idx, out, lse, dout, *, scale, block_k=DEFAULT_BLOCK_K,
                           num_warps=4, num_stages=2, interpret=False):
  """`(dq, dk, dv)` with dk/dv scatter-added by float32 atomics."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # B T N
  lse = jnp.swapaxes(lse, 1, 2)  # B N T -> B T N
  qp, kp_, vp, idxp, bk = _layout(q, k, v, idx, block_k)
  dop = _layout(dout, k, v, idx, block_k)[0]
  gp, hp = qp.shape[-2:]
  rows = lambda x: jnp.pad(x.reshape(b, t, kh, g), ((0, 0),) * 3 + ((0, gp - g),))
  grid, q_spec, kv_spec, idx_spec, row_spec = _specs(qp, kp_, idxp)
  # dK/dV accumulators get one spare row (S) that ignored slots point at.
  zeros = jnp.zeros((b, kh, s + 1, hp), jnp.float32)
  acc_spec = pl.BlockSpec((None, None, s + 1, hp), lambda i, j, x: (i, x, 0, 0))
  kernel = functools.partial(_bwd_kernel, scale=scale, block_k=bk,
                             num_chunks=idxp.shape[-1] // bk, masked_atomics=not interpret)
  dq, dk, dv = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[q_spec, kv_spec, kv_spec, idx_spec, q_spec, row_spec, row_spec, acc_spec,
                acc_spec],
      out_specs=[q_spec, acc_spec, acc_spec],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, jnp.float32),
                 jax.ShapeDtypeStruct(zeros.shape, jnp.float32),
                 jax.ShapeDtypeStruct(zeros.shape, jnp.float32)],
      input_output_aliases={7: 1, 8: 2},
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="sparse_attention_bwd",
  )(qp, kp_, vp, idxp, dop, rows(lse), rows(delta), zeros, zeros)
  dq = dq[..., :g, :h].reshape(b, t, n, h).astype(q.dtype)
  dk = dk[:, :, :s, :h].transpose(0, 2, 1, 3).astype(k.dtype)
  dv = dv[:, :, :s, :h].transpose(0, 2, 1, 3).astype(v.dtype)
  return dq, dk, dv


_pallas_sparse = lse_vjp(
    lambda q, k, v, idx, scale, block_k, interpret: sparse_forward_pallas(
        q, k, v, idx, scale=scale, block_k=block_k, interpret=interpret),
    lambda q, k, v, idx, out, lse, dout, scale, block_k, interpret: sparse_backward_pallas(
        q, k, v, idx, out, lse, dout, scale=scale, block_k=block_k, interpret=interpret))


def attend(q, k, v, idx, scale: float, block_sizes: SparseBlockSizes | None,
           interpret: bool = False):
  """The "pallas" entry of `sparse.IMPLEMENTATIONS`: effective indices `[B, T, X, k]`.

  One program per query, so `SparseBlockSizes.block_q` is refused; `block_k` slots per step.
  """
  block_sizes = (block_sizes or SparseBlockSizes()).only("pallas", "block_k")
  return _pallas_sparse(q, k, v, idx, scale, block_sizes.block_k or DEFAULT_BLOCK_K,
                        bool(interpret))


def sparse_attention_pallas(q, k, v, idx, *, scale: float, interpret: bool = False):
  """Top-k gather attention with Pallas kernels; `idx` are effective indices `[B, T, X, k]`."""
  return attend(q, k, v, idx, scale, None, interpret)
