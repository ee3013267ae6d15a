"""KV caches for decoding: every position for global layers, a ring of `window` keys for local ones
(plus the first `n` keys with attention sinks).

Both caches give an attention layer the same thing, so one `attention.Mask` serves both: a
chronological *view* of the keys/values a chunk of new queries may see, their segment ids
(`-1` = an empty slot: the mask hides it), and `q_offset`, the index of the first new query in
that view. The layer then calls its attention function with
`Mask(causal=True, window=..., q_segment_ids=new_ids, kv_segment_ids=view_ids, q_offset=...)`.

* `FullCache` `[B, max_len]`: slot `p` holds stream position `p`. The view is the whole buffer
  after writing the chunk; `q_offset = index` (the tokens already cached).
* `RingCache` `[B, R]`, `R = min(window, max_len)`: position `p` lives in slot `p % R`. The view is
  the `R` cached positions `index - R .. index - 1` (gathered in order) followed by the new chunk;
  `q_offset = R`. Keys in the view sit at the same relative distances as in the stream, so a
  causal window mask over the view is the window over the stream, and memory is O(window)
  whatever `max_len` is. Then the last `min(T, R)` new tokens overwrite the oldest slots.

* `SinkRingCache`: a `RingCache` plus `n` sink slots `[B, n]` holding stream positions
  `0 .. n-1` (attention sinks, `Mask.sinks`): constant size `n + R`. The ring view is as above
  (the window); `sinks()` gives the sink slots, which the layer attends with
  `Mask(causal=True, q_offset=index - window)` (positions `j <= i - window`: exactly the sinks
  outside each query's window, so no key counts twice) and merges exactly with the window
  part through the log-sum-exps (`attention.merge_attention`): what `Mask(sinks=n)` computes.

Keys are cached after RoPE (rotated by their absolute positions), so nothing is re-rotated.
`Cache` bundles the per-layer caches with `index`, the number of tokens decoded so far.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

# (k [B, S, K, H], v [B, S, K, H], kv_segment_ids [B, S], q_offset)
View = tuple[Array, Array, Array, Any]


def _empty(batch: int, length: int, num_kv_heads: int, head_dim: int, dtype):
  kv = jnp.zeros((batch, length, num_kv_heads, head_dim), dtype)
  return kv, kv, jnp.full((batch, length), -1, jnp.int32)


def kv_nbytes(batch: int, length: int, num_kv_heads: int, head_dim: int, dtype) -> int:
  """Bytes of a `FullCache` / `RingCache` of `length` slots, by arithmetic: k and v in `dtype`
  plus int32 segment ids."""
  return batch * length * (2 * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize + 4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullCache:
  """Every position: `k, v [B, L, K, H]`, `segment_ids [B, L]` (-1 = not yet written)."""

  k: Float[Array, "B L K H"]
  v: Float[Array, "B L K H"]
  segment_ids: Int[Array, "B L"]

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype) -> "FullCache":
    return cls(*_empty(batch, max_len, num_kv_heads, head_dim, dtype))

  def update(self, index, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
             segment_ids: Int[Array, "B T"]) -> tuple[View, "FullCache"]:
    """Writes the chunk at `index .. index + T - 1` (must fit in L); returns (view, new cache)."""
    write = lambda buf, new: lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index, 1)
    new = FullCache(write(self.k, k), write(self.v, v), write(self.segment_ids, segment_ids))
    return (new.k, new.v, new.segment_ids, index), new

  def sinks(self) -> None:
    """No separate sink keys (every position is in the view)."""
    return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingCache:
  """The last `R` positions: `k, v [B, R, K, H]`, `segment_ids [B, R]`; position p in slot p % R."""

  k: Float[Array, "B R K H"]
  v: Float[Array, "B R K H"]
  segment_ids: Int[Array, "B R"]

  @classmethod
  def create(cls, batch: int, size: int, num_kv_heads: int, head_dim: int,
             dtype) -> "RingCache":
    return cls(*_empty(batch, size, num_kv_heads, head_dim, dtype))

  def update(self, index, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
             segment_ids: Int[Array, "B T"]) -> tuple[View, "RingCache"]:
    """View = cached positions `index - R .. index - 1` then the chunk; keeps the newest R."""
    size, t = self.k.shape[1], k.shape[1]
    past = (index - size + jnp.arange(size)) % size  # slots in chronological order
    view = tuple(jnp.concatenate([jnp.take(buf, past, axis=1), new.astype(buf.dtype)], axis=1)
                 for buf, new in ((self.k, k), (self.v, v), (self.segment_ids, segment_ids)))
    kept = min(t, size)
    slots = (index + t - kept + jnp.arange(kept)) % size
    write = lambda buf, new: buf.at[:, slots].set(new[:, t - kept:].astype(buf.dtype))
    new = RingCache(write(self.k, k), write(self.v, v), write(self.segment_ids, segment_ids))
    return (*view, size), new

  def sinks(self) -> None:
    """No sink keys (a plain window)."""
    return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SinkRingCache:
  """A `RingCache` of the window plus the first `n` positions: `k, v [B, n, K, H]`,
  `segment_ids [B, n]` (-1 = not yet written); position `p < n` in slot `p`."""

  k: Float[Array, "B n K H"]
  v: Float[Array, "B n K H"]
  segment_ids: Int[Array, "B n"]
  ring: RingCache

  @classmethod
  def create(cls, batch: int, sinks: int, size: int, num_kv_heads: int, head_dim: int,
             dtype) -> "SinkRingCache":
    return cls(*_empty(batch, sinks, num_kv_heads, head_dim, dtype),
               RingCache.create(batch, size, num_kv_heads, head_dim, dtype))

  def update(self, index, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
             segment_ids: Int[Array, "B T"]) -> tuple[View, "SinkRingCache"]:
    """The ring's view (the window) and the cache with the chunk's positions `< n` written to
    their sink slots (positions `index .. index + T - 1`; `sinks()` reads them)."""
    view, ring = self.ring.update(index, k, v, segment_ids)
    n, t = self.k.shape[1], k.shape[1]
    slot = jnp.arange(n)
    src = jnp.clip(slot - index, 0, t - 1)  # chunk row of sink slot p, where p in the chunk
    fresh = (slot >= index) & (slot < index + t)  # n

    def write(buf, new):
      taken = jnp.take(new, src, axis=1).astype(buf.dtype)  # B n ...
      keep = fresh.reshape((1, n) + (1,) * (buf.ndim - 2))
      return jnp.where(keep, taken, buf)

    return view, SinkRingCache(write(self.k, k), write(self.v, v),
                               write(self.segment_ids, segment_ids), ring)

  def sinks(self) -> tuple[Array, Array, Array]:
    """`(k, v [B, n, K, H], segment_ids [B, n])`: the sink slots (key j = stream position j)."""
    return self.k, self.v, self.segment_ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
  """The model's decoding state: `index` (tokens seen, int32 scalar), one cache per layer, and
  the static `max_len` it was created for (a stream longer than that is an error)."""

  index: Int[Array, ""]
  layers: tuple[Any, ...]
  max_len: int = dataclasses.field(default=0, metadata=dict(static=True))


def nbytes(tree) -> int:
  """Bytes held by the arrays of a cache (or any pytree)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
