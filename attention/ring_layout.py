"""Token layouts of ring attention, and the static schedule of which blocks it computes.

The sequence of length `L` is cut into equal chunks; device `r` of a `P`-device ring holds:

    "contiguous"   chunk r of P                  (positions r*L/P .. (r+1)*L/P - 1)
    "zigzag"       chunks r and 2P-1-r of 2P     (Llama 3's context parallelism; the
                                                  "zigzag" of ring-flash-attention)

Under a causal mask the contiguous layout is unbalanced: device r sees r + 1 of the P blocks,
so the last device does ~2x the mean work. In the zig-zag layout each device holds one early
and one late chunk: at every ring step it computes exactly half a block (its late chunk
against an earlier device's whole block, or its whole block against a later device's early
chunk), so all devices do the same work. The ring computes a visit (query block of device
r, kv block of device s) as `C x C` chunk pairs (C = 1 or 2 chunks per device) and skips each
pair the mask hides entirely (`pair_visible`): that is where the balance comes from.

Everything here is static Python (ints, numpy) that the ring passes (attention/ring_pass.py)
also evaluate on traced device indices: `chunk_index`, `source`, `pair_visible` and
`ring_sweeps` decide what the ring computes, and `schedule` / `tile_counts` replay the same
decisions in Python, so the balance figures count the work the code executes.

Data-level use (permute once, not per layer): `to_layout(x, "zigzag", P)` reorders a global
`[B, L, ...]` array (tokens, positions, segment ids, targets) so that a plain `P("seq")`
sharding gives every device its two chunks; `from_layout` undoes it. `relayout` does the same
inside `shard_map` with two `ppermute`s of half a block (what `ring_attention_sharded` uses when
its inputs are in natural order).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from attention.masks import Mask

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"ring layout must be one of {LAYOUTS}, got {layout!r}.")
  return layout


def chunks_per_device(layout: str) -> int:
  """C: how many chunks (of `L / (C P)` tokens) each device holds."""
  return 2 if check_layout(layout) == "zigzag" else 1


def chunk_index(layout: str, num_devices: int, r, slot):
  """Global index (of `C * P` chunks) of the chunk in `slot` (0 .. C-1) of device `r`.

  Plain arithmetic: works on Python ints, numpy arrays and traced int32 scalars alike.
  """
  if layout == "contiguous":
    return r
  return r + slot * (2 * num_devices - 1 - 2 * r)  # slot 0: r, slot 1: 2P - 1 - r


def source(num_devices: int, r, shift: int, hop):
  """The device whose kv block device `r` holds after `hop` hops of the ring in direction
  `shift` (+1: blocks come from r - 1, r - 2, ...)."""
  return (r - shift * hop) % num_devices


def pair_visible(mask: Mask, q_lo, q_hi, kv_lo, kv_hi):
  """False iff the causal/window part of `mask` hides every key at positions `[kv_lo, kv_hi]`
  from every query at positions `[q_lo, q_hi]` (`classify_positions(...) != EMPTY`).

  Comparisons only: Python ints give a bool, numpy arrays an array, tracers a traced bool.
  """
  left, right = mask.bounds
  return (kv_hi - q_lo >= -left) & (kv_lo - q_hi <= right)


def _chunk_pair_visible(mask: Mask, layout: str, p: int, r: int, s: int, a: int, b: int,
                        q_chunk: int, kv_chunk: int, q_offset: int) -> bool:
  q_lo = q_offset + chunk_index(layout, p, r, a) * q_chunk
  kv_lo = chunk_index(layout, p, s, b) * kv_chunk
  return bool(pair_visible(mask, q_lo, q_lo + q_chunk - 1, kv_lo, kv_lo + kv_chunk - 1))


def _needed(mask: Mask, layout: str, p: int, q_len: int, kv_len: int) -> list[bool]:
  """`needed[d]`: some device r sees something of the block of device (r - d) mod P."""
  c = chunks_per_device(layout)
  qc, kc = q_len // c, kv_len // c
  return [any(_chunk_pair_visible(mask, layout, p, r, (r - d) % p, a, b, qc, kc, 0)
              for r in range(p) for a in range(c) for b in range(c)) for d in range(p)]


def ring_sweeps(mask: Mask, layout: str, num_devices: int, q_len: int, kv_len: int,
                static_offset: bool) -> tuple[tuple[int, int], ...]:
  """The static visiting plan `((shift, hops), ...)` of a ring (the first sweep also visits
  the device's own block).

  One sweep of `P - 1` hops (every block) unless a window bounds the reach: then the fewest
  hops receiving from the left (`shift` +1) plus from the right (-1) that reach every block
  pair `pair_visible` can't rule out (contiguous, causal window w: `ceil(w / S)` hops one way;
  zig-zag: both ways, as the late chunk's left neighbours sit on higher devices). Only when
  the query offset is the static 0 and `T == S`; otherwise the full ring (where the ring's
  `lax.cond`s still skip hidden pairs).
  """
  p = num_devices
  full = ((1, p - 1),)
  if mask.window is None or not static_offset or q_len != kv_len or p == 1:
    return full
  needed = _needed(mask, layout, p, q_len, kv_len)
  best = None
  for left in range(p - 1, -1, -1):  # hops with shift +1 cover distances 1 .. left
    right = max([p - d for d in range(left + 1, p) if needed[d]], default=0)
    if best is None or left + right < sum(best):
      best = (left, right)
  left, right = best
  if left + right >= p - 1:
    return full
  return ((1, left), (-1, right)) if right else ((1, left),)


# --- the schedule, replayed in Python -------------------------------------------------------------


def schedule(mask: Mask, layout: str, num_devices: int, q_len: int, kv_len: int
             ) -> list[list[tuple[int, int, int]]]:
  """Per device r, the `(s, q_chunk, kv_chunk)` chunk pairs the ring computes, in order.

  `q_len`, `kv_len`: per-device lengths. Replays `ring_sweeps`, `source` and `pair_visible`
  exactly as attention/ring_pass.py evaluates them (segment ids aside: they can only skip
  more). Needs an int `mask.q_offset`. O(P^2 C^2).
  """
  layout = check_layout(layout)
  p, c = num_devices, chunks_per_device(layout)
  offset = int(mask.q_offset)
  qc, kc = q_len // c, kv_len // c
  sweeps = ring_sweeps(mask, layout, p, q_len, kv_len, offset == 0)
  out = []
  for r in range(p):
    pairs = []
    for sweep, (shift, hops) in enumerate(sweeps):
      for hop in range(0 if sweep == 0 else 1, hops + 1):
        s = source(p, r, shift, hop)
        pairs += [(s, chunk_index(layout, p, r, a), chunk_index(layout, p, s, b))
                  for a in range(c) for b in range(c)
                  if _chunk_pair_visible(mask, layout, p, r, s, a, b, qc, kc, offset)]
    out.append(pairs)
  return out


def tile_counts(mask: Mask, layout: str, num_devices: int, seq_len: int, block: int
                ) -> np.ndarray:
  """`[P]`: (query, key) tiles of `block x block` each device computes, self-attention over
  `seq_len` tokens (the flash tiles of each computed chunk pair that `pair_visible` keeps,
  as the flash loops skip hidden tiles). `block` must divide the chunk length."""
  p, c = num_devices, chunks_per_device(layout)
  chunk = seq_len // (p * c)
  if seq_len % (p * c) or chunk % block:
    raise ValueError(f"tile_counts: seq_len {seq_len} must split into {p * c} chunks of a "
                     f"multiple of block {block}.")
  tiles = np.arange(chunk // block) * block
  counts = np.zeros(p, np.int64)
  for r, pairs in enumerate(schedule(mask, layout, p, seq_len // p, seq_len // p)):
    for _, qa, kb in pairs:
      q_lo = int(mask.q_offset) + qa * chunk + tiles[:, None]
      kv_lo = kb * chunk + tiles[None, :]
      counts[r] += int(np.sum(pair_visible(mask, q_lo, q_lo + block - 1, kv_lo,
                                           kv_lo + block - 1)))
  return counts


# --- permutations: once at the data level, or inside shard_map -----------------------------------


def permutation(layout: str, num_devices: int, seq_len: int) -> np.ndarray:
  """`[L]` int: `x_layout = x[..., perm, ...]` puts device r's chunks at rows r*L/P .. ."""
  p, c = num_devices, chunks_per_device(layout)
  if seq_len % (p * c):
    raise ValueError(f"the {layout} layout on {p} devices needs a sequence length divisible "
                     f"by {p * c}, got {seq_len}.")
  chunk = seq_len // (p * c)
  starts = [chunk_index(layout, p, r, a) * chunk for r in range(p) for a in range(c)]
  return np.concatenate([np.arange(start, start + chunk) for start in starts])


def to_layout(x, layout: str, num_devices: int, axis: int = 1):
  """`x` (numpy or jax, natural token order along `axis`) reordered into `layout`."""
  return x.take(permutation(layout, num_devices, x.shape[axis]), axis=axis)


def from_layout(x, layout: str, num_devices: int, axis: int = 1):
  """Undoes `to_layout`."""
  return x.take(np.argsort(permutation(layout, num_devices, x.shape[axis])), axis=axis)


def _halves(layout: str, p: int, r: int) -> tuple[int, int]:
  """The two chunks (of 2P) device r holds in `layout`, in local order."""
  if layout == "contiguous":
    return (2 * r, 2 * r + 1)
  return tuple(chunk_index(layout, p, r, a) for a in range(2))


def relayout(tree, axis_name: str, num_devices: int, src: str, dst: str, axis: int = 1):
  """Every leaf of `tree`, the local block of a sequence sharded in layout `src` (along
  `axis`), moved to layout `dst`; call inside `shard_map`. Each device sends its two halves
  with one `ppermute` each (half a block of communication each), then orders what it got."""
  if src == dst:
    return tree
  return jax.tree.map(lambda x: _relayout(x, axis_name, num_devices, src, dst, axis), tree)


def _relayout(x, axis_name: str, p: int, src: str, dst: str, axis: int):
  """Two `ppermute`s, one per half: grouped by the half sent when that maps devices one to one
  (contiguous -> zig-zag), else by the half received (zig-zag -> contiguous)."""
  held = {chunk: (e, i) for e in range(p) for i, chunk in enumerate(_halves(src, p, e))}
  home = {chunk: (d, j) for d in range(p) for j, chunk in enumerate(_halves(dst, p, d))}
  one_to_one = lambda pairs: len({b for _, b in pairs}) == len({a for a, _ in pairs}) == p
  r = lax.axis_index(axis_name)
  lo, hi = jnp.split(x, 2, axis=axis)
  pick = lambda table, a, b: jnp.where(jnp.asarray(table)[r] == 0, a, b)
  sent = [[(e, home[_halves(src, p, e)[i]]) for e in range(p)] for i in range(2)]
  if all(one_to_one([(e, d) for e, (d, _) in pairs]) for pairs in sent):
    got, slot = [], np.zeros((2, p), np.int32)
    for i, (half, pairs) in enumerate(zip((lo, hi), sent)):
      got.append(lax.ppermute(half, axis_name, [(e, d) for e, (d, _) in pairs]))
      for _, (d, j) in pairs:
        slot[i, d] = j
    return jnp.concatenate([pick(slot[0], got[0], got[1]), pick(slot[0], got[1], got[0])], axis)
  parts = []
  for j in range(2):
    pairs = [(held[_halves(dst, p, d)[j]], d) for d in range(p)]
    if not one_to_one([(e, d) for (e, _), d in pairs]):
      raise ValueError(f"relayout {src} -> {dst}: no one-to-one exchange of half blocks.")
    half = np.zeros(p, np.int32)
    for (e, i), _ in pairs:
      half[e] = i
    parts.append(lax.ppermute(pick(half, lo, hi), axis_name, [(e, d) for (e, _), d in pairs]))
  return jnp.concatenate(parts, axis)
