"""Attention visibility: the `Mask` pytree and block classification.

A query at absolute position `i` sees a key at position `j` iff all of:

* `causal`          -> `j <= i`
* `window=(l, r)`   -> `i - l <= j <= i + r`
* segment ids       -> `q_segment_ids[b, t] == kv_segment_ids[b, s] >= 0`
                       (a negative id is padding: it sees nothing and is seen by nothing)

`sinks=n` (StreamingLLM's attention sinks) widens the window: the keys at absolute positions
`0 .. n-1` of the sequence (not of each segment) are visible to every query that causality
(`j <= i` when `causal`) and the segment ids allow, whatever its window::

    visible(i, j) = (in_window(i, j) or j < n) and (j <= i if causal) and same_segment(i, j)

Query `t` has absolute position `q_offset + t` (`q_offset` is an int or a `[B]` array: decode
and chunked prefill put the new queries after the cached keys); key `s` has position `s`.

`Mask` is a pytree: `causal` and `window` are static (they shape the kernels' block
iteration space), the segment ids and `q_offset` are array leaves (they may be traced).

Block classification is what kernels use to skip work. For a tile of queries
`[q_start, q_start + bq)` and keys `[kv_start, kv_start + bk)`:

* `EMPTY`   -> no query sees any key: the tile is skipped entirely.
* `FULL`    -> every query sees every key: no mask needs computing.
* `PARTIAL` -> the mask is evaluated elementwise.

`effective_indices` applies the same rule to top-k key lists (sparse attention).

`kv_block_range` / `q_block_range` give the contiguous range of blocks a causal/window mask can
touch, so loops iterate only over those: a window of width `w` costs O(L * w), causal O(L^2 / 2).
With sinks a q tile also visits the `sink_blocks` before its window band (the sink blocks plus
the band are the only kv tiles visited: O(L * (w + n))); a kv tile holding sinks is seen by
every later q tile, so `q_block_range` stays one contiguous range.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

EMPTY, PARTIAL, FULL = 0, 1, 2
BLOCK_KINDS = {EMPTY: "empty", PARTIAL: "partial", FULL: "full"}

# An unbounded window side (`Mask.bounds` without a window). Large, yet `position +/- UNBOUNDED`
# stays inside int32.
UNBOUNDED = 1 << 30


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query sees. See the module docstring for the exact semantics.

  Attributes:
    causal: a query never sees keys after its own position.
    window: `(left, right)`: a query at `i` sees keys in `[i - left, i + right]`.
      `(0, 0)` is the diagonal only; `(w - 1, 0)` with causal is a w-token sliding window.
    q_segment_ids: `[B, T]` int; queries see only keys of the same segment; `< 0` is padding.
    kv_segment_ids: `[B, S]` int; required together with `q_segment_ids`.
    q_offset: absolute position of query 0: an int or a `[B]` int array.
    sinks: the first `sinks` keys of the sequence (positions `0 .. sinks-1`) are visible to
      every query causality and segments allow, besides its window (StreamingLLM).
  """

  causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
  window: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
  q_segment_ids: Int[Array, "B T"] | None = None
  kv_segment_ids: Int[Array, "B S"] | None = None
  q_offset: Any = 0
  sinks: int = dataclasses.field(default=0, metadata=dict(static=True))

  def __post_init__(self):
    if isinstance(self.sinks, bool) or not isinstance(self.sinks, (int, np.integer)) or (
        self.sinks < 0):
      raise ValueError(f"Mask.sinks must be an int >= 0 (the first keys every query sees), got "
                       f"{self.sinks!r}.")
    object.__setattr__(self, "sinks", int(self.sinks))
    if self.window is not None:
      window = tuple(self.window)
      if len(window) != 2 or not all(isinstance(w, (int, np.integer)) for w in window):
        raise ValueError(f"Mask.window must be a pair of ints (left, right), got {self.window!r}.")
      if window[0] < 0 or window[1] < 0:
        raise ValueError(f"Mask.window sides must be >= 0, got {self.window!r}.")
      object.__setattr__(self, "window", (int(window[0]), int(window[1])))
    if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
      raise ValueError("Mask needs both q_segment_ids and kv_segment_ids, or neither.")
    offset = self.q_offset  # placeholders (pytree unflattening) have no dtype and pass
    if isinstance(offset, (float, complex)) or (
        hasattr(offset, "dtype") and not jnp.issubdtype(offset.dtype, jnp.integer)):
      raise ValueError(f"Mask.q_offset must be a Python int or an int array, got {offset!r}.")

  @property
  def has_segments(self) -> bool:
    return self.q_segment_ids is not None

  @property
  def bounds(self) -> tuple[int, int]:
    """`(left, right)` reach of a query, folding `causal` into the window (`UNBOUNDED`: no limit)."""
    left, right = self.window if self.window is not None else (UNBOUNDED, UNBOUNDED)
    if self.causal:
      right = min(right, 0)
    return left, right


def sink_visible(mask: Mask, q_pos, kv_pos):
  """Elementwise visibility through the sinks alone (`kv_pos < sinks`, causal-checked), or None
  without sinks. `q_pos` / `kv_pos` broadcast against each other (ints or arrays)."""
  if not mask.sinks:
    return None
  vis = kv_pos < mask.sinks
  return vis & (kv_pos <= q_pos) if mask.causal else vis


def local_mask(window: int, *, causal: bool = True, **kw) -> Mask:
  """Sliding window of `window` tokens: causal -> the last `window` keys; else centred."""
  if window < 1:
    raise ValueError(f"local window must be >= 1 token, got {window}.")
  if causal:
    return Mask(causal=True, window=(window - 1, 0), **kw)
  return Mask(window=(window // 2, window // 2), **kw)


def validate(mask: Mask | None, q_shape: tuple[int, ...], kv_shape: tuple[int, ...]) -> Mask:
  """Checks a mask against `q [B, T, ...]` and `kv [B, S, ...]` shapes; returns a Mask."""
  if mask is None:
    return Mask()
  if not isinstance(mask, Mask):
    raise ValueError(f"mask must be an attention.Mask or None, got {type(mask).__name__}.")
  batch, q_len, kv_len = q_shape[0], q_shape[1], kv_shape[1]
  if mask.has_segments:
    for name in ("q_segment_ids", "kv_segment_ids"):
      dtype = jnp.asarray(getattr(mask, name)).dtype
      if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be integers (negative = padding), got dtype {dtype}.")
    qs, ks = jnp.shape(mask.q_segment_ids), jnp.shape(mask.kv_segment_ids)
    if qs != (batch, q_len):
      raise ValueError(f"q_segment_ids must have shape [B, T] = {(batch, q_len)}, got {qs}.")
    if ks != (batch, kv_len):
      raise ValueError(f"kv_segment_ids must have shape [B, S] = {(batch, kv_len)}, got {ks}.")
  off_shape = jnp.shape(mask.q_offset)
  if off_shape not in ((), (batch,)):
    raise ValueError(f"q_offset must be an int or a [B] = [{batch}] array, got shape {off_shape}.")
  return mask


def refuse_sinks(mask: Mask | None, operation: str) -> None:
  """ValueError when `mask` has `sinks` (for operations whose key reach is only the window)."""
  if mask is not None and mask.sinks:
    raise ValueError(f"{operation} does not support Mask.sinks (got sinks={mask.sinks}); use "
                     f"flash_attention or reference_attention for it.")


def q_offsets(mask: Mask, batch: int) -> Int[Array, "B"]:
  return jnp.broadcast_to(jnp.asarray(mask.q_offset, jnp.int32), (batch,))


def dense_mask(mask: Mask | None, batch: int, q_len: int, kv_len: int) -> Bool[Array, "B T S"]:
  """The materialised `[B, T, S]` visibility (True = visible). O(T * S) memory: reference only."""
  mask = Mask() if mask is None else mask
  q_pos = q_offsets(mask, batch)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None]  # B T
  kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
  return element_mask(mask, q_pos, kv_pos[None], mask.q_segment_ids, mask.kv_segment_ids)


def element_mask(mask: Mask, q_pos, kv_pos, q_seg=None, kv_seg=None) -> Bool[Array, "B T S"]:
  """Elementwise visibility for position tiles `q_pos [B, t]`, `kv_pos [B|1, s]` (+ segment tiles)."""
  left, right = mask.bounds
  diff = kv_pos[:, None, :] - q_pos[:, :, None]  # B t s: key minus query position
  visible = (diff >= -left) & (diff <= right)
  sink = sink_visible(mask, q_pos[:, :, None], kv_pos[:, None, :])
  if sink is not None:
    visible |= sink
  if q_seg is not None:
    visible &= (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] >= 0)
  return visible


def effective_indices(indices, mask: Mask, batch: int, q_len: int, kv_len: int,
                      kv_heads: int) -> Int[Array, "B T X k"]:
  """Top-k `indices` (`[B, T, k]` shared or `[B, T, K, k]` per kv head) made safe to gather.

  Returns `[B, T, X, k]` int32 (X = 1 shared, or K) with -1 on every slot that must be
  ignored: -1 / out-of-range slots and keys `mask` hides from the query (causality, window and
  segments are re-checked after selection). O(T * k) work.
  """
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
  q_pos = q_offsets(mask, batch)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None]
  left, right = mask.bounds
  diff = safe - q_pos[:, :, None, None]  # key minus query position
  in_window = (diff >= -left) & (diff <= right)
  sink = sink_visible(mask, q_pos[:, :, None, None], safe)
  valid &= in_window if sink is None else in_window | sink
  if mask.has_segments:
    q_seg = jnp.asarray(mask.q_segment_ids, jnp.int32)[:, :, None, None]
    kv_seg = jax.vmap(lambda seg, i: seg[i])(jnp.asarray(mask.kv_segment_ids, jnp.int32), safe)
    valid &= (q_seg == kv_seg) & (q_seg >= 0)
  return jnp.where(valid, idx, -1)


def visible_keys(mask: Mask, q_len: int, kv_len: int) -> np.ndarray:
  """`[q_len]` int64: how many keys each query sees under the causal/window part of `mask`.

  Static (numpy, O(T)): segment ids are ignored and `q_offset` must be an int. For FLOP
  counts (`visible_pairs`, `models.flops`, the benchmarks).
  """
  if np.ndim(mask.q_offset) or isinstance(mask.q_offset, jax.core.Tracer):
    raise ValueError(f"visible_keys needs an int q_offset, got {mask.q_offset!r}.")
  left, right = mask.bounds
  i = int(mask.q_offset) + np.arange(q_len, dtype=np.int64)
  lo = np.maximum(i - left, 0)  # int64: no overflow with UNBOUNDED sides
  hi = np.minimum(i + right, kv_len - 1)
  count = np.maximum(hi - lo + 1, 0)
  if mask.sinks:  # the sink keys [0, n) causality allows, minus those inside the window
    last = np.minimum(i, kv_len - 1) if mask.causal else np.full_like(i, kv_len - 1)
    n = np.maximum(np.minimum(mask.sinks, last + 1), 0)
    outside = np.minimum(n, lo) + np.maximum(n - hi - 1, 0)
    count = count + np.where(count > 0, outside, n)
  return count


def visible_pairs(mask: Mask, q_len: int, kv_len: int, cap: int | None = None) -> int:
  """Visible (query, key) pairs under the causal/window part of `mask` (segments ignored),
  counting at most `cap` keys per query (top-k attention)."""
  per_query = visible_keys(mask, q_len, kv_len)
  return int(np.minimum(per_query, cap if cap is not None else kv_len).sum())


# --- block classification ---------------------------------------------------------------------


def kv_block_range(mask: Mask, q_lo, q_hi, block_kv: int, num_kv_blocks: int):
  """Range `[lo, hi)` of kv blocks that queries at absolute positions `[q_lo, q_hi]` can see
  through their window (the band); sink blocks before it: `sink_blocks`, `kv_block_at`.

  Works on Python ints and traced int32 scalars alike (kernels compute it per q block).
  """
  left, right = mask.bounds
  first_key = jnp.maximum(q_lo - left, 0) if left < UNBOUNDED else 0
  last_key = q_hi + right if right < UNBOUNDED else num_kv_blocks * block_kv - 1
  lo = jnp.clip(first_key // block_kv, 0, num_kv_blocks)
  hi = jnp.clip(last_key // block_kv + 1, lo, num_kv_blocks)
  if mask.sinks and not mask.causal:  # sinks right of a band (non-causal): widen the band
    hi = jnp.maximum(hi, jnp.minimum(-(-mask.sinks // block_kv), num_kv_blocks))
  return lo, hi


def sink_blocks(mask: Mask, lo, block_kv: int):
  """kv blocks `[0, n)` holding sinks that a q tile whose window band starts at block `lo`
  visits before the band: `n = min(ceil(sinks / block_kv), lo)` (0 without sinks)."""
  if not mask.sinks:
    return 0 * lo
  return jnp.minimum(-(-mask.sinks // block_kv), lo)


def kv_block_at(step, lo, num_sink_blocks):
  """The kv block of loop step `step` over `sink_blocks` then the band `[lo, hi)`: a loop runs
  `num_sink_blocks + hi - lo` steps (no sinks: steps `[0, hi - lo)` map to `[lo, hi)`)."""
  return jnp.where(step < num_sink_blocks, step, lo + step - num_sink_blocks)


def q_block_range(mask: Mask, kv_lo, kv_hi, off_min, off_max, block_q: int, num_q_blocks: int):
  """Range `[lo, hi)` of q blocks that can see some key in positions `[kv_lo, kv_hi]`.

  Query `t` sits at position `t + offset`, with the offset in `[off_min, off_max]`. Keys holding
  sinks (`kv_lo < sinks`) are seen by every later query: the range then runs to the end.
  """
  left, right = mask.bounds
  first_q = jnp.maximum(kv_lo - right - off_max, 0) if right < UNBOUNDED else 0
  last_q = kv_hi + left - off_min if left < UNBOUNDED else num_q_blocks * block_q - 1
  if mask.sinks:
    holds_sink = kv_lo < mask.sinks
    sink_first = jnp.maximum(kv_lo - off_max, 0) if mask.causal else 0
    first_q = jnp.where(holds_sink, jnp.minimum(first_q, sink_first), first_q)
    last_q = jnp.where(holds_sink, num_q_blocks * block_q - 1, last_q)
  lo = jnp.clip(first_q // block_q, 0, num_q_blocks)
  hi = jnp.clip(last_q // block_q + 1, lo, num_q_blocks)
  return lo, hi


def classify_positions(mask: Mask, q_lo, q_hi, kv_lo, kv_hi):
  """EMPTY / PARTIAL / FULL for query positions `[q_lo, q_hi]` x key positions `[kv_lo, kv_hi]`.

  Only the causal/window part of the mask (positions are absolute, ints or traced scalars).
  """
  left, right = mask.bounds
  # Extreme key-minus-query differences in the tile.
  d_min, d_max = kv_lo - q_hi, kv_hi - q_lo
  empty = (d_max < -left) | (d_min > right)
  full = (d_min >= -left) & (d_max <= right)
  kind = jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL))
  if mask.sinks:  # sinks only add keys: a tile holding some that causality allows is not empty
    sink_seen = (kv_lo < mask.sinks) & ((kv_lo <= q_hi) if mask.causal else True)
    kind = jnp.where(sink_seen, jnp.maximum(kind, PARTIAL), kind)
  return kind


def segment_ranges(seg: Int[Array, "B L"], block: int) -> tuple[Array, Array]:
  """Per-block `[B, L // block]` min and max segment id, ignoring padding (< 0) ids.

  A block that is all padding gets `min = big, max = -1`, so it meets nothing.
  """
  b, length = seg.shape
  tiles = seg.reshape(b, length // block, block)
  valid = tiles >= 0
  seg_min = jnp.min(jnp.where(valid, tiles, UNBOUNDED), axis=-1)
  seg_max = jnp.max(jnp.where(valid, tiles, -1), axis=-1)
  return seg_min, seg_max


def classify_segments(q_min, q_max, kv_min, kv_max, q_all_valid, kv_all_valid):
  """EMPTY / PARTIAL / FULL from per-tile segment ranges (arrays over batch are reduced)."""
  disjoint = (q_max < kv_min) | (kv_max < q_min)
  single = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min) & q_all_valid & kv_all_valid
  empty = jnp.all(disjoint)
  full = jnp.all(single)
  return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL))


def combine(a, b):
  """Class of the intersection of two masks' tiles: empty wins, full needs both full."""
  return jnp.minimum(a, b)


def block_map(mask: Mask | None, q_len: int, kv_len: int, block_q: int, block_kv: int,
              batch_index: int = 0) -> np.ndarray:
  """`[ceil(T / bq), ceil(S / bk)]` numpy array of block kinds for one batch row (for plots).

  Keys past `kv_len` (padding of the last block) count as invisible, as in the kernels.
  """
  mask = Mask() if mask is None else mask
  batch = batch_index + 1
  if mask.has_segments:
    batch = jnp.shape(mask.q_segment_ids)[0]
  elif jnp.ndim(mask.q_offset):
    batch = jnp.shape(mask.q_offset)[0]
  dense = np.asarray(dense_mask(mask, batch, q_len, kv_len))[batch_index]
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  padded = np.zeros((nq * block_q, nk * block_kv), bool)
  padded[:q_len, :kv_len] = dense
  valid = np.zeros_like(padded)
  valid[:q_len, :kv_len] = True
  tiles = padded.reshape(nq, block_q, nk, block_kv).transpose(0, 2, 1, 3)
  valid_tiles = valid.reshape(nq, block_q, nk, block_kv).transpose(0, 2, 1, 3)
  any_visible = tiles.any(axis=(2, 3))
  all_visible = (tiles | ~valid_tiles).all(axis=(2, 3)) & valid_tiles.all(axis=(2, 3))
  return np.where(~any_visible, EMPTY, np.where(all_visible, FULL, PARTIAL))
