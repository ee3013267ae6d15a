"""Pallas (Triton) flash attention forward kernel: online softmax over the visible kv blocks.

One program per (q block, batch row, q head): it keeps its `[bq, H]` queries, the running max
`m`, denominator `l` (float32, `[bq]`) and numerator `acc` (float32, `[bq, H]`) on chip, and
streams the kv blocks its schedule lists (`flash_tiles`), base-2 exponentials throughout::

    for j in the kv blocks this q block can see:        # [lo, hi) from the mask, no more
      s   = q k_j^T * scale * log2(e)                     # [bq, bk] float32 (soft-cap and
                                                          # ALiBi first: tiles.scores2)
      s   = where(visible, s, -inf)                       # edge blocks only (diagonal, window)
      m'  = max(m, rowmax(s));  p = 2^(s - m');  c = 2^(m - m')
      l   = c l + rowsum(p);  acc = c acc + p v_j;  m = m'
    out = acc / l;  lse = (m + log2 l) * ln 2             # natural-log lse, as the XLA path

A row that sees no key keeps `l = 0` and returns `out = 0`, `lse = -inf` (never NaN: the
running max of an all-masked row is replaced by 0 before exponentiating).

GQA/MQA: q head `n` reads kv head `n // G` through the BlockSpec index map; K/V are never
repeated. Inputs arrive padded (sequence to whole tiles, head_dim to a power of two >= 16)
by `flash_pallas`, which also builds the schedule tables.

Cost: O(bq * H) registers per program, O(T * S_visible * H) FLOPs, O(T + S) HBM traffic per
head beyond the inputs. The pure-JAX twin is `attention.flash_xla.flash_forward_xla`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.common import varying_struct
from attention.kernels import flash_tiles as tiles


def _forward_kernel(offsets_ref, schedule_ref, q_ref, k_ref, v_ref, *refs, geom: tiles.Geometry,
                    scale: float, block_q: int, block_kv: int, num_q_blocks: int, precision):
  """Refs: offsets `[B]`, schedule `[B, 4 | 5, nq]`, q `[bq, H]`, k `[Sp, H]`, v `[Sp, Hv]` (one kv
  head), then q_seg `[bq]`, kv_seg `[Sp]` (segments only), slopes `[Np]` (ALiBi only);
  outputs out `[bq, Hv]`, lse `[bq]`."""
  q_seg_ref, kv_seg_ref, slopes_ref, (out_ref, lse_ref) = tiles.split_refs(geom, refs)
  i = num_q_blocks - 1 - pl.program_id(0)  # heaviest (causal) q blocks first: shorter tail
  b = pl.program_id(1)
  bq, bk = block_q, block_kv
  value_dim = v_ref.shape[-1]

  q = q_ref[...]
  q_pos = offsets_ref[b] + i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]  # bq 1
  q_seg = q_seg_ref[...][:, None] if geom.has_segments else None
  slope = tiles.read_slope(slopes_ref, pl.program_id(2))

  def step(j, carry, masked: bool):
    m, l, acc = carry
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k, v = k_ref[kv, :], v_ref[kv, :]
    kv_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    s, _ = tiles.scores2(geom, plgpu.dot(q, k, trans_b=True, precision=precision), scale, slope,
                         q_pos, kv_pos)  # bq bk, float32, base 2
    if masked:
      kv_seg = kv_seg_ref[kv][None, :] if geom.has_segments else None
      s = jnp.where(tiles.visible(geom, q_pos, kv_pos, q_seg, kv_seg), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new  # all-masked rows
    correction = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return m_new, l, acc

  init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, value_dim), jnp.float32))
  m, l, acc = tiles.visit(tiles.read_row(schedule_ref, b, i, geom.schedule_rows), step, init)

  has_key = l > 0.0
  l_safe = jnp.where(has_key, l, 1.0)
  out_ref[...] = (acc * (1.0 / l_safe)[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(has_key, (m + jnp.log2(l_safe)) * tiles.LN2, -jnp.inf)


def forward_call(q, k, v, offsets, schedule, segments, slopes=None, *, geom: tiles.Geometry,
                 scale: float, block_q: int, block_kv: int, num_warps: int, num_stages: int,
                 allow_tf32: bool = False, interpret: bool = False):
  """Runs the forward kernel on padded inputs.

  Args:
    q: `[B, Tp, N, Hp]`, Tp a multiple of `block_q`. k: `[B, Sp, K, Hp]`, v: `[B, Sp, K, Hvp]`,
      Sp a multiple of `block_kv`, `N % K == 0`.
    offsets: `[B]` int32 absolute position of query 0. schedule: `[B, 4, Tp // block_q]`.
    segments: None, or `(q_seg [B, Tp], kv_seg [B, Sp])` (padding = -1).
    slopes: `[Np]` float32 ALiBi slopes (`geom.alibi`) or None.
    allow_tf32: float32 inputs: TF32 tensor-core dots instead of exact (ieee) float32
      (`tiles.dot_precision`); no effect on bf16/f16.

  Returns:
    out `[B, Tp, N, Hvp]` (q.dtype), lse `[B, N, Tp]` float32 (natural log; -inf: no key).
  """
  batch, t_pad, heads, head_dim = q.shape
  value_dim, nq = v.shape[3], t_pad // block_q
  specs = tiles.q_major_specs(q, k, block_q)
  in_specs, inputs = tiles.with_optional(
      [tiles.whole(offsets), tiles.whole(schedule), specs.q(head_dim), specs.kv(head_dim),
       specs.kv(value_dim)], [offsets, schedule, q, k, v], segments, specs.segments, slopes)
  kernel = functools.partial(_forward_kernel, geom=geom, scale=scale, block_q=block_q,
                             block_kv=block_kv, num_q_blocks=nq,
                             precision=tiles.dot_precision(q.dtype, allow_tf32))
  return tiles.launch(
      kernel, inputs, name="flash_fwd", grid=(nq, batch, heads), in_specs=in_specs,
      out_specs=[specs.q(value_dim), specs.row],
      out_shape=[varying_struct((batch, t_pad, heads, value_dim), q.dtype, inputs),
                 varying_struct((batch, heads, t_pad), jnp.float32, inputs)],
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)
