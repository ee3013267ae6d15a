"""Block schedules for the Pallas flash kernels: which tiles a program visits, and how.

Each kernel program owns one *resident* tile (a q block in the forward and dQ kernels, a kv
block in the dK/dV kernel) and loops over *streamed* tiles of the other axis. The loop never
touches a tile the positions (causal, window, offsets) hide, and never evaluates the mask
elementwise on a tile it fully shows. Both facts are precomputed here, in XLA, as small int32
tables (O(B * blocks)):

    schedule[b, :, r] = (lo, hi, full_lo, full_hi)      lo <= full_lo <= full_hi <= hi

* `[lo, hi)`: the streamed blocks that can see resident block `r` of batch row `b`
  (causal / window bounds with that row's `q_offset`, intersected with the segment ranges);
* `[full_lo, full_hi)`: the middle run whose position mask is all-visible (no padded keys),
  visited without any elementwise mask; the ends `[lo, full_lo)` and `[full_hi, hi)` (the
  diagonal and window edges, 1-3 blocks each) are visited masked.

So causal costs ~T*S/2 and a window w ~T*(w + 2 blocks), in the forward and both backward
kernels. With `Mask.sinks` the q-major schedules carry a fifth row, `sink_hi`: the sink blocks
`[0, sink_hi)` lying before the band, visited first (masked); the kv-major schedule's `[lo, hi)`
of a sink block already runs to the last q block (`masks.q_block_range`).

With segment ids the schedule does all the segment work, so the kernels' loops hold no branch (a `lax.cond` / `lax.switch` around the K/V loads lowers to nested `scf.if`, which
Triton does not software-pipeline): `[lo, hi)` is cut to the streamed blocks whose id range
meets the resident block's (packed, sorted segments: exactly the non-empty ones), and
`[full_lo, full_hi)` to the run of blocks that hold the resident block's single segment
(`_segment_full_run`). Every other block is loaded and computed unconditionally with the
elementwise mask (`visible`, which includes the segment ids), so a block with no visible pair
inside `[lo, hi)` (unsorted ids only) costs its compute and contributes nothing.

Segment tables `seg_tab[b, :, r] = (min, max, single)`: min/max id over the tile's valid (>= 0)
ids (`big, -1` if all padding) and `single` = the id when the tile is one unpadded segment,
else -1.

The in-kernel helpers (`visible`, `visit`, `dot_precision`) are shared by the three kernels.

Float32 policy: every `plgpu.dot` passes an explicit precision. float32 inputs multiply in exact
float32 (`lax.Precision.HIGHEST`, Triton `inputPrecision = ieee`) unless the caller sets
`BlockSizes.allow_tf32` (`lax.Precision.DEFAULT`: Triton's TF32 tensor cores, ~1e-3 relative
error, several times faster). bf16/f16 inputs always run on tensor cores in their own dtype
with float32 accumulation; the flag changes nothing for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import masks as masks_lib
from attention.masks import UNBOUNDED, Mask
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods, modify

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def cdiv(a, b: int):
  """Ceiling division for ints and int arrays (negative numerators included)."""
  return -((-a) // b)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static facts the kernels specialise on (hashable: part of the kernel's identity)."""

  left: int  # mask.bounds: how far a query sees to the left / right (`UNBOUNDED`: unbounded)
  right: int
  kv_len: int  # real keys; positions >= kv_len are padding
  has_segments: bool
  soft_cap: float | None = None  # logits soft-cap (`attention.scores`)
  alibi: bool = False  # ALiBi slopes arrive as a `[Np]` float32 operand
  sinks: int = 0  # `Mask.sinks`: keys `< sinks` visible to every query causality allows
  causal: bool = False

  @classmethod
  def of(cls, mask: Mask, kv_len: int, mods: ScoreMods = NO_MODS) -> "Geometry":
    left, right = mask.bounds
    return cls(left=int(left), right=int(right), kv_len=int(kv_len),
               has_segments=mask.has_segments, soft_cap=mods.soft_cap,
               alibi=mods.alibi_slopes is not None, sinks=mask.sinks, causal=mask.causal)

  @property
  def schedule_rows(self) -> int:
    """Rows of a q-major schedule: `(lo, hi, full_lo, full_hi)`, `+ (sink_hi,)` with sinks."""
    return 5 if self.sinks else 4

  @property
  def has_mods(self) -> bool:
    return self.soft_cap is not None or self.alibi


# --- schedules (XLA, outside the kernels) ------------------------------------------------------


def segment_table(seg, block: int):
  """`[B, 3, L // block]` int32 (min, max, single) per tile of `seg [B, L]` (padded with -1)."""
  b, length = seg.shape
  seg_min, seg_max = masks_lib.segment_ranges(seg, block)
  all_valid = jnp.all(seg.reshape(b, length // block, block) >= 0, axis=-1)
  single = jnp.where((seg_min == seg_max) & all_valid, seg_min, -1)
  return jnp.stack([seg_min, seg_max, single], axis=1).astype(jnp.int32)


def _segment_range(res_tab, str_tab, n_res: int, n_str: int):
  """First/last+1 streamed block whose segment range meets each resident block's: `[B, n_res]`.

  O(B * n_res * n_str) booleans (0.5M per row at 64K tokens with 128x64 tiles).
  """
  res_min, res_max = res_tab[:, 0, :n_res, None], res_tab[:, 1, :n_res, None]
  str_min, str_max = str_tab[:, 0, None, :n_str], str_tab[:, 1, None, :n_str]
  meets = (res_min <= str_max) & (str_min <= res_max)  # B n_res n_str
  first = jnp.argmax(meets, axis=-1)
  last = n_str - jnp.argmax(meets[..., ::-1], axis=-1)
  found = jnp.any(meets, axis=-1)
  return jnp.where(found, first, 0), jnp.where(found, last, 0)


def _segment_full_run(res_tab, str_tab, n_res: int, n_str: int, full_lo, full_hi):
  """The first run of streamed blocks in `[full_lo, full_hi)` holding exactly the resident
  block's single segment (both tiles one unpadded segment, the same id): `(lo, hi)` `[B, n_res]`,
  empty (lo = hi) when there is none. Only such blocks may be visited without a mask."""
  res_single = res_tab[:, 2, :n_res, None]
  same = (res_single == str_tab[:, 2, None, :n_str]) & (res_single >= 0)  # B n_res n_str
  col = jnp.arange(n_str, dtype=jnp.int32)[None, None]
  same &= (col >= full_lo[..., None]) & (col < full_hi[..., None])
  first = jnp.where(jnp.any(same, -1), jnp.argmax(same, -1), full_lo)
  after = (col > first[..., None]) & ~same
  last = jnp.where(jnp.any(after, -1), jnp.argmax(after, -1), n_str)
  last = jnp.where(jnp.any(same, -1), last, first)
  return first, last


def _finish(lo, hi, full_lo, full_hi, seg_range=None, full_run=None):
  if seg_range is not None:
    lo, hi = jnp.maximum(lo, seg_range[0]), jnp.minimum(hi, seg_range[1])
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  if full_run is not None:  # segments: only the single-segment run goes unmasked
    full_lo, full_hi = jnp.clip(full_run[0], full_lo, full_hi), jnp.clip(full_run[1], full_lo,
                                                                          full_hi)
    full_hi = jnp.maximum(full_hi, full_lo)
  return jnp.stack(jnp.broadcast_arrays(lo, hi, full_lo, full_hi), axis=1).astype(jnp.int32)


def q_major_schedule(mask: Mask, offsets, num_q_blocks: int, block_q: int, kv_len: int,
                     block_kv: int, q_tab=None, kv_tab=None):
  """`[B, 4, num_q_blocks]`: per q block, the kv blocks to visit (forward and dQ kernels);
  `[B, 5, num_q_blocks]` with `mask.sinks`, the fifth row `sink_hi`: the sink blocks
  `[0, sink_hi)` before the band `[lo, hi)` (`masks.sink_blocks`).

  Only kv blocks holding real keys (`< cdiv(kv_len, block_kv)`) are ever visited.
  """
  nk = cdiv(kv_len, block_kv)
  left, right = mask.bounds
  q_lo = offsets[:, None] + block_q * jnp.arange(num_q_blocks, dtype=jnp.int32)[None]  # B nq
  q_hi = q_lo + block_q - 1
  lo, hi = masks_lib.kv_block_range(mask, q_lo, q_hi, block_kv, nk)
  # Block j is fully visible iff j*bk >= q_hi - left and (j+1)*bk - 1 <= q_lo + right.
  full_lo = cdiv(q_hi - left, block_kv)
  full_hi = jnp.minimum((q_lo + right + 1) // block_kv, kv_len // block_kv)  # no padded keys
  zero = 0 * q_lo
  lo, hi, full_lo, full_hi = lo + zero, hi + zero, full_lo + zero, full_hi + zero
  if q_tab is None:
    schedule = _finish(lo, hi, full_lo, full_hi)
  else:
    schedule = _finish(lo, hi, full_lo, full_hi, _segment_range(q_tab, kv_tab, num_q_blocks, nk),
                       _segment_full_run(q_tab, kv_tab, num_q_blocks, nk, full_lo, full_hi))
  if not mask.sinks:
    return schedule
  # Sinks: the blocks [0, sink_hi) before the band, visited masked (`visit`).
  sink_hi = masks_lib.sink_blocks(mask, schedule[:, 0], block_kv)
  return jnp.concatenate([schedule, sink_hi[:, None].astype(jnp.int32)], axis=1)


def kv_major_schedule(mask: Mask, offsets, num_kv_blocks: int, block_kv: int, kv_len: int,
                      q_len: int, block_q: int, q_tab=None, kv_tab=None):
  """`[B, 4, num_kv_blocks]`: per kv block, the q blocks that can see it (dK/dV kernel).

  Only q blocks holding real queries are visited; blocks of padded keys visit nothing.
  """
  nq = cdiv(q_len, block_q)
  left, right = mask.bounds
  off = offsets[:, None]  # B 1
  k_lo = block_kv * jnp.arange(num_kv_blocks, dtype=jnp.int32)[None]  # 1 nk
  k_hi = k_lo + block_kv - 1
  zero = 0 * (off + k_lo)  # B nk
  lo, hi = masks_lib.q_block_range(mask, k_lo, k_hi, off, off, block_q, nq)
  hi = jnp.where(k_lo >= kv_len, lo, hi)
  # q block i is fully visible iff q_hi <= k_lo + left and q_lo >= k_hi - right.
  full_lo = cdiv(k_hi - right - off, block_q)
  full_hi = (k_lo + left - off + 1) // block_q
  full_hi = jnp.where(k_lo + block_kv > kv_len, full_lo, full_hi)  # padded keys: always mask
  lo, hi, full_lo, full_hi = lo + zero, hi + zero, full_lo + zero, full_hi + zero
  if q_tab is None:
    return _finish(lo, hi, full_lo, full_hi)
  return _finish(lo, hi, full_lo, full_hi, _segment_range(kv_tab, q_tab, num_kv_blocks, nq),
                 _segment_full_run(kv_tab, q_tab, num_kv_blocks, nq, full_lo, full_hi))


# --- in-kernel helpers -------------------------------------------------------------------------


def visible(geom: Geometry, q_pos, kv_pos, q_seg=None, kv_seg=None):
  """Elementwise visibility of a tile; `q_pos`/`kv_pos` (and segment ids) broadcast to it.

  Callers pass `[r, 1]` and `[1, c]` columns/rows in whichever orientation their scores use.
  """
  diff = kv_pos - q_pos
  reach = None  # the window (with causality); None: unbounded
  if geom.left < UNBOUNDED:
    reach = diff >= -geom.left
  if geom.right < UNBOUNDED:
    reach = diff <= geom.right if reach is None else reach & (diff <= geom.right)
  if geom.sinks and reach is not None:  # sinks: besides the window, if causality allows
    sink = kv_pos < geom.sinks
    reach |= sink & (diff <= 0) if geom.causal else sink
  vis = kv_pos < geom.kv_len  # padded keys are never visible
  if reach is not None:
    vis &= reach
  if q_seg is not None:
    vis &= (q_seg == kv_seg) & (q_seg >= 0)
  return vis


def scores2(geom: Geometry, s, scale: float, slope, q_pos, kv_pos):
  """`(s2, dcap)`: a tile of raw dots `s` as base-2 logits (`s * scale * log2 e`), soft-capped
  and ALiBi-biased in natural units first when the geometry has score modifiers
  (`attention.scores`; `slope` a scalar, positions broadcasting to the tile)."""
  if not geom.has_mods:
    return s * (scale * LOG2E), None
  s, dcap = modify(s * scale, geom.soft_cap, slope, q_pos, kv_pos)
  return s * LOG2E, dcap


def split_refs(geom: Geometry, refs):
  """`(q_seg_ref, kv_seg_ref, slopes_ref, output refs)` from a kernel's trailing refs: the
  segment ids (with segments), the ALiBi slopes (with ALiBi), then the outputs."""
  refs = list(refs)
  q_seg_ref = kv_seg_ref = slopes_ref = None
  if geom.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  if geom.alibi:
    slopes_ref, *refs = refs
  return q_seg_ref, kv_seg_ref, slopes_ref, refs


def slopes_operand(mods: ScoreMods):
  """The ALiBi slopes padded to a power of two (a kernel operand), or None."""
  if mods.alibi_slopes is None:
    return None
  n = mods.alibi_slopes.shape[0]
  return jnp.pad(mods.alibi_slopes, (0, (1 << max(0, n - 1).bit_length()) - n))


def whole(x) -> pl.BlockSpec:
  """A BlockSpec that hands every program the whole of `x` (schedule tables, slopes)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def with_optional(specs: list, inputs: list, segments, segment_specs, slopes):
  """`(specs, inputs)` with the optional operands appended in `split_refs`' order: the segment
  ids `(q_seg, kv_seg)` with their `segment_specs`, then the ALiBi `slopes` (whole)."""
  if segments is not None:
    specs, inputs = specs + list(segment_specs), inputs + list(segments)
  if slopes is not None:
    specs, inputs = specs + [whole(slopes)], inputs + [slopes]
  return specs, inputs


class QMajorSpecs(NamedTuple):
  """BlockSpecs of the q-major kernels (forward, dQ): grid `(i, b, n)` = (q block, batch row,
  q head), q blocks visited last-first (`nq - 1 - i`: the longest causal rows start first)."""
  q: Callable[[int], pl.BlockSpec]   # head dim -> `[block_q, d]` tile of q head n (q, dout, out)
  kv: Callable[[int], pl.BlockSpec]  # head dim -> all `Sp` keys of kv head n // group
  row: pl.BlockSpec                  # `[block_q]` of a `[B, N, Tp]` row table (lse, delta)
  segments: tuple[pl.BlockSpec, pl.BlockSpec]  # q ids `[block_q]`, kv ids `[Sp]`


def q_major_specs(q, k, block_q: int) -> QMajorSpecs:
  """The specs for padded `q [B, Tp, N, Hp]` and `k [B, Sp, K, Hp]` (`Tp % block_q == 0`)."""
  s_pad, group = k.shape[1], q.shape[2] // k.shape[2]
  qi = lambda i: q.shape[1] // block_q - 1 - i
  return QMajorSpecs(
      q=lambda d: pl.BlockSpec((None, block_q, None, d), lambda i, b, n: (b, qi(i), n, 0)),
      kv=lambda d: pl.BlockSpec((None, s_pad, None, d), lambda i, b, n: (b, 0, n // group, 0)),
      row=pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, qi(i))),
      segments=(pl.BlockSpec((None, block_q), lambda i, b, n: (b, qi(i))),
                pl.BlockSpec((None, s_pad), lambda i, b, n: (b, 0))))


def launch(kernel, inputs: list, *, name: str, grid, in_specs, out_specs, out_shape,
           num_warps: int, num_stages: int, interpret: bool):
  """`pl.pallas_call` on the Triton backend (explicit `CompilerParams`, so jax never picks
  Mosaic GPU), applied to `inputs`."""
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=name)(*inputs)


def read_slope(slopes_ref, head):
  """The ALiBi slope of q head `head` (None when the kernel has no slopes operand)."""
  return None if slopes_ref is None else slopes_ref[head]


def visit(schedule, step, carry):
  """Runs `step(j, carry, masked)` over the streamed blocks of one resident tile.

  `schedule = (lo, hi, full_lo, full_hi)` scalars: `[lo, full_lo)` and `[full_hi, hi)` masked,
  `[full_lo, full_hi)` unmasked. Three plain loops, no branch inside (Triton pipelines them).
  A fifth scalar `sink_hi` (sinks) adds a first loop over the sink blocks `[0, sink_hi)`, masked.
  """
  lo, hi, full_lo, full_hi, *sinks = schedule
  if sinks:
    carry = lax.fori_loop(0, sinks[0], lambda j, c: step(j, c, True), carry)
  carry = lax.fori_loop(lo, full_lo, lambda j, c: step(j, c, True), carry)
  carry = lax.fori_loop(full_lo, full_hi, lambda j, c: step(j, c, False), carry)
  return lax.fori_loop(full_hi, hi, lambda j, c: step(j, c, True), carry)


def dot_precision(dtype, allow_tf32: bool):
  """The `precision` of every kernel dot on `dtype` inputs: exact float32 (HIGHEST, Triton
  `ieee`) unless TF32 is allowed for float32 inputs (DEFAULT, `tf32`); 16-bit inputs: HIGHEST,
  i.e. their native tensor-core dot (Triton ignores the input precision of non-f32 dots)."""
  return lax.Precision.DEFAULT if allow_tf32 and dtype == jnp.float32 else lax.Precision.HIGHEST


def read_row(table_ref, b, r, rows: int):
  """`rows` scalars `table_ref[b, 0..rows-1, r]` (a schedule or segment table column)."""
  return tuple(table_ref[b, k, r] for k in range(rows))
