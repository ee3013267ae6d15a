"""The pure-JAX (XLA) backend of `block_sparse_attention`: key-block-major, forward + backward.

On effective block indices `[B, T, X, nb]` (`block_sparse.effective_block_indices`: sorted,
deduplicated, -1 = ignored slot; X = 1 shared by all kv heads or X = K). K/V are viewed as
whole blocks, `[B, X * nbk, bs, K / X, H]` (block j of index set x is row `x * nbk + j`).

The selection is inverted (`attention.selection`: for each key block, the queries that
selected it, in query order) and cut into chunks of up to `block_entries` queries of one key
block. A `lax.scan` over the chunks gathers one whole block and the chunk's query rows, so
every product is a matrix product against one resident block (`[be * R * G, H] x [H, bs]`),
with the mask evaluated elementwise on the `[be, bs]` tile (causality, window, segments, keys
past S):

    forward:  per query, an online softmax over its blocks in increasing block order: the
              chunk reads the running (max, sum, numerator) rows of its queries, folds its
              block in and writes them back (a query meets a block once, so rows never clash)
    backward: p recomputed from the saved lse (`common.lse_vjp`); dK/dV of the chunk's block
              and dQ of its queries added into float32 accumulators

A query-major path (each query gathering its own `nb * bs` keys) would multiply `[G, H]`
query tiles against per-query copies of the blocks (matrix-vector work, and O(T * nb * bs * K
* H) bytes moved); here each block is read once per chunk of up to `block_entries` queries.

Cost O(T * nb * bs * N * H) compute plus a sort of T * nb block ids; memory O(T * nb) int32 +
O(T * N * Hv) float32 accumulators, steps `ceil(T * nb / be) + S / bs`.
The reference is `block_sparse.block_sparse_reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention import masks as masks_lib
from attention.block_sizes import BlockSparseBlockSizes
from attention.common import backward_lse, finish_softmax, lse_vjp, pad_to_multiple, row_delta
from attention.masks import Mask
from attention.reference import check_qkv
from attention.scores import ScoreMods, modify
from attention.selection import chunk_table, inverted_selection, num_chunks

DEFAULT_BLOCK_ENTRIES = 64  # queries per chunk (one key block each)

# Per (batch row, index set): rows `i [be]` of `x [T, ...]`; out-of-range rows (the chunk's
# unused entries, numbered T) are clipped on reads and dropped on writes.
_take = jax.vmap(jax.vmap(lambda x, i: x.at[i].get(mode="clip")))
_put = jax.vmap(jax.vmap(lambda x, i, y: x.at[i].set(y, mode="drop")))
_add = jax.vmap(jax.vmap(lambda x, i, y: x.at[i].add(y, mode="drop")))
_block_at = jax.vmap(lambda x, i: x[i])  # per batch row: blocks `i [X]` of `[X * nbk, ...]`


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


def _per_set(x, nx: int, kh: int):
  """`[B, T, N, ...]` -> `[B, X, T, R, G, ...]` (index set x serves kv heads x * R .. + R)."""
  b, t, n = x.shape[:3]
  return x.reshape(b, t, nx, kh // nx, n // kh, *x.shape[3:]).swapaxes(1, 2)


def _from_set(x):
  """Inverse of `_per_set`: `[B, X, T, R, G, ...]` -> `[B, T, N, ...]`."""
  b, nx, t, r, g = x.shape[:5]
  return x.swapaxes(1, 2).reshape(b, t, nx * r * g, *x.shape[5:])


class _Setup(NamedTuple):
  """What every chunk reads: the mask, K/V blocks, q per index set, query positions and
  segment ids, the inverted selection `entry_t [B, X, E + be]`, the chunks `(block, start,
  end)` each `[C, B, X]` (the scan's inputs), and the sizes (keys S, block, chunk)."""

  mask: Mask
  kb: jax.Array
  vb: jax.Array
  qs: jax.Array
  pos: jax.Array
  seg: tuple[jax.Array, jax.Array] | None
  entry_t: jax.Array
  chunks: tuple[jax.Array, jax.Array, jax.Array]
  kv_len: int
  bs: int
  be: int


def _setup(q, k, v, aux, structure, bs: int, be: int) -> _Setup:
  """`aux = (idx [B, T, X, nb], segment ids or None, q offsets [B])` and the mask's static
  `(causal, window)` (a Mask is rebuilt here, never passed through the custom_vjp)."""
  (idx, segments, offsets), (causal, window) = aux, structure
  q_seg, kv_seg = segments if segments is not None else (None, None)
  mask = Mask(causal=causal, window=window, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
              q_offset=offsets)
  _, t, s, _, kh, _ = check_qkv(q, k, v, value_dim=True)
  nx, nbk = idx.shape[2], -(-s // bs)
  entry_t, _, ptr = inverted_selection(idx, nbk, 1, be)  # B X E+be, B X nbk+1
  chunks = chunk_table(ptr, be, num_chunks(t * idx.shape[3], nbk, be))  # B X C each
  pos = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # B T
  return _Setup(mask, _to_blocks(k, bs, nx), _to_blocks(v, bs, nx), _per_set(q, nx, kh), pos,
                segments, entry_t, tuple(jnp.moveaxis(x, -1, 0) for x in chunks), s, bs, be)


def _visible(setup: _Setup, block, t_e, valid):
  """`[B, X, be, bs]`: which keys of key block `block [B, X]` the chunk's queries `t_e
  [B, X, be]` see (only its `valid` entries; keys past S never)."""
  b, nx, be = t_e.shape
  bs = setup.bs
  take = jax.vmap(lambda x, i: x.at[i].get(mode="clip"))  # per batch row
  q_pos = take(setup.pos, t_e.reshape(b, -1)).reshape(b * nx, be)
  kv_pos = (block[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)).reshape(b * nx, bs)
  q_seg = kv_seg = None
  if setup.seg is not None:
    q_seg = take(setup.seg[0], t_e.reshape(b, -1)).reshape(b * nx, be)
    kv_seg = take(setup.seg[1], kv_pos.reshape(b, -1)).reshape(b * nx, bs)
  vis = masks_lib.element_mask(setup.mask, q_pos, kv_pos, q_seg, kv_seg)
  vis &= (kv_pos < setup.kv_len)[:, None]
  return vis.reshape(b, nx, be, bs) & valid[..., None]


def _chunk(setup: _Setup, chunk, scale: float, soft_cap: float | None):
  """One chunk: `(t_e, rows, q_e, (k_j, v_j), scores, dcap)` with its queries `t_e [B, X, be]`
  (T where unused), its block's rows of `kb` `[B, X]`, the query rows `[B, X, be, R, G, H]`,
  the block `[B, X, bs, R, H]` (k and v), the soft-capped scores `[B, X, be, R, G, bs]` (-inf
  where hidden) and the cap's derivative (None without a cap)."""
  block, start, end = chunk  # B X
  t, nbk = setup.qs.shape[2], setup.kb.shape[1] // block.shape[1]
  e = start[..., None] + jnp.arange(setup.be, dtype=jnp.int32)  # B X be
  valid = e < end[..., None]
  t_e = jnp.where(valid, _take(setup.entry_t, e), t)
  rows = block + nbk * jnp.arange(block.shape[1], dtype=jnp.int32)  # B X
  q_e = _take(setup.qs, t_e)
  k_j, v_j = _block_at(setup.kb, rows), _block_at(setup.vb, rows)
  s = jnp.einsum("BXeRGH,BXsRH->BXeRGs", q_e, k_j, preferred_element_type=jnp.float32)
  s, dcap = modify(s * scale, soft_cap)
  vis = _visible(setup, block, t_e, valid)[:, :, :, None, None, :]
  return t_e, rows, q_e, (k_j, v_j), jnp.where(vis, s, -jnp.inf), dcap


def block_sparse_forward_xla(q, k, v, aux, bs: int, scale: float, be: int,
                             soft_cap: float | None, structure):
  """`out [B, T, N, Hv]` (q.dtype) and `lse [B, N, T]` float32 (-inf where nothing is visible):
  an online softmax per query over its blocks, one chunk of queries per step."""
  setup = _setup(q, k, v, aux, structure, bs, be)
  rows_shape = setup.qs.shape[:-1]  # B X T R G

  def step(carry, chunk):
    m, l, acc = carry
    t_e, _, _, (_, v_j), s, _ = _chunk(setup, chunk, scale, soft_cap)
    m_e, l_e, acc_e = _take(m, t_e), _take(l, t_e), _take(acc, t_e)
    m_new = jnp.maximum(m_e, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])  # B X be R G bs
    alpha = jnp.exp(m_e - m_safe)
    pv = jnp.einsum("BXeRGs,BXsRH->BXeRGH", p, v_j.astype(jnp.float32))
    l_e = l_e * alpha + jnp.sum(p, axis=-1)
    acc_e = acc_e * alpha[..., None] + pv
    return (_put(m, t_e, m_new), _put(l, t_e, l_e), _put(acc, t_e, acc_e)), None

  init = (jnp.full(rows_shape, -jnp.inf, jnp.float32), jnp.zeros(rows_shape, jnp.float32),
          jnp.zeros((*rows_shape, v.shape[3]), jnp.float32))
  (m, l, acc), _ = lax.scan(step, init, setup.chunks)
  out, lse = finish_softmax(m, l, acc, q.dtype)
  return _from_set(out), jnp.swapaxes(_from_set(lse), 1, 2)


def block_sparse_backward_xla(q, k, v, aux, out, lse, dout, bs: int, scale: float, be: int,
                              soft_cap: float | None, structure, *, dlse=None):
  """`(dq, dk, dv)`: p recomputed from the saved lse per chunk; dK/dV of the chunk's block and
  dQ of its queries added into float32 accumulators."""
  setup = _setup(q, k, v, aux, structure, bs, be)
  nx, kh = setup.qs.shape[1], k.shape[2]
  per_set = lambda x: _per_set(x, nx, kh)
  delta = per_set(row_delta(out, dout, dlse)[..., None])[..., 0]  # B X T R G
  lse = per_set(jnp.swapaxes(backward_lse(lse), 1, 2)[..., None])[..., 0]  # +inf: p = 0
  dos = per_set(dout)
  add_block = jax.vmap(lambda acc, i, x: acc.at[i].add(x, mode="promise_in_bounds"))
  f32 = lambda x: x.astype(jnp.float32)

  def step(carry, chunk):
    dqs, dkb, dvb = carry
    t_e, rows, q_e, (k_j, v_j), s, dcap = _chunk(setup, chunk, scale, soft_cap)
    q_e, k_j, do_e = f32(q_e), f32(k_j), f32(_take(dos, t_e))
    p = jnp.exp(s - _take(lse, t_e)[..., None])  # B X be R G bs (0 where hidden)
    dp = jnp.einsum("BXeRGH,BXsRH->BXeRGs", do_e, f32(v_j))
    ds = p * (dp - _take(delta, t_e)[..., None]) * scale * (1.0 if dcap is None else dcap)
    dkb = add_block(dkb, rows, jnp.einsum("BXeRGs,BXeRGH->BXsRH", ds, q_e))
    dvb = add_block(dvb, rows, jnp.einsum("BXeRGs,BXeRGH->BXsRH", p, do_e))
    dqs = _add(dqs, t_e, jnp.einsum("BXeRGs,BXsRH->BXeRGH", ds, k_j))
    return (dqs, dkb, dvb), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  (dqs, dkb, dvb), _ = lax.scan(step, (zeros(setup.qs), zeros(setup.kb), zeros(setup.vb)),
                                setup.chunks)
  s = k.shape[1]
  return (_from_set(dqs).astype(q.dtype), _from_blocks(dkb, nx, s).astype(k.dtype),
          _from_blocks(dvb, nx, s).astype(v.dtype))


_xla_block_sparse = lse_vjp(block_sparse_forward_xla, block_sparse_backward_xla, lse_grad=True)


def attend(q, k, v, idx, mask: Mask, block_size: int, scale: float,
           block_sizes: BlockSparseBlockSizes | None, interpret: bool, mods: ScoreMods):
  """The "xla" entry of `block_sparse.IMPLEMENTATIONS`: effective block indices `[B, T, X, nb]`;
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both (soft-cap: `mods.soft_cap`)."""
  del interpret  # refused by the front door for "xla"
  block_sizes = (block_sizes or BlockSparseBlockSizes()).only("xla", "block_entries")
  segments = None
  if mask.has_segments:
    segments = tuple(jnp.asarray(x, jnp.int32) for x in (mask.q_segment_ids,
                                                          mask.kv_segment_ids))
  aux = (idx, segments, masks_lib.q_offsets(mask, q.shape[0]))
  return _xla_block_sparse(q, k, v, aux, block_size, scale,
                           block_sizes.block_entries or DEFAULT_BLOCK_ENTRIES, mods.soft_cap,
                           (mask.causal, mask.window))
