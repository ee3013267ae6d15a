"""The pure-JAX (XLA) backend of `block_sparse_attention`: gathered key blocks, forward + backward.

On effective block indices `[B, T, X, nb]` (`block_sparse.effective_block_indices`: sorted,
deduplicated, -1 = ignored slot; X = 1 shared by all kv heads or X = K). K/V are viewed as
whole blocks, `[B, X * nbk, bs, K / X, H]` (block j of index set x is row `x * nbk + j`), so
each selected block is one gather of `bs` contiguous rows.

Forward, query-major: `lax.map` over steps of `block_q` queries; a step gathers its queries'
blocks (`[B, bq, X, nb * bs, K / X, H]`), marks the keys each query may see
(`masks.effective_indices` on the blocks' key positions, under a mask shifted to the step's
first query: causality, window and segments cut blocks elementwise, and the zero-padded keys
past S are never visible), then runs the plain softmax of `attention.slots`.

Backward, key-block-major (`common.lse_vjp`, p recomputed from the saved lse `[B, N, T]`): the
selection is inverted (`attention.selection`) and a `lax.scan` walks chunks of up to
`BWD_ENTRIES` queries that selected one key block, so every product is a matrix product
against one resident block (`[be * G, H] x [H, bs]`) and dK/dV are added once per chunk (a
query-major backward would materialise and scatter a per-query copy of every block's dK/dV:
O(T * nb * bs * K * H) memory traffic on top of the FLOPs).

Cost O(T * nb * bs * N * H) compute; memory O(block_q * nb * bs * K * H + T * N) forward,
O(T * nb + (T + S) * N * H) backward. The reference is `block_sparse.block_sparse_reference`.
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
from attention.scores import ScoreMods, modify
from attention.selection import chunk_table, inverted_selection, num_chunks
from attention.slots import from_q_blocks, q_blocks, slot_softmax, split_heads

DEFAULT_BLOCK_Q = 16  # queries per step of the forward
BWD_ENTRIES = 64  # (query, block) entries per step of the backward


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


def _per_set(x, nx: int, kh: int):
  """`[B, T, N, ...]` -> `[B, X, T, R, G, ...]` (index set x serves kv heads x * R .. + R)."""
  b, t, n = x.shape[:3]
  return x.reshape(b, t, nx, kh // nx, n // kh, *x.shape[3:]).swapaxes(1, 2)


def _chunk_visible(mask: Mask, pos, seg, block, t_e, valid, bs: int, s: int):
  """`[B, X, be, bs]`: which keys of key block `block [B, X]` the chunk's queries `t_e
  [B, X, be]` (valid entries only) see; `pos [B, T]` query positions, `seg` (q ids, kv ids)."""
  b, nx, be = t_e.shape
  take = jax.vmap(lambda x, i: x[i])  # per batch row
  q_pos = take(pos, t_e.reshape(b, -1)).reshape(b * nx, be)
  kv_pos = (block[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)).reshape(b * nx, bs)
  q_seg = kv_seg = None
  if seg is not None:
    q_seg = take(seg[0], t_e.reshape(b, -1)).reshape(b * nx, be)
    kv_seg = take(seg[1], jnp.minimum(kv_pos, s - 1).reshape(b, -1)).reshape(b * nx, bs)
  vis = masks_lib.element_mask(mask, q_pos, kv_pos, q_seg, kv_seg) & (kv_pos < s)[:, None, :]
  return vis.reshape(b, nx, be, bs) & valid[..., None]


def block_sparse_backward_xla(q, k, v, aux, out, lse, dout, bs: int, scale: float, bq: int,
                              soft_cap: float | None, structure, *, dlse=None):
  """`(dq, dk, dv)`, key-block-major: a `lax.scan` over chunks of `BWD_ENTRIES` queries that
  selected one key block (`selection.chunk_table` of the inverted selection), every product a
  matrix product (`[be * R * G, H] x [H, bs]`); dK/dV of the chunk's block and dQ of its
  queries are added into float32 accumulators (no per-query copy of the blocks)."""
  del bq  # the forward's
  idx, mask = _unpack(aux, structure)
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  nx, nbk, be = idx.shape[2], -(-s // bs), BWD_ENTRIES
  kb, vb = _to_blocks(k, bs, nx), _to_blocks(v, bs, nx)  # B (X nbk) bs R H
  per_set = lambda x: _per_set(x, nx, kh)
  delta = per_set(row_delta(out, dout, dlse)[..., None])[..., 0]  # B X T R G
  lse = per_set(jnp.swapaxes(backward_lse(lse), 1, 2)[..., None])[..., 0]  # +inf: p = 0
  qs, dos = per_set(q), per_set(dout)  # B X T R G H
  entry_t, _, ptr = inverted_selection(idx, nbk, 1, be)  # B X E+be, B X nbk+1
  block, start, end = chunk_table(ptr, be, num_chunks(t * idx.shape[3], nbk, be))  # B X C
  pos = masks_lib.q_offsets(mask, b)[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  seg = (mask.q_segment_ids, mask.kv_segment_ids) if mask.has_segments else None
  take = jax.vmap(jax.vmap(lambda x, i: x[i]))  # per (batch, index set)
  by_row = jax.vmap(lambda x, i: x[i])  # per batch
  f32 = lambda x: x.astype(jnp.float32)

  def step(carry, chunk):
    dqs, dkb, dvb = carry
    j, lo, hi = chunk  # B X
    e = lo[..., None] + jnp.arange(be, dtype=jnp.int32)  # B X be
    valid = e < hi[..., None]
    t_e = jnp.where(valid, take(entry_t, e), 0)
    rows = j + nbk * jnp.arange(nx, dtype=jnp.int32)  # B X: the block's row of kb
    k_j, v_j = f32(by_row(kb, rows)), f32(by_row(vb, rows))  # B X bs R H
    q_e, do_e = f32(take(qs, t_e)), f32(take(dos, t_e))  # B X be R G H
    vis = _chunk_visible(mask, pos, seg, j, t_e, valid, bs, s)[:, :, :, None, None, :]
    sc, dcap = modify(jnp.einsum("BXeRGH,BXsRH->BXeRGs", q_e, k_j) * scale, soft_cap)
    p = jnp.where(vis, jnp.exp(sc - take(lse, t_e)[..., None]), 0.0)  # B X be R G bs
    dp = jnp.einsum("BXeRGH,BXsRH->BXeRGs", do_e, v_j)
    ds = p * (dp - take(delta, t_e)[..., None]) * scale * (1.0 if dcap is None else dcap)
    add_block = jax.vmap(lambda acc, i, x: acc.at[i].add(x, mode="promise_in_bounds"))
    dkb = add_block(dkb, rows, jnp.einsum("BXeRGs,BXeRGH->BXsRH", ds, q_e))
    dvb = add_block(dvb, rows, jnp.einsum("BXeRGs,BXeRGH->BXsRH", p, do_e))
    dq_e = jnp.einsum("BXeRGs,BXsRH->BXeRGH", ds, k_j)
    dqs = jax.vmap(jax.vmap(lambda a, i, x: a.at[i].add(x)))(dqs, t_e, dq_e)
    return (dqs, dkb, dvb), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  chunks = tuple(jnp.moveaxis(x, -1, 0) for x in (block, start, end))
  (dqs, dkb, dvb), _ = lax.scan(step, (zeros(qs), zeros(kb), zeros(vb)), chunks)
  dq = dqs.swapaxes(1, 2).reshape(b, t, n, h)
  return (dq.astype(q.dtype), _from_blocks(dkb, nx, s).astype(k.dtype),
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
