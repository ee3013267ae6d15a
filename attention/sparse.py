"""Top-k gather attention: each query attends only to its own selected keys.

    out[b, t, n] = sum_{s in sel(b, t, n)} softmax_s( q[b, t, n] . k[b, s, kv(n)] * scale ) v[b, s, kv(n)]

`indices [B, T, k]` selects keys shared by every head (DeepSeek's MQA-mode DSA), or
`[B, T, K, k]` one set per kv head (q head n uses kv head n // (N // K), as in GQA). A slot is
ignored when it is -1 (or out of range), or when its key is not visible under `mask`
(causal: key after the query's position `q_offset + t`; window; segments): causality is
re-checked after selection. A query with nothing left returns 0. Duplicated indices count twice
(`indexer_topk` never produces them).

XLA path: `lax.map` over blocks of `block_q` queries; a block gathers its selected K/V rows
(`[B, bq, k, K, H]`, never `[T, S]`), then runs a plain softmax over the k slots. The backward
(`jax.custom_vjp`) recomputes the probabilities from the saved log-sum-exp and scatter-adds the
per-slot dK/dV into `[B, S, K, H]` float32 accumulators carried by a `lax.scan`.
Cost O(T * k * N * H) compute, O(block_q * k * K * H + T * N) memory (+ O(S * K * H) backward).
The Pallas kernels (attention/kernels/sparse_pallas.py) compute the same function.

`dsa_attention` = `indexer_topk` (no gradient) + `sparse_attention`: DeepSeek Sparse Attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from attention import indexer as indexer_lib
from attention.flash import resolve_implementation
from attention import masks as masks_lib
from attention.masks import Mask
from attention.reference import check_qkv, default_scale



def effective_indices(indices, mask: Mask, batch: int, q_len: int, kv_len: int, kv_heads: int):
  """Validated indices as `[B, T, X, k]` int32 (X = 1 shared, or K) with -1 on every slot
  that must be ignored: -1 / out-of-range slots and keys `mask` hides from the query."""
  shape = jnp.shape(indices)
  if len(shape) not in (3, 4) or shape[:2] != (batch, q_len) or (
      len(shape) == 4 and shape[2] != kv_heads):
    raise ValueError(f"indices must have shape [B, T, k] = [{batch}, {q_len}, k] (shared by all "
                     f"heads) or [B, T, K, k] = [{batch}, {q_len}, {kv_heads}, k] (per kv head), "
                     f"got {shape}.")
  if not jnp.issubdtype(jnp.asarray(indices).dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got dtype {jnp.asarray(indices).dtype}.")
  if shape[-1] < 1:
    raise ValueError(f"indices need at least one slot (k >= 1), got shape {shape}.")
  idx = jnp.asarray(indices, jnp.int32)
  if idx.ndim == 3:
    idx = idx[:, :, None, :]  # B T 1 k
  valid = (idx >= 0) & (idx < kv_len)
  safe = jnp.where(valid, idx, 0)
  q_pos = masks_lib.q_offsets(mask, batch)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None]
  left, right = mask.bounds
  diff = safe - q_pos[:, :, None, None]  # key minus query position
  valid &= (diff >= -left) & (diff <= right)
  if mask.has_segments:
    q_seg = jnp.asarray(mask.q_segment_ids, jnp.int32)[:, :, None, None]
    kv_seg = jax.vmap(lambda seg, i: seg[i])(jnp.asarray(mask.kv_segment_ids, jnp.int32), safe)
    valid &= (q_seg == kv_seg) & (q_seg >= 0)
  return jnp.where(valid, idx, -1)


# --- XLA path -----------------------------------------------------------------------------------


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
  t = x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, -t % bq)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, bq, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unblocks(x, t: int):
  """Inverse of `_blocks`: `[nT, B, bq, ...]` -> `[B, T, ...]`."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _block_probs(q_blk, k_rows, idx_blk, scale):
  """Scores of one block: q `[B, t, X, R, G, H]`, rows `[B, t, X, k, R, H]` -> `[B,t,X,R,G,k]`."""
  s = jnp.einsum("BtXRGH,BtXkRH->BtXRGk", q_blk, k_rows, preferred_element_type=jnp.float32)
  valid = (idx_blk >= 0)[:, :, :, None, None, :]
  return jnp.where(valid, s * scale, -jnp.inf)


def _split_heads(q, nx: int, kh: int):
  """`q [..., N, H]` -> `[..., X, R, G, H]` with X * R = K kv heads, G = N // K."""
  *lead, n, h = q.shape
  return q.reshape(*lead, nx, kh // nx, n // kh, h)


def sparse_forward_xla(q, k, v, idx, scale: float, block_q: int):
  """`out [B, T, N, H]` (q.dtype) and `lse [B, T, N]` float32 (-inf where nothing selected)."""
  b, t, _, n, kh, h = check_qkv(q, k, v)
  nx = idx.shape[2]

  def block(args):
    q_blk, idx_blk = args  # B bq N H, B bq X k
    safe = jnp.maximum(idx_blk, 0)
    k_rows, v_rows = _gather(k, safe), _gather(v, safe)
    s = _block_probs(_split_heads(q_blk, nx, kh), k_rows, idx_blk, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("BtXRGk,BtXkRH->BtXRGH", p.astype(v.dtype), v_rows,
                   preferred_element_type=jnp.float32)
    o = o / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return o.reshape(b, -1, n, h).astype(q.dtype), lse.reshape(b, -1, n)

  out, lse = lax.map(block, (_blocks(q, block_q), _blocks(idx, block_q)))
  return _unblocks(out, t), _unblocks(lse, t)


def sparse_backward_xla(q, k, v, idx, out, lse, dout, scale: float, block_q: int):
  """`(dq, dk, dv)`: recompute p per block, dq directly, dk/dv by scatter-add of the slots."""
  b, t, s, n, kh, h = check_qkv(q, k, v)
  nx = idx.shape[2]
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # B T N
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # nothing selected -> p = 0

  def block(carry, args):
    dk, dv = carry
    q_blk, idx_blk, do_blk, lse_blk, delta_blk = args
    safe = jnp.maximum(idx_blk, 0)
    k_rows, v_rows = _gather(k, safe), _gather(v, safe)
    qs = _split_heads(q_blk, nx, kh)  # B t X R G H
    dos = _split_heads(do_blk, nx, kh)
    lse_s = _split_heads(lse_blk[..., None], nx, kh)  # B t X R G 1
    delta_s = _split_heads(delta_blk[..., None], nx, kh)
    p = jnp.exp(_block_probs(qs, k_rows, idx_blk, scale) - lse_s)  # B t X R G k
    dp = jnp.einsum("BtXRGH,BtXkRH->BtXRGk", dos, v_rows, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_s) * scale
    dq = jnp.einsum("BtXRGk,BtXkRH->BtXRGH", ds, k_rows.astype(jnp.float32))
    dk_rows = jnp.einsum("BtXRGk,BtXRGH->BtXkRH", ds, qs.astype(jnp.float32))
    dv_rows = jnp.einsum("BtXRGk,BtXRGH->BtXkRH", p, dos.astype(jnp.float32))
    dk, dv = _scatter_add(dk, safe, dk_rows), _scatter_add(dv, safe, dv_rows)
    return (dk, dv), dq.reshape(b, -1, n, h)

  zeros = jnp.zeros((b, s, kh, h), jnp.float32)
  xs = tuple(_blocks(x, block_q) for x in (q, idx, dout, lse, delta))
  (dk, dv), dq = lax.scan(block, (zeros, zeros), xs)
  return _unblocks(dq, t).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _scatter_add(acc, idx, rows):
  """`acc [B, S, K, H] += rows [B, t, X, k, R, H]` at `idx [B, t, X, k]` (inverse of _gather)."""
  b, s, kh, h = acc.shape
  add = jax.vmap(lambda a, i, r: a.at[i].add(r, mode="promise_in_bounds"))
  if idx.shape[2] == 1:
    return add(acc, idx, rows)
  flat = idx * kh + jnp.arange(kh, dtype=jnp.int32)[None, None, :, None]
  return add(acc.reshape(b, s * kh, h), flat, rows[..., 0, :]).reshape(b, s, kh, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _xla_sparse(q, k, v, idx, scale, block_q):
  return sparse_forward_xla(q, k, v, idx, scale, block_q)[0]


def _xla_sparse_fwd(q, k, v, idx, scale, block_q):
  out, lse = sparse_forward_xla(q, k, v, idx, scale, block_q)
  return out, (q, k, v, idx, out, lse)


def _xla_sparse_bwd(scale, block_q, res, dout):
  q, k, v, idx, out, lse = res
  dq, dk, dv = sparse_backward_xla(q, k, v, idx, out, lse, dout, scale, block_q)
  return dq, dk, dv, None


_xla_sparse.defvjp(_xla_sparse_fwd, _xla_sparse_bwd)


# --- public entry points ------------------------------------------------------------------------


def sparse_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    indices: Int[Array, "B T k"] | Int[Array, "B T K k"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    block_q: int = 16,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
  """Softmax attention of each query over its selected keys only (see the module docstring).

  Args:
    q: `[B, T, N, H]`. k, v: `[B, S, K, H]`, `N % K == 0`.
    indices: `[B, T, k]` key positions shared by all heads, or `[B, T, K, k]` per kv head;
      -1 marks an unused slot.
    mask: visibility re-applied to the selected keys (causal, window, segments, q_offset).
    scale: logit scale, default `H ** -0.5`.
    implementation: "xla", "pallas" (Triton kernels; CPU needs `interpret=True`) or None
      (Pallas on GPU, XLA elsewhere).
    block_q: queries per step of the XLA path (bounds the gathered `[B, bq, k, K, H]` rows).
    interpret: run the Pallas kernels in interpret mode.

  Returns:
    `[B, T, N, H]` in q's dtype; 0 for a query with no selected visible key.
  """
  b, t, s, _, kh, h = check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  implementation = resolve_implementation(implementation, interpret)
  if not isinstance(block_q, int) or block_q < 1:
    raise ValueError(f"block_q must be a positive int, got {block_q!r}.")
  idx = effective_indices(indices, mask, b, t, s, kh)
  if implementation == "xla":
    return _xla_sparse(q, k, v, idx, scale, min(block_q, t))
  from attention.kernels import sparse_pallas  # pylint: disable=g-import-not-at-top
  return sparse_pallas.sparse_attention_pallas(q, k, v, idx, scale=scale, interpret=interpret)


def dsa_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"],
    index_w: Float[Array, "B T J"],
    top_k: int = 2048,
    fp8: bool = False,
    block_q: int | None = None,
    **options,
) -> Float[Array, "B T N H"]:
  """DeepSeek Sparse Attention: lightning-indexer top-k selection, then `sparse_attention`.

  The selection (`indexer_topk`, shared by all heads) carries no gradient: the indexer learns
  from `indexer_kl_loss`. With `top_k >= S` and a causal mask every visible key is selected and
  this equals dense causal attention. `options` go to `sparse_attention` (implementation,
  interpret); `block_q` sets the indexer's query block. Cost O(T * S * J * D) for the indexer
  + O(T * top_k * N * H) for the attention; memory O(T * top_k + block_q * S).
  """
  check_qkv(q, k, v)
  topk_options = {} if block_q is None else dict(block_q=block_q)
  indices = indexer_lib.indexer_topk(
      lax.stop_gradient(index_q), lax.stop_gradient(index_k), lax.stop_gradient(index_w),
      top_k=top_k, mask=mask, fp8=fp8, **topk_options)
  return sparse_attention(q, k, v, indices, mask=mask, scale=scale, **options)
