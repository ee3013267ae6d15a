"""Pallas (Triton) sparse attention dK/dV: key-major over the inverted selection, no atomics.

A key row is selected by many queries, in different query programs, so a query-major backward
must add dK/dV with atomics (non-deterministic, contended on early keys). Here the selection
is inverted first (XLA, outside the kernel: `attention.selection`), and each program owns one
block of `block_keys` keys and sums over exactly the (query, slot) entries that selected them:

    CSR per (batch, index set x):  entries e = (t, slot) with idx[b, t, x, slot] >= 0, sorted by
    key (a stable `lax.sort`, so the order is fixed); `ptr[j]` = first entry whose key is in
    key block j, `ptr[nk]` = number of valid entries. Padded to whole chunks of entries.

    program (b, key block j, kv head kh):   K_j, V_j  [bk, H] resident, dK, dV float32 [bk, H]
      for each chunk of `block_entries` entries of block j (entry e: query t_e, key s_e):
        onehot[e, c] = (s_e == j * bk + c)                              [be, bk]
        for each of the G q heads g of kv head kh (rows t_e * G + g of q, dout, lse, delta):
          p   = onehot * exp(q_g K_j^T * scale - lse_g)                  [be, bk]  (tt.dot)
          dV += p^T dout_g;   dp = dout_g V_j^T;   ds = p * (dp - delta_g)   (tt.dot)
          dK += ds^T q_g * scale                                                (tt.dot)

Each entry pairs with one key only (the one-hot), so a chunk computes `bk` times the scores it
keeps: with bk = 16 (the smallest tensor-core tile) that is the price of running every product
on tensor cores without atomics. Cost O(T * k * G * H * bk) FLOPs (tensor cores), O(T * k)
int32 for the CSR plus one sort of T * k keys per (batch, index set); deterministic.
Duplicated slots of one query are two entries and add twice, as in the XLA path.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.block_sizes import padded_head_dim
from attention.common import varying_struct
from attention.kernels import flash_tiles as tiles
from attention.scores import modify
from attention.selection import inverted_selection

BLOCK_KEYS = 16  # keys per program (tensor-core minimum)
BLOCK_ENTRIES = 32  # (query, slot) entries per inner step


def _dkdv_kernel(ptr_ref, entry_t_ref, entry_key_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref,
                 v_ref, dk_ref, dv_ref, *, scale: float, soft_cap: float | None, group: int,
                 block_keys: int, block_entries: int, precision):
  """Refs: ptr `[nk + 1]`, entry_t/entry_key `[E + be]`, q `[T * G, H]`, dout `[T * G, Hv]`
  (row t * G + g), lse/delta `[T * G]`, k `[bk, H]`, v `[bk, Hv]`; outputs dk `[bk, H]`, dv
  `[bk, Hv]` float32."""
  j = pl.program_id(1)
  bk, be = block_keys, block_entries
  k, v = k_ref[...], v_ref[...]
  start, end = ptr_ref[j], ptr_ref[j + 1]
  key_ids = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]  # 1 bk

  def chunk(c, carry):
    first = start + c * be
    entries = pl.ds(first, be)
    valid = first + jnp.arange(be, dtype=jnp.int32) < end  # be
    t_e = jnp.where(valid, entry_t_ref[entries], 0)
    onehot = (entry_key_ref[entries][:, None] == key_ids) & valid[:, None]  # be bk

    def head(g, carry):
      dk, dv = carry
      rows = t_e * group + g
      q, do = q_ref[rows], do_ref[rows]  # be H
      lse, delta = lse_ref[rows], delta_ref[rows]  # be
      s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # be bk
      s, dcap = modify(s, soft_cap)
      p = jnp.where(onehot, jnp.exp(s - lse[:, None]), 0.0)
      dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
      dp = plgpu.dot(do, v, trans_b=True, precision=precision)  # be bk
      ds = p * (dp - delta[:, None])
      if dcap is not None:
        ds = ds * dcap
      dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
      return dk, dv

    return lax.fori_loop(0, group, head, carry)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, tiles.cdiv(end - start, be), chunk, (zeros(k), zeros(v)))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def sparse_dkdv_pallas(q, k, v, idx, dout, lse, delta, *, scale: float,
                       soft_cap: float | None = None, num_warps: int = 4, num_stages: int = 2,
                       interpret: bool = False):
  """`(dk [B, S, K, H], dv [B, S, K, Hv])` (k's / v's dtype) of top-k attention, key-major and
  atomic-free.

  Args: q `[B, T, N, H]`, dout `[B, T, N, Hv]`; k `[B, S, K, H]`, v `[B, S, K, Hv]`; idx
  `[B, T, X, k]` effective indices (X = 1 shared or K); lse/delta `[B, T, N]` float32 (lse
  +inf where nothing was selected); soft_cap as the forward's.
  """
  b, t, n, h = q.shape
  s, kh, hv = k.shape[1], k.shape[2], v.shape[3]
  g, nx = n // kh, idx.shape[2]
  bk, be = BLOCK_KEYS, BLOCK_ENTRIES
  nk = tiles.cdiv(s, bk)
  entry_t, entry_key, ptr = inverted_selection(idx, nk, bk, be)
  pad_h = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, padded_head_dim(x.shape[3]) - x.shape[3]),))
  # q, dout: [B, K, T * G, Hp | Hvp] (row t * G + g); lse, delta: [B, K, T * G];
  # k, v: [B, K, Sp, Hp | Hvp].
  rows = lambda x: x.reshape(b, t, kh, g, *x.shape[3:]).swapaxes(1, 2).reshape(
      b, kh, t * g, *x.shape[3:])
  q_r, do_r = rows(pad_h(q)), rows(pad_h(dout.astype(q.dtype)))
  lse_r, delta_r = rows(lse[..., None])[..., 0], rows(delta[..., None])[..., 0]
  kv = lambda x: jnp.pad(pad_h(x), ((0, 0), (0, nk * bk - s), (0, 0), (0, 0))).swapaxes(1, 2)
  k_r, v_r = kv(k), kv(v)
  full_rows = lambda x: pl.BlockSpec((None, None, *x.shape[2:]),
                                     lambda i, j, x_: (i, x_, *(0,) * (x.ndim - 2)))
  csr = lambda x: pl.BlockSpec((None, None, x.shape[-1]),
                               lambda i, j, x_: (i, x_ if nx > 1 else 0, 0))
  kv_spec = lambda x: pl.BlockSpec((None, None, bk, x.shape[-1]), lambda i, j, x_: (i, x_, j, 0))
  kernel = functools.partial(_dkdv_kernel, scale=scale, soft_cap=soft_cap, group=g,
                             block_keys=bk, block_entries=be,
                             precision=tiles.dot_precision(q.dtype, False))
  dk, dv = pl.pallas_call(
      kernel, grid=(b, nk, kh),
      in_specs=[csr(ptr), csr(entry_t), csr(entry_key), full_rows(q_r), full_rows(do_r),
                full_rows(lse_r), full_rows(delta_r), kv_spec(k_r), kv_spec(v_r)],
      out_specs=[kv_spec(k_r), kv_spec(v_r)],
      out_shape=[varying_struct(x.shape, jnp.float32, (q, k, v, idx, dout, lse, delta))
                 for x in (k_r, v_r)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="sparse_attention_dkdv",
  )(ptr, entry_t, entry_key, q_r, do_r, lse_r, delta_r, k_r, v_r)
  unpad = lambda x, like: x[:, :, :s, :like.shape[3]].swapaxes(1, 2).astype(like.dtype)
  return unpad(dk, k), unpad(dv, v)
