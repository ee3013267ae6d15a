"""Pallas (Triton) kernels for block-sparse attention: forward, dQ, and (block_sparse_dkdv) dK/dV.

Same function as the XLA path (attention/block_sparse_xla.py), on effective block indices
`[B, T, X, nb]` (sorted, deduplicated, -1 slots last; X = 1 shared by all kv heads or X = K).

Forward, one program per (batch, query, kv head): the program holds the `G` query heads of its
kv head as a `[Gp, H]` tile, `Gp = max(16, next power of two >= G)` rows (zero rows pad the
group, so every product is a tensor-core `tt.dot` and one load of a key block serves the whole
GQA group). It reads its index row from a ref (Triton has no scalar prefetch), counts the
valid slots, and for each selected block loads the block's `bs` keys and values as one
contiguous tile (`k_ref[pl.ds(j * bs, bs)]`), with an online softmax::

    for each selected block j:  s = cap(q K_j^T * scale), -inf where the mask hides a key [Gp, bs]
                                m' = max(m, rowmax s); p = exp(s - m'); l = l e^(m-m') + rowsum p
                                acc = acc e^(m-m') + p V_j                              [Gp, Hv]
    out = acc / l;  lse = m + log l             (a query with nothing visible: out 0, lse -inf)

The mask (causal, window, segments, padded keys) is evaluated elementwise on every loaded block
(`flash_tiles.visible`): the front door already dropped the blocks its positions hide
entirely, so what is loaded is cut at most by the diagonal, a window edge or a segment edge.

Backward: dQ with the same grid (p recomputed from the saved lse, `dq += ds K_j`), and dK/dV
key-block-major over the inverted selection (`block_sparse_dkdv`): no atomics, deterministic.

Precision: bf16/f16 operands go to the tensor cores as they are (float32 accumulation); float32
operands multiply in exact float32 (`inputPrecision = ieee`, the flash kernels' policy).
Cost per query and kv head: O(nb * bs * Gp * H) tensor-core FLOPs, nb contiguous block loads.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import masks as masks_lib
from attention.block_sizes import MIN_PALLAS_BLOCK, BlockSparseBlockSizes, padded_head_dim
from attention.common import (backward_lse, lse_vjp, next_pow2, pad_to_size, row_delta,
                              varying_struct)
from attention.kernels import flash_tiles as tiles
from attention.kernels.block_sparse_dkdv import block_sparse_dkdv_pallas
from attention.masks import Mask
from attention.scores import ScoreMods, modify

DEFAULT_BLOCK_ROWS = 32  # (query, head) rows per step of the dK/dV kernel
NUM_WARPS, NUM_STAGES = 4, 2


def padded_group(group: int) -> int:
  """Rows of a program's q tile: `max(16, next power of two >= group)`."""
  return max(MIN_PALLAS_BLOCK, next_pow2(group))


def _block(q, slot, idx_ref, k_ref, v_ref, kv_seg_ref, q_pos, q_seg, *, geom, scale, bs,
           precision):
  """The `slot`-th selected block of a query: `(s, dcap, visible, k, v)` with the (capped)
  scores `s = q K_j^T * scale` `[Gp, bs]`, their cap derivative (or None), the mask `[1, bs]`
  and the block's keys and values (`[bs, H]`, `[bs, Hv]`: one contiguous load each)."""
  start = pl.multiple_of(idx_ref[slot] * bs, bs)
  keys = pl.ds(start, bs)
  k, v = k_ref[keys, :], v_ref[keys, :]
  s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale
  s, dcap = modify(s, geom.soft_cap)
  kv_pos = (start + jnp.arange(bs, dtype=jnp.int32))[None, :]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys][None, :]
  return s, dcap, tiles.visible(geom, q_pos, kv_pos, q_seg, kv_seg), k, v


def _query(idx_ref, pos_ref, q_seg_ref):
  """`(number of selected blocks, q position, q segment id or None)` of this program's query."""
  t = pl.program_id(0)
  count = jnp.sum((idx_ref[...] >= 0).astype(jnp.int32))
  return count, pos_ref[t], None if q_seg_ref is None else q_seg_ref[t]


def _fwd_kernel(idx_ref, pos_ref, q_ref, k_ref, v_ref, *refs, geom, scale, bs, precision):
  """Refs: idx `[nbp]`, q positions `[T]`, q `[Gp, H]`, k `[Sp, H]`, v `[Sp, Hv]` (one kv head),
  (segments: q ids `[T]`, kv ids `[Sp]`); outputs out `[Gp, Hv]`, lse `[Gp]`."""
  q_seg_ref, kv_seg_ref, _, (o_ref, lse_ref) = tiles.split_refs(geom, refs)
  count, q_pos, q_seg = _query(idx_ref, pos_ref, q_seg_ref)
  q = q_ref[...]

  def body(slot, carry):
    m, l, acc = carry
    s, _, vis, _, v = _block(q, slot, idx_ref, k_ref, v_ref, kv_seg_ref, q_pos, q_seg,
                             geom=geom, scale=scale, bs=bs, precision=precision)
    s = jnp.where(vis, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)  # Gp Hv
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[:, None] + pv

  g, hv = q.shape[0], v_ref.shape[-1]
  init = (jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32),
          jnp.zeros((g, hv), jnp.float32))
  m, l, acc = lax.fori_loop(0, count, body, init)
  has_key = l > 0
  l_safe = jnp.where(has_key, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_key, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(idx_ref, pos_ref, q_ref, do_ref, k_ref, v_ref, lse_ref, delta_ref, *refs, geom,
               scale, bs, precision):
  """Refs as the forward's, plus dout `[Gp, Hv]`, lse (+inf: nothing visible) and delta
  `[Gp]`; output dq `[Gp, H]` float32."""
  q_seg_ref, kv_seg_ref, _, (dq_ref,) = tiles.split_refs(geom, refs)
  count, q_pos, q_seg = _query(idx_ref, pos_ref, q_seg_ref)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # Gp 1

  def body(slot, dq):
    s, dcap, vis, k, v = _block(q, slot, idx_ref, k_ref, v_ref, kv_seg_ref, q_pos, q_seg,
                                geom=geom, scale=scale, bs=bs, precision=precision)
    p = jnp.where(vis, jnp.exp(s - lse), 0.0)  # Gp bs
    dp = plgpu.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta)
    if dcap is not None:
      ds = ds * dcap
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

  dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq * scale


# --- layout and launch ------------------------------------------------------------------------


def _group_tile(x, kh: int):
  """`[B, T, N, D]` -> `[B, T, K, Gp, Dp]` (zero rows pad the group, zero columns the dim)."""
  b, t, n, d = x.shape
  g = n // kh
  x = x.reshape(b, t, kh, g, d)
  return jnp.pad(x, ((0, 0),) * 3 + ((0, padded_group(g) - g), (0, padded_head_dim(d) - d)))


def _kv_tile(x, bs: int):
  """`[B, S, K, D]` -> `[B, K, Sp, Dp]` (Sp: whole blocks)."""
  x = pad_to_size(pad_to_size(x, 3, padded_head_dim(x.shape[3])), 1, -(-x.shape[1] // bs) * bs)
  return x.swapaxes(1, 2)


class Operands(NamedTuple):
  """What the three kernels read besides q / dout: k `[B, K, Sp, Hp]`, v `[B, K, Sp, Hvp]`
  (whole blocks, padded head dims), idx `[B, T, X, nbp]` (slots padded with -1 to a power of
  two), pos `[B, T]` query positions, segments `(q ids [B, T], kv ids [B, Sp])` or None."""

  k: jax.Array
  v: jax.Array
  idx: jax.Array
  pos: jax.Array
  segments: tuple[jax.Array, jax.Array] | None


def operands(k, v, aux, bs: int) -> Operands:
  """`Operands` from `aux = (effective block indices [B, T, X, nb], positions, segments)`."""
  idx, pos, segments = aux
  k, v = _kv_tile(k, bs), _kv_tile(v, bs)
  if segments is not None:
    segments = (segments[0], pad_to_size(segments[1], 1, k.shape[2], -1))
  return Operands(k, v, pad_to_size(idx, 3, next_pow2(idx.shape[3]), -1), pos, segments)


def _q_major(kernel, name: str, ops: Operands, q_tiles, rows, outs, interpret: bool):
  """`kernel` on the grid (query, batch, kv head) (the long axis first: CUDA caps the grid's
  second and third axes at 65535) with refs, in order: idx row, positions `[T]`,
  `q_tiles` (each `[B, T, K, Gp, D]`: one `[Gp, D]` tile), k, v (all keys of the kv head),
  `rows` (each `[B, T, K, Gp]`: lse, delta), segment ids (`[T]`, `[Sp]`), then the outputs
  `outs`, `(shape, dtype)` of either kind."""
  b, t, kh = q_tiles[0].shape[:3]
  sp, nx = ops.k.shape[2], ops.idx.shape[2]
  spec = lambda shape: pl.BlockSpec((None, None, None, *shape[3:]),
                                    lambda j, i, x: (i, j, x, *(0,) * (len(shape) - 3)))
  kv_spec = lambda x: pl.BlockSpec((None, None, sp, x.shape[-1]), lambda j, i, x_: (i, x_, 0, 0))
  idx_spec = pl.BlockSpec((None, None, None, ops.idx.shape[3]),
                          lambda j, i, x: (i, j, x if nx > 1 else 0, 0))
  pos_spec = pl.BlockSpec((None, t), lambda j, i, x: (i, 0))
  seg_specs = (pos_spec, pl.BlockSpec((None, sp), lambda j, i, x: (i, 0)))
  inputs = [ops.idx, ops.pos, *q_tiles, ops.k, ops.v, *rows]
  specs = ([idx_spec, pos_spec] + [spec(x.shape) for x in q_tiles] + [kv_spec(ops.k),
           kv_spec(ops.v)] + [spec(x.shape) for x in rows])
  specs, inputs = tiles.with_optional(specs, inputs, ops.segments, seg_specs, None)
  return tiles.launch(
      kernel, inputs, name=name, grid=(t, b, kh), in_specs=specs,
      out_specs=[spec(shape) for shape, _ in outs],
      out_shape=[varying_struct(shape, dtype, (*q_tiles, ops.k, ops.v, ops.idx))
                 for shape, dtype in outs],
      num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=interpret)


def block_sparse_forward_pallas(q, k, v, aux, geom, bs: int, scale: float, block_rows: int,
                                interpret: bool):
  """`out [B, T, N, Hv]`, `lse [B, N, T]` float32; `aux = (idx, q positions, segments)`."""
  del block_rows  # the dK/dV kernel's
  b, t, n, _ = q.shape
  kh, hv = k.shape[2], v.shape[3]
  ops = operands(k, v, aux, bs)
  qp = _group_tile(q, kh)
  kernel = functools.partial(_fwd_kernel, geom=geom, scale=scale, bs=bs,
                             precision=tiles.dot_precision(q.dtype, False))
  out, lse = _q_major(kernel, "block_sparse_attention_fwd", ops, [qp], [],
                      [((*qp.shape[:-1], ops.v.shape[-1]), q.dtype),
                       (qp.shape[:-1], jnp.float32)], interpret)
  g = n // kh
  out = out[..., :g, :hv].reshape(b, t, n, hv)
  return out, jnp.swapaxes(lse[..., :g].reshape(b, t, n), 1, 2)


def block_sparse_backward_pallas(q, k, v, aux, out, lse, dout, geom, bs: int, scale: float,
                                 block_rows: int, interpret: bool, *, dlse=None):
  """`(dq, dk, dv)` from the saved `lse [B, N, T]` (and its cotangent `dlse`): dQ query-major,
  dK/dV key-block-major (`block_sparse_dkdv`); no atomics."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  ops = operands(k, v, aux, bs)
  delta = row_delta(out, dout, dlse)  # B T N
  lse = backward_lse(jnp.swapaxes(lse, 1, 2))  # B T N; nothing visible -> +inf, p = 0
  qp, dop = _group_tile(q, kh), _group_tile(dout.astype(q.dtype), kh)
  rows = lambda x: jnp.pad(x.reshape(b, t, kh, g), ((0, 0),) * 3 + ((0, qp.shape[3] - g),))
  kernel = functools.partial(_dq_kernel, geom=geom, scale=scale, bs=bs,
                             precision=tiles.dot_precision(q.dtype, False))
  (dq,) = _q_major(kernel, "block_sparse_attention_dq", ops, [qp, dop], [rows(lse), rows(delta)],
                   [(qp.shape, jnp.float32)], interpret)
  dq = dq[..., :g, :h].reshape(b, t, n, h).astype(q.dtype)
  dk, dv = block_sparse_dkdv_pallas(q, dout, lse, delta, ops, geom=geom, bs=bs, scale=scale,
                                    block_rows=block_rows, interpret=interpret)
  unpad = lambda x, like: x[:, :like.shape[1], :, :like.shape[3]].astype(like.dtype)
  return dq, unpad(dk, k), unpad(dv, v)


_pallas_block_sparse = lse_vjp(block_sparse_forward_pallas, block_sparse_backward_pallas,
                               lse_grad=True)


def attend(q, k, v, idx, mask: Mask, block_size: int, scale: float,
           block_sizes: BlockSparseBlockSizes | None, interpret: bool, mods: ScoreMods):
  """The "pallas" entry of `block_sparse.IMPLEMENTATIONS`: effective block indices
  `[B, T, X, nb]`; `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both.

  `block_size` must be a power of two >= 16 (a block is one tensor-core tile); one program per
  query, so `BlockSparseBlockSizes.block_entries` is refused; `block_rows` sets the dK/dV step.
  """
  block_sizes = (block_sizes or BlockSparseBlockSizes()).only("pallas", "block_rows")
  if block_size < MIN_PALLAS_BLOCK or block_size & (block_size - 1):
    raise ValueError(f"the Pallas block-sparse kernels need block_size to be a power of two >= "
                     f"{MIN_PALLAS_BLOCK} (one tensor-core tile per block), got {block_size}; "
                     f"use implementation='xla' for other sizes.")
  b, t = q.shape[:2]
  pos = masks_lib.q_offsets(mask, b)[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # B T
  segments = None
  if mask.has_segments:
    segments = tuple(jnp.asarray(x, jnp.int32) for x in (mask.q_segment_ids,
                                                          mask.kv_segment_ids))
  geom = tiles.Geometry.of(mask, k.shape[1], mods)
  return _pallas_block_sparse(q, k, v, (idx, pos, segments), geom, block_size, scale,
                              block_sizes.block_rows or DEFAULT_BLOCK_ROWS, bool(interpret))
