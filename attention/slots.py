"""Softmax attention over gathered key slots: what the XLA paths of the two sparse operations share.

Top-k gather attention (`sparse_xla.py`, one slot per selected key) and block-sparse attention
(`block_sparse_xla.py`, `block_size` slots per selected key block) both gather, for a block of
`t` queries, each query's own key rows, then run a plain (not online) softmax over them:

    qs      [B, t, X, R, G, H]    the queries, kv heads split as X * R = K (X: index sets, 1 or K)
    k_rows  [B, t, X, k, R, H]    the gathered keys (v_rows: [..., Hv]), k slots per query
    valid   [B, t, X, k]          slot visible (selected, in range, shown by the mask)

`slot_softmax` gives `(out, lse)` of one block of queries, `slot_grads` its gradients from the
saved lse (the backward's dK / dV rows go back to their keys by the caller's scatter-add).
`q_blocks` / `from_q_blocks` cut `[B, T, ...]` into the `[nT, B, bq, ...]` steps of a `lax.map`.
Float32 statistics; a query with no valid slot gets out 0 and lse -inf.
"""

from __future__ import annotations

import jax.numpy as jnp

from attention.common import finish_softmax, pad_to_multiple
from attention.scores import modify


def q_blocks(x, bq: int):
  """`[B, T, ...]` -> `[nT, B, bq, ...]` (T padded with zeros to a multiple of bq)."""
  x = pad_to_multiple(x, 1, bq)
  x = x.reshape(x.shape[0], -1, bq, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def from_q_blocks(x, t: int):
  """Inverse of `q_blocks`: `[nT, B, bq, ...]` -> `[B, T, ...]`."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def split_heads(q, nx: int, kh: int):
  """`q [..., N, H]` -> `[..., X, R, G, H]` with X * R = K kv heads, G = N // K."""
  *lead, n, h = q.shape
  return q.reshape(*lead, nx, kh // nx, n // kh, h)


def slot_scores(qs, k_rows, valid, scale: float, soft_cap: float | None):
  """`(s, dcap)`: scores `[B, t, X, R, G, k]` (soft-capped, -inf on invalid slots) and the
  cap's derivative (None without a cap)."""
  s = jnp.einsum("BtXRGH,BtXkRH->BtXRGk", qs, k_rows, preferred_element_type=jnp.float32)
  s, dcap = modify(s * scale, soft_cap)
  return jnp.where(valid[:, :, :, None, None, :], s, -jnp.inf), dcap


def slot_softmax(qs, k_rows, v_rows, valid, scale: float, soft_cap: float | None, dtype):
  """`(out [B, t, X, R, G, Hv] in dtype, lse [B, t, X, R, G] float32)` of one query block."""
  s, _ = slot_scores(qs, k_rows, valid, scale, soft_cap)
  m = jnp.max(s, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m[..., None])
  o = jnp.einsum("BtXRGk,BtXkRH->BtXRGH", p.astype(v_rows.dtype), v_rows,
                 preferred_element_type=jnp.float32)
  return finish_softmax(m, jnp.sum(p, axis=-1), o, dtype)


def slot_grads(qs, dos, k_rows, v_rows, valid, lse, delta, scale: float,
               soft_cap: float | None):
  """`(dq [B, t, X, R, G, H], dk_rows [B, t, X, k, R, H], dv_rows [..., Hv])`, float32.

  `dos` the output cotangent split like `qs`; `lse`, `delta` `[B, t, X, R, G, 1]` (lse +inf
  where nothing is visible, `common.backward_lse`; delta from `common.row_delta`)::

      p = exp(s - lse);  ds = p * (do v^T - delta) * dcap * scale
      dq = ds k;  dk = ds^T q;  dv = p^T do
  """
  s, dcap = slot_scores(qs, k_rows, valid, scale, soft_cap)
  p = jnp.exp(s - lse)  # B t X R G k
  dp = jnp.einsum("BtXRGH,BtXkRH->BtXRGk", dos, v_rows, preferred_element_type=jnp.float32)
  ds = p * (dp - delta) * scale * (1.0 if dcap is None else dcap)
  dq = jnp.einsum("BtXRGk,BtXkRH->BtXRGH", ds, k_rows.astype(jnp.float32))
  dk_rows = jnp.einsum("BtXRGk,BtXRGH->BtXkRH", ds, qs.astype(jnp.float32))
  dv_rows = jnp.einsum("BtXRGk,BtXRGH->BtXkRH", p, dos.astype(jnp.float32))
  return dq, dk_rows, dv_rows
