"""The pure-JAX (XLA) backend of `block_sparse_attention`: gathered key blocks, forward + backward.

On effective block indices `[B, T, X, nb]` (`block_sparse.effective_block_indices`: sorted,
deduplicated, -1 = ignored slot; X = 1 shared by all kv heads or X = K). K/V are viewed as
whole blocks, `[B, X * nbk, bs, K / X, H]` (block j of index set x is row `x * nbk + j`), so
each selected block is one gather of `bs` contiguous rows. `lax.map` over steps of `block_q`
queries: a step gathers its queries' blocks (`[B, bq, X, nb * bs, K / X, H]`), marks the keys
each query may see (`masks.effective_indices` on the blocks' key positions, under a mask
shifted to the step's first query: causality, window and segments cut blocks elementwise, and
the zero-padded keys past S are never visible), then runs the plain softmax of
`attention.slots`. The backward (`common.lse_vjp`) recomputes p from the saved lse
`[B, N, T]` and scatter-adds the per-block dK/dV into float32 block accumulators carried by a
`lax.scan`.

Cost O(T * nb * bs * N * H) compute; memory O(block_q * nb * bs * K * H + T * N)
(+ O(S * K * H) backward). The reference is `block_sparse.block_sparse_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention import masks as masks_lib
from attention.block_sizes import BlockSparseBlockSizes
from attention.common import backward_lse, lse_vjp, pad_to_multiple, row_delta
from attention.masks import Mask
from attention.reference import check_qkv
from attention.scores import ScoreMods
from attention.slots import from_q_blocks, q_blocks, slot_grads, slot_softmax, split_heads

DEFAULT_BLOCK_Q = 16


def _to_blocks(x, bs: int, nx: int):
  """`[B, S, K, H]` -> `[B, X * nbk, bs, K / X, H]` (S padded with zeros to whole blocks)."""
  b, _, kh, h = x.shape
  x = pad_to_multiple(x, 1, bs).reshape(b, -1, bs, nx, kh // nx, h)  # B nbk bs X R H
  return x.transpose(0, 3, 1, 2, 4, 5).reshape(b, -1, bs, kh // nx, h)


def _from_blocks(xb, nx: int, s: int):
  """Inverse of `_to_blocks`: `[B, X * nbk, bs, R, H]` -> `[B, S, X * R, H]`."""
  b, m, bs, r, h = xb.shape
  x = xb.reshape(b, nx, m // nx, bs, r, h).transpose(0, 2, 3, 1, 4, 5)  # B nbk bs X R H
  return x.reshape(b, -1, nx * r, h)[:, :s]


def _rows(idx, nbk: int):
  """Block rows of `_to_blocks`' layout for block ids `idx [B, t, X, nb]` (>= 0)."""
  return idx + nbk * jnp.arange(idx.shape[2], dtype=jnp.int32)[None, None, :, None]


def _gather(xb, rows):
  """Blocks `xb [B, M, bs, R, H]` at `rows [B, t, X, nb]` -> `[B, t, X, nb * bs, R, H]`."""
  taken = jax.vmap(lambda x, i: x.at[i].get(mode="promise_in_bounds"))(xb, rows)
  return taken.reshape(*rows.shape[:3], -1, *xb.shape[3:])


def _scatter_add(acc, rows, values):
  """`acc [B, M, bs, R, H] += values [B, t, X, nb * bs, R, H]` at `rows` (inverse of _gather)."""
  values = values.reshape(*rows.shape, *acc.shape[2:])
  return jax.vmap(lambda a, i, x: a.at[i].add(x, mode="promise_in_bounds"))(acc, rows, values)


def _visible(idx, mask: Mask, step, bq: int, q_seg, bs: int, s: int, kh: int):
  """`[B, bq, X, nb * bs]`: the keys of each query's selected blocks that `mask` shows.

  `step` numbers the `bq` queries (`q_seg` their segment ids); keys past `s` are invisible."""
  b, t, nx, nb = idx.shape
  keys = idx[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)  # B t X nb bs
  keys = jnp.where(idx[..., None] >= 0, keys, -1).reshape(b, t, nx, nb * bs)
  local = Mask(causal=mask.causal, window=mask.window, q_segment_ids=q_seg,
               kv_segment_ids=mask.kv_segment_ids, q_offset=mask.q_offset + step * bq)
  keys = keys[:, :, 0] if nx == 1 else keys  # [B, t, k] shared, [B, t, K, k] per kv head
  return masks_lib.effective_indices(keys, local, b, t, s, kh) >= 0


def _steps(q, idx, mask: Mask, bq: int):
  """`lax.map` inputs: step number, q, block ids and q segment ids (or None) per step."""
  steps = jnp.arange(-(-q.shape[1] // bq), dtype=jnp.int32)
  q_seg = q_blocks(mask.q_segment_ids, bq) if mask.has_segments else None
  return steps, q_blocks(q, bq), q_blocks(idx, bq), q_seg


def _unpack(aux, structure) -> tuple[jax.Array, Mask]:
  """`(idx, mask)` from the custom_vjp's arrays `(idx, segments or None, q offsets [B])` and
  the mask's static `(causal, window)` (a Mask is built here, never passed through the vjp)."""
  (idx, segments, offsets), (causal, window) = aux, structure
  q_seg, kv_seg = segments if segments is not None else (None, None)
  return idx, Mask(causal=causal, window=window, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                   q_offset=offsets)


def block_sparse_forward_xla(q, k, v, aux, bs: int, scale: float, bq: int,
                             soft_cap: float | None, structure):
  """`out [B, T, N, Hv]` (q.dtype) and `lse [B, N, T]` float32 (-inf where nothing is visible);
  `aux = (idx [B, T, X, nb], segment ids or None, q offsets [B])`, `structure` the mask's
  `(causal, window)`."""
  idx, mask = _unpack(aux, structure)
  b, t, s, n, kh, _ = check_qkv(q, k, v, value_dim=True)
  nx, hv, nbk = idx.shape[2], v.shape[3], -(-s // bs)
  kb, vb = _to_blocks(k, bs, nx), _to_blocks(v, bs, nx)

  def step(args):
    i, q_blk, idx_blk, seg_blk = args  # B bq N H, B bq X nb, B bq
    rows = _rows(jnp.maximum(idx_blk, 0), nbk)
    valid = _visible(idx_blk, mask, i, bq, seg_blk, bs, s, kh)
    o, lse = slot_softmax(split_heads(q_blk, nx, kh), _gather(kb, rows), _gather(vb, rows),
                          valid, scale, soft_cap, q.dtype)
    return o.reshape(b, -1, n, hv), lse.reshape(b, -1, n)

  out, lse = lax.map(step, _steps(q, idx, mask, bq))
  return from_q_blocks(out, t), jnp.swapaxes(from_q_blocks(lse, t), 1, 2)


def block_sparse_backward_xla(q, k, v, aux, out, lse, dout, bs: int, scale: float, bq: int,
                              soft_cap: float | None, structure, *, dlse=None):
  """`(dq, dk, dv)`: p recomputed per step, dq directly, dK/dV scatter-added per block."""
  idx, mask = _unpack(aux, structure)
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  nx, nbk = idx.shape[2], -(-s // bs)
  kb, vb = _to_blocks(k, bs, nx), _to_blocks(v, bs, nx)
  delta = row_delta(out, dout, dlse)  # B T N
  lse = jnp.swapaxes(backward_lse(lse), 1, 2)  # B T N; nothing visible -> p = 0
  split = lambda x: split_heads(x, nx, kh)

  def step(carry, args):
    dkb, dvb = carry
    (i, q_blk, idx_blk, seg_blk), (do_blk, lse_blk, delta_blk) = args
    rows = _rows(jnp.maximum(idx_blk, 0), nbk)
    valid = _visible(idx_blk, mask, i, bq, seg_blk, bs, s, kh)
    dq, dk_rows, dv_rows = slot_grads(
        split(q_blk), split(do_blk), _gather(kb, rows), _gather(vb, rows), valid,
        split(lse_blk[..., None]), split(delta_blk[..., None]), scale, soft_cap)
    carry = _scatter_add(dkb, rows, dk_rows), _scatter_add(dvb, rows, dv_rows)
    return carry, dq.reshape(b, -1, n, h)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  xs = (_steps(q, idx, mask, bq), tuple(q_blocks(x, bq) for x in (dout, lse, delta)))
  (dkb, dvb), dq = lax.scan(step, (zeros(kb), zeros(vb)), xs)
  return (from_q_blocks(dq, t).astype(q.dtype), _from_blocks(dkb, nx, s).astype(k.dtype),
          _from_blocks(dvb, nx, s).astype(v.dtype))


_xla_block_sparse = lse_vjp(block_sparse_forward_xla, block_sparse_backward_xla, lse_grad=True)


def attend(q, k, v, idx, mask: Mask, block_size: int, scale: float,
           block_sizes: BlockSparseBlockSizes | None, interpret: bool, mods: ScoreMods):
  """The "xla" entry of `block_sparse.IMPLEMENTATIONS`: effective block indices `[B, T, X, nb]`;
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both (soft-cap: `mods.soft_cap`)."""
  del interpret  # refused by the front door for "xla"
  block_sizes = (block_sizes or BlockSparseBlockSizes()).only("xla", "block_q")
  bq = min(block_sizes.block_q or DEFAULT_BLOCK_Q, q.shape[1])
  segments = (mask.q_segment_ids, mask.kv_segment_ids) if mask.has_segments else None
  aux = (idx, segments, masks_lib.q_offsets(mask, q.shape[0]))
  return _xla_block_sparse(q, k, v, aux, block_size, scale, bq, mods.soft_cap,
                           (mask.causal, mask.window))
