"""Pallas (Triton) block-sparse attention dK/dV: key-block-major over the inverted selection.

A key block is selected by many queries, in different query programs, so a query-major
backward would have to add dK/dV with atomics (non-deterministic, contended on popular
blocks). Here the selection is inverted first (XLA, outside the kernel: the CSR of
`selection.inverted_selection` with one "key" per block), and each program owns one key
block of one kv head and sums over exactly the queries that selected it:

    CSR per (batch, index set x): entries e = queries t that selected block j, in query order;
    ptr[j] .. ptr[j + 1] are block j's entries. Padded with `block_rows` entries.

    program (key block j, b, kv head):   K_j, V_j [bs, H] resident, dK, dV float32 [bs, H]
      for each step of `block_rows` rows r = (entry, q head g) of block j, G heads per entry:
        q_r, dout_r = rows t_e * G + g of q, dout (gathered), lse_r, delta_r     [br, H]
        s  = q_r K_j^T * scale, masked elementwise (positions, segments)          [br, bs]
        p  = exp(s - lse_r);  dV += p^T dout_r;  ds = p * (dout_r V_j^T - delta_r)  (tt.dot)
        dK += ds^T q_r * scale                                                      (tt.dot)

Every computed score belongs to a (query, key) pair of the selection (unlike the token-level
dK/dV, which wastes a 16-wide one-hot per entry), and a GQA group's heads fill the rows of one
step together. Every output block is written by exactly one program: no atomics, deterministic
(the CSR is a stable sort). Cost O(T * nb * bs * N * H) FLOPs on tensor cores, O(T * nb) int32
for the CSR plus one sort of T * nb block ids per (batch, index set).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.common import pad_to_size, varying_struct
from attention.kernels import flash_tiles as tiles
from attention.scores import modify
from attention.selection import inverted_selection


def _dkdv_kernel(ptr_ref, entry_t_ref, pos_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref,
                 *refs, geom, scale: float, group: int, bs: int, block_rows: int, precision):
  """Refs: ptr `[nbk + 1]`, entry_t `[E + br]`, q positions `[T]`, q `[T * G, H]`, dout
  `[T * G, Hv]` (row t * G + g), lse/delta `[T * G]`, k `[bs, H]`, v `[bs, Hv]` (segments:
  q ids `[T]`, kv ids `[bs]`); outputs dk `[bs, H]`, dv `[bs, Hv]` float32."""
  q_seg_ref, kv_seg_ref, _, (dk_ref, dv_ref) = tiles.split_refs(geom, refs)
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  start, end = ptr_ref[j], ptr_ref[j + 1]
  num_rows = (end - start) * group
  kv_pos = (j * bs + jnp.arange(bs, dtype=jnp.int32))[None, :]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...][None, :]

  def step(c, carry):
    dk, dv = carry
    r = c * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    valid = r < num_rows
    t_e = jnp.where(valid, entry_t_ref[start + r // group], 0)
    rows = t_e * group + r % group
    q, do = q_ref[rows], do_ref[rows]  # br H
    lse, delta = lse_ref[rows][:, None], delta_ref[rows][:, None]  # br 1
    q_seg = None if q_seg_ref is None else q_seg_ref[t_e][:, None]
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # br bs
    s, dcap = modify(s, geom.soft_cap)
    vis = tiles.visible(geom, pos_ref[t_e][:, None], kv_pos, q_seg, kv_seg) & valid[:, None]
    p = jnp.where(vis, jnp.exp(s - lse), 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
    dp = plgpu.dot(do, v, trans_b=True, precision=precision)  # br bs
    ds = p * (dp - delta)
    if dcap is not None:
      ds = ds * dcap
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
    return dk, dv

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, tiles.cdiv(num_rows, block_rows), step, (zeros(k), zeros(v)))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def block_sparse_dkdv_pallas(q, dout, lse, delta, ops, *, geom, bs: int, scale: float,
                             block_rows: int, interpret: bool = False):
  """`(dk [B, Sp, K, Hp], dv [B, Sp, K, Hvp])` float32 (padded: the caller slices), key-block-
  major and atomic-free.

  Args: q `[B, T, N, H]`, dout `[B, T, N, Hv]`; lse (+inf where nothing is visible) and delta
  `[B, T, N]` float32; `ops`: the kernels' `block_sparse_pallas.Operands` (padded k and v
  tiles `[B, K, Sp, Hp | Hvp]`, effective block indices `[B, T, X, nbp]`, q positions `[B, T]`,
  segment ids or None).
  """
  k_tiles, v_tiles, idx, pos, segments = ops
  b, t, n, _ = q.shape
  kh, sp = k_tiles.shape[1], k_tiles.shape[2]
  g, nx = n // kh, idx.shape[2]
  entry_t, _, ptr = inverted_selection(idx, sp // bs, 1, block_rows)
  # q, dout: [B, K, T * G, Hp | Hvp] (row t * G + g); lse, delta: [B, K, T * G].
  rows = lambda x: x.reshape(b, t, kh, g, *x.shape[3:]).swapaxes(1, 2).reshape(
      b, kh, t * g, *x.shape[3:])
  pad_h = lambda x, like: pad_to_size(x, 3, like.shape[-1])
  q_r, do_r = rows(pad_h(q, k_tiles)), rows(pad_h(dout.astype(q.dtype), v_tiles))
  lse_r, delta_r = rows(lse[..., None])[..., 0], rows(delta[..., None])[..., 0]
  whole_rows = lambda x: pl.BlockSpec((None, None, *x.shape[2:]),
                                      lambda j, i, x_: (i, x_, *(0,) * (x.ndim - 2)))
  csr = lambda x: pl.BlockSpec((None, None, x.shape[-1]),
                               lambda j, i, x_: (i, x_ if nx > 1 else 0, 0))
  kv_spec = lambda x: pl.BlockSpec((None, None, bs, x.shape[-1]), lambda j, i, x_: (i, x_, j, 0))
  q_row_spec = pl.BlockSpec((None, t), lambda j, i, x_: (i, 0))
  seg_specs = (q_row_spec, pl.BlockSpec((None, bs), lambda j, i, x_: (i, j)))
  specs, inputs = tiles.with_optional(
      [csr(ptr), csr(entry_t), q_row_spec, whole_rows(q_r), whole_rows(do_r), whole_rows(lse_r),
       whole_rows(delta_r), kv_spec(k_tiles), kv_spec(v_tiles)],
      [ptr, entry_t, pos, q_r, do_r, lse_r, delta_r, k_tiles, v_tiles], segments, seg_specs, None)
  kernel = functools.partial(_dkdv_kernel, geom=geom, scale=scale, group=g, bs=bs,
                             block_rows=block_rows, precision=tiles.dot_precision(q.dtype, False))
  like = (q, k_tiles, v_tiles, idx, dout, lse, delta)
  dk, dv = tiles.launch(
      kernel, inputs, name="block_sparse_attention_dkdv", grid=(sp // bs, b, kh),
      in_specs=specs, out_specs=[kv_spec(k_tiles), kv_spec(v_tiles)],
      out_shape=[varying_struct(x.shape, jnp.float32, like) for x in (k_tiles, v_tiles)],
      num_warps=4, num_stages=2, interpret=interpret)
  return dk.swapaxes(1, 2), dv.swapaxes(1, 2)
