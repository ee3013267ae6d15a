"""The pure-JAX (XLA) backend of `sparse_attention`: top-k gather attention, forward + backward.

On effective indices `[B, T, X, k]` (`masks.effective_indices`: -1 = ignored slot, X = 1 shared
by all kv heads or X = K). `lax.map` over blocks of `block_q` queries; a block gathers its
selected K/V rows (`[B, bq, k, K, H]`, never `[T, S]`), then runs a plain softmax over the k
slots. The backward (`common.lse_vjp`) recomputes the probabilities from the saved
log-sum-exp `[B, N, T]` and scatter-adds the per-slot dK/dV into `[B, S, K, H]` float32
accumulators carried by a `lax.scan`.
Cost O(T * k * N * H) compute, O(block_q * k * K * H + T * N) memory (+ O(S * K * H) backward).
The reference is `reference_attention` under the mask that shows only the selected keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention.block_sizes import SparseBlockSizes
from attention.common import backward_lse, finish_softmax, lse_vjp, pad_to_multiple, row_delta
from attention.reference import check_qkv
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods, modify

DEFAULT_BLOCK_Q = 16


def _gather(x, idx):
  """Rows of `x [B, S, K, H]` at `idx [B, t, X, k]` (>= 0) -> `[B, t, X, k, R, H]`, X * R = K."""
  b, s, kh, h = x.shape
  nx = idx.shape[2]
  take = jax.vmap(lambda r, i: r.at[i].get(mode="promise_in_bounds"))
  if nx == 1:  # shared: one row of all K heads per slot
    return take(x, idx)  # B t 1 k K H
  # per kv head: row s of head x is row s * K + x of [B, S * K, H]
  flat = idx * kh + jnp.arange(kh, dtype=jnp.int32)[None, None, :, None]
  return take(x.reshape(b, s * kh, h), flat)[..., None, :]  # B t K k 1 H


def _blocks(x, bq: int):
  """`[B, T, ...]` -> `[nT, B, bq, ...]` (T padded with zeros to a multiple of bq)."""
  x = pad_to_multiple(x, 1, bq)
  x = x.reshape(x.shape[0], -1, bq, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unblocks(x, t: int):
  """Inverse of `_blocks`: `[nT, B, bq, ...]` -> `[B, T, ...]`."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _block_scores(q_blk, k_rows, idx_blk, scale, soft_cap):
  """`(s, dcap)` of one block: q `[B, t, X, R, G, H]`, rows `[B, t, X, k, R, H]` -> scores
  `[B, t, X, R, G, k]` (soft-capped, -inf on unused slots) and the cap's derivative or None."""
  s = jnp.einsum("BtXRGH,BtXkRH->BtXRGk", q_blk, k_rows, preferred_element_type=jnp.float32)
  s, dcap = modify(s * scale, soft_cap)
  valid = (idx_blk >= 0)[:, :, :, None, None, :]
  return jnp.where(valid, s, -jnp.inf), dcap


def _split_heads(q, nx: int, kh: int):
  """`q [..., N, H]` -> `[..., X, R, G, H]` with X * R = K kv heads, G = N // K."""
  *lead, n, h = q.shape
  return q.reshape(*lead, nx, kh // nx, n // kh, h)


def sparse_forward_xla(q, k, v, idx, scale: float, block_q: int, soft_cap: float | None = None):
  """`out [B, T, N, Hv]` (q.dtype) and `lse [B, N, T]` float32 (-inf where nothing selected)."""
  b, t, _, n, kh, _ = check_qkv(q, k, v, value_dim=True)
  nx, hv = idx.shape[2], v.shape[3]

  def block(args):
    q_blk, idx_blk = args  # B bq N H, B bq X k
    safe = jnp.maximum(idx_blk, 0)
    k_rows, v_rows = _gather(k, safe), _gather(v, safe)
    s, _ = _block_scores(_split_heads(q_blk, nx, kh), k_rows, idx_blk, scale, soft_cap)
    m = jnp.max(s, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])
    o = jnp.einsum("BtXRGk,BtXkRH->BtXRGH", p.astype(v.dtype), v_rows,
                   preferred_element_type=jnp.float32)
    o, lse = finish_softmax(m, jnp.sum(p, axis=-1), o, q.dtype)
    return o.reshape(b, -1, n, hv), lse.reshape(b, -1, n)

  out, lse = lax.map(block, (_blocks(q, block_q), _blocks(idx, block_q)))
  return _unblocks(out, t), jnp.swapaxes(_unblocks(lse, t), 1, 2)


def sparse_backward_xla(q, k, v, idx, out, lse, dout, scale: float, block_q: int,
                        soft_cap: float | None = None, *, dlse=None):
  """`(dq, dk, dv)`: recompute p per block, dq directly, dk/dv by scatter-add of the slots."""
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  nx = idx.shape[2]
  delta = row_delta(out, dout, dlse)  # B T N
  lse = jnp.swapaxes(backward_lse(lse), 1, 2)  # B T N; nothing selected -> p = 0

  def block(carry, args):
    dk, dv = carry
    q_blk, idx_blk, do_blk, lse_blk, delta_blk = args
    safe = jnp.maximum(idx_blk, 0)
    k_rows, v_rows = _gather(k, safe), _gather(v, safe)
    qs = _split_heads(q_blk, nx, kh)  # B t X R G H
    dos = _split_heads(do_blk, nx, kh)
    lse_s = _split_heads(lse_blk[..., None], nx, kh)  # B t X R G 1
    delta_s = _split_heads(delta_blk[..., None], nx, kh)
    scores, dcap = _block_scores(qs, k_rows, idx_blk, scale, soft_cap)
    p = jnp.exp(scores - lse_s)  # B t X R G k
    dp = jnp.einsum("BtXRGH,BtXkRH->BtXRGk", dos, v_rows, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_s) * scale * (1.0 if dcap is None else dcap)
    dq = jnp.einsum("BtXRGk,BtXkRH->BtXRGH", ds, k_rows.astype(jnp.float32))
    dk_rows = jnp.einsum("BtXRGk,BtXRGH->BtXkRH", ds, qs.astype(jnp.float32))
    dv_rows = jnp.einsum("BtXRGk,BtXRGH->BtXkRH", p, dos.astype(jnp.float32))
    dk, dv = _scatter_add(dk, safe, dk_rows), _scatter_add(dv, safe, dv_rows)
    return (dk, dv), dq.reshape(b, -1, n, h)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  xs = tuple(_blocks(x, block_q) for x in (q, idx, dout, lse, delta))
  (dk, dv), dq = lax.scan(block, (zeros(k), zeros(v)), xs)
  return _unblocks(dq, t).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _scatter_add(acc, idx, rows):
  """`acc [B, S, K, H] += rows [B, t, X, k, R, H]` at `idx [B, t, X, k]` (inverse of _gather)."""
  b, s, kh, h = acc.shape
  add = jax.vmap(lambda a, i, r: a.at[i].add(r, mode="promise_in_bounds"))
  if idx.shape[2] == 1:
    return add(acc, idx, rows)
  flat = idx * kh + jnp.arange(kh, dtype=jnp.int32)[None, None, :, None]
  return add(acc.reshape(b, s * kh, h), flat, rows[..., 0, :]).reshape(b, s, kh, h)


_xla_sparse = lse_vjp(sparse_forward_xla, sparse_backward_xla, lse_grad=True)


def attend(q, k, v, idx, scale: float, block_sizes: SparseBlockSizes | None,
           interpret: bool = False, mods: ScoreMods = NO_MODS):
  """The "xla" entry of `sparse.IMPLEMENTATIONS`: effective indices `[B, T, X, k]`;
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both (soft-cap: `mods.soft_cap`)."""
  del interpret  # refused by the front door for "xla"
  block_sizes = (block_sizes or SparseBlockSizes()).only("xla", "block_q")
  return _xla_sparse(q, k, v, idx, scale, min(block_sizes.block_q or DEFAULT_BLOCK_Q, q.shape[1]),
                     mods.soft_cap)


