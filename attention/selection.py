"""A sparse selection inverted: for each key (block), the queries that selected it.

Query-major sparse attention (each query its own keys) has a key-major backward: dK/dV of a
key sums over the queries that selected it. Without atomics that needs the selection inverted,
as a CSR sorted by key (the Pallas dK/dV kernels of top-k and block-sparse attention, and the
block-sparse XLA backward, share it):

* `inverted_selection`: entries `(query t, key)` of `idx [B, T, X, k]`, sorted by key (a stable
  sort: within a key, queries in increasing order, so every sum has a fixed order), and
  `ptr[j]` = the first entry whose key lies in key block j (`block_keys` keys per block;
  `block_keys = 1` for block ids). O(T * k log(T * k)) per (batch, index set).
* `chunk_table`: the CSR cut into chunks of at most `block_entries` entries that never straddle
  two key blocks, in a static number of chunks (for a `lax.scan`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def inverted_selection(idx, num_key_blocks: int, block_keys: int, block_entries: int):
  """CSR of the selection, key-major, for `idx [B, T, X, k]` (-1 = unused slot).

  Returns `(entry_t, entry_key [B, X, E + block_entries], ptr [B, X, nk + 1])` int32: the query
  and key of each valid entry, sorted by key (stable); entries past `ptr[nk]` are padding
  (key = nk * bk, never inside a block). O(T * k log(T * k)) for the sort.
  """
  b, t, nx, k = idx.shape
  sentinel = num_key_blocks * block_keys
  keys = jnp.where(idx >= 0, idx, sentinel).transpose(0, 2, 1, 3).reshape(b, nx, t * k)
  queries = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k)).reshape(t * k)
  queries = jnp.broadcast_to(queries, keys.shape)
  keys, queries = lax.sort((keys, queries), dimension=-1, is_stable=True, num_keys=1)
  bounds = jnp.arange(num_key_blocks + 1, dtype=jnp.int32) * block_keys
  ptr = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, bounds, side="left")))(keys)
  pad = ((0, 0), (0, 0), (0, block_entries))
  return (jnp.pad(queries, pad), jnp.pad(keys, pad, constant_values=sentinel),
          ptr.astype(jnp.int32))


def num_chunks(num_entries: int, num_key_blocks: int, block_entries: int) -> int:
  """A static bound on `chunk_table`'s chunks: `ceil(E / be) + nk` (each block adds at most one
  partial chunk)."""
  return -(-num_entries // block_entries) + num_key_blocks


def chunk_table(ptr, block_entries: int, chunks: int):
  """`(block, start, end)`, each `[B, X, chunks]` int32: chunk c covers entries `[start, end)`
  (at most `block_entries`), all of key block `block`; chunks past the last are empty
  (`start == end` = the number of entries, block clamped to the last block). `ptr [B, X, nk + 1]` from
  `inverted_selection`; `chunks` at least `num_chunks(...)`."""
  nk = ptr.shape[-1] - 1
  count = ptr[..., 1:] - ptr[..., :-1]  # B X nk
  per_block = -(-count // block_entries)
  through = jnp.cumsum(per_block, axis=-1)  # chunks up to and including block j
  c = jnp.arange(chunks, dtype=jnp.int32)
  block = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, c, side="right")))(through)
  used = block < nk
  block = jnp.minimum(block, nk - 1).astype(jnp.int32)
  at = lambda x: jnp.take_along_axis(x, block, axis=-1)
  start = at(ptr[..., :-1]) + (c - at(through - per_block)) * block_entries
  end = jnp.minimum(start + block_entries, at(ptr[..., 1:]))
  start, end = (jnp.where(used, x, ptr[..., -1:]).astype(jnp.int32) for x in (start, end))
  return block, start, end
