"""Pallas (Triton) flash attention backward kernels: dK/dV and dQ, recomputing p from the lse.

With `s = q k^T * scale`, `p = exp(s - lse)` (the forward's saved log-sum-exp) and the
preprocessed `delta = rowsum(out * dout) - dlse` (`common.row_delta`, one fused XLA reduction;
`dlse` the lse's cotangent when the lse is an output; `cap'` the soft-cap's derivative)::

    dv = p^T dout          dp = dout v^T          ds = p * (dp - delta) * cap'(s)
    dk = scale * ds^T q    dq = scale * ds k

Two kernels, so that each output tile is owned by one program (no atomics):

* dK/dV: one program per (kv block, batch row, kv head). It keeps its keys/values and the two
  float32 accumulators on chip and loops over the G q heads of its group (GQA: the group's
  gradients are summed in registers, K/V never repeated) and, per head, over the q blocks
  that can see this kv block: `[lo, hi)` of the kv-major schedule (`flash_tiles`). Scores are
  computed transposed (`[bk, bq]`), so no tile is transposed in registers.
* dQ: one program per (q block, batch row, q head), looping over the visible kv blocks
  exactly like the forward kernel (q-major schedule).

Both skip every tile the mask hides and evaluate the mask only on edge tiles, so a window of
w costs O(L * w) here too. Rows with no visible key arrive with `lse = +inf` (p = 0).
Padded query rows have `dout = 0` and contribute nothing. Pure-JAX twin:
`attention.flash_xla.flash_backward_xla`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.common import varying_struct
from attention.kernels import flash_tiles as tiles


# --- dK / dV ------------------------------------------------------------------------------------


def _dkdv_kernel(offsets_ref, schedule_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref,
                 *refs, geom: tiles.Geometry, scale: float, block_q: int, block_kv: int,
                 group: int, precision):
  """Refs: offsets `[B]`, schedule `[B, 4, nk]`, q `[Tp, G, H]`, dout `[Tp, G, Hv]` (the group's
  q heads), k `[bk, H]`, v `[bk, Hv]`, lse/delta `[G, Tp]` (lse in log2 units), then q_seg
  `[Tp]`, kv_seg `[bk]` (segments only), slopes `[Np]` (ALiBi only); outputs dk `[bk, H]`,
  dv `[bk, Hv]`."""
  q_seg_ref, kv_seg_ref, slopes_ref, (dk_ref, dv_ref) = tiles.split_refs(geom, refs)
  j, b = pl.program_id(0), pl.program_id(1)
  bq, bk = block_q, block_kv

  k, v = k_ref[...], v_ref[...]
  kv_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[:, None]  # bk 1
  offset = offsets_ref[b]
  kv_seg = kv_seg_ref[...][:, None] if geom.has_segments else None
  schedule = tiles.read_row(schedule_ref, b, j, 4)
  first_head = pl.program_id(2) * group  # q heads of this kv head: first_head + g

  def head(g, carry):
    slope = tiles.read_slope(slopes_ref, first_head + g)

    def step(i, carry, masked: bool):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
      q, dout = q_ref[rows, g, :], dout_ref[rows, g, :]  # bq H, bq Hv
      lse, delta = lse_ref[g, rows], delta_ref[g, rows]  # bq
      q_pos = offset + i * bq + jnp.arange(bq, dtype=jnp.int32)[None, :]
      s_t, dcap = tiles.scores2(geom, plgpu.dot(k, q, trans_b=True, precision=precision), scale,
                                slope, q_pos, kv_pos)  # bk bq
      p_t = jnp.exp2(s_t - lse[None, :])
      if masked:
        q_seg = q_seg_ref[rows][None, :] if geom.has_segments else None
        p_t = jnp.where(tiles.visible(geom, q_pos, kv_pos, q_seg, kv_seg), p_t, 0.0)
      dv = dv + plgpu.dot(p_t.astype(dout.dtype), dout, precision=precision)
      dp_t = plgpu.dot(v, dout, trans_b=True, precision=precision)  # bk bq
      ds_t = p_t * (dp_t - delta[None, :])
      if dcap is not None:
        ds_t = ds_t * dcap
      dk = dk + plgpu.dot(ds_t.astype(q.dtype), q, precision=precision)
      return dk, dv

    return tiles.visit(schedule, step, carry)

  zeros = lambda ref: jnp.zeros(ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros(k_ref), zeros(v_ref)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def dkdv_call(q, k, v, dout, lse2, delta, offsets, schedule, segments, slopes=None, *,
              geom: tiles.Geometry, scale: float, block_q: int, block_kv: int, num_warps: int,
              num_stages: int, allow_tf32: bool = False, interpret: bool = False):
  """dK `[B, Sp, K, Hp]`, dV `[B, Sp, K, Hvp]` from padded q `[B, Tp, N, Hp]`, dout
  `[B, Tp, N, Hvp]`, k `[B, Sp, K, Hp]`, v `[B, Sp, K, Hvp]`, lse2 (log2 units, +inf for rows
  without keys) and delta `[B, N, Tp]` float32; slopes `[Np]` (ALiBi) or None."""
  batch, t_pad, heads, head_dim = q.shape
  s_pad, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
  group = heads // kv_heads
  nk = s_pad // block_kv
  # Free reshapes: the G q heads of kv head kh are contiguous.
  q, dout = (x.reshape(batch, t_pad, kv_heads, group, x.shape[-1]) for x in (q, dout))
  lse2, delta = (x.reshape(batch, kv_heads, group, t_pad) for x in (lse2, delta))

  group_spec = lambda d: pl.BlockSpec((None, t_pad, None, group, d),
                                      lambda j, b, h: (b, 0, h, 0, 0))
  kv_spec = lambda d: pl.BlockSpec((None, block_kv, None, d), lambda j, b, h: (b, j, h, 0))
  row_spec = pl.BlockSpec((None, None, group, t_pad), lambda j, b, h: (b, h, 0, 0))
  segment_specs = (pl.BlockSpec((None, t_pad), lambda j, b, h: (b, 0)),
                   pl.BlockSpec((None, block_kv), lambda j, b, h: (b, j)))
  in_specs, inputs = tiles.with_optional(
      [tiles.whole(offsets), tiles.whole(schedule), group_spec(head_dim), kv_spec(head_dim),
       kv_spec(value_dim), group_spec(value_dim), row_spec, row_spec],
      [offsets, schedule, q, k, v, dout, lse2, delta], segments, segment_specs, slopes)

  kernel = functools.partial(_dkdv_kernel, geom=geom, scale=scale, block_q=block_q,
                             block_kv=block_kv, group=group,
                             precision=tiles.dot_precision(q.dtype, allow_tf32))
  return tiles.launch(
      kernel, inputs, name="flash_dkdv", grid=(nk, batch, kv_heads), in_specs=in_specs,
      out_specs=[kv_spec(head_dim), kv_spec(value_dim)],
      out_shape=[varying_struct(k.shape, k.dtype, inputs),
                 varying_struct(v.shape, v.dtype, inputs)],
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)


# --- dQ -----------------------------------------------------------------------------------------


def _dq_kernel(offsets_ref, schedule_ref, q_ref, k_ref, v_ref, dout_ref, lse_ref, delta_ref,
               *refs, geom: tiles.Geometry, scale: float, block_q: int, block_kv: int,
               num_q_blocks: int, precision):
  """Refs: offsets, schedule `[B, 4 | 5, nq]`, q `[bq, H]`, dout `[bq, Hv]`, k `[Sp, H]`, v
  `[Sp, Hv]`, lse/delta `[bq]`, then q_seg `[bq]`, kv_seg `[Sp]` (segments only), slopes `[Np]`
  (ALiBi only); output dq `[bq, H]`."""
  q_seg_ref, kv_seg_ref, slopes_ref, (dq_ref,) = tiles.split_refs(geom, refs)
  i = num_q_blocks - 1 - pl.program_id(0)
  b = pl.program_id(1)
  bq, bk = block_q, block_kv

  q, dout = q_ref[...], dout_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # bq 1
  q_pos = offsets_ref[b] + i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
  q_seg = q_seg_ref[...][:, None] if geom.has_segments else None
  slope = tiles.read_slope(slopes_ref, pl.program_id(2))

  def step(j, dq, masked: bool):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k, v = k_ref[kv, :], v_ref[kv, :]
    kv_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    s, dcap = tiles.scores2(geom, plgpu.dot(q, k, trans_b=True, precision=precision), scale,
                            slope, q_pos, kv_pos)
    p = jnp.exp2(s - lse)  # bq bk
    if masked:
      kv_seg = kv_seg_ref[kv][None, :] if geom.has_segments else None
      p = jnp.where(tiles.visible(geom, q_pos, kv_pos, q_seg, kv_seg), p, 0.0)
    ds = p * (plgpu.dot(dout, v, trans_b=True, precision=precision) - delta)
    if dcap is not None:
      ds = ds * dcap
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

  dq = tiles.visit(tiles.read_row(schedule_ref, b, i, geom.schedule_rows), step,
                   jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def dq_call(q, k, v, dout, lse2, delta, offsets, schedule, segments, slopes=None, *,
            geom: tiles.Geometry, scale: float, block_q: int, block_kv: int, num_warps: int,
            num_stages: int, allow_tf32: bool = False, interpret: bool = False):
  """dQ `[B, Tp, N, Hp]` (q.dtype); arguments as `dkdv_call` with a q-major schedule."""
  batch, t_pad, heads, head_dim = q.shape
  value_dim, nq = v.shape[3], t_pad // block_q
  specs = tiles.q_major_specs(q, k, block_q)
  in_specs, inputs = tiles.with_optional(
      [tiles.whole(offsets), tiles.whole(schedule), specs.q(head_dim), specs.kv(head_dim),
       specs.kv(value_dim), specs.q(value_dim), specs.row, specs.row],
      [offsets, schedule, q, k, v, dout, lse2, delta], segments, specs.segments, slopes)
  kernel = functools.partial(_dq_kernel, geom=geom, scale=scale, block_q=block_q,
                             block_kv=block_kv, num_q_blocks=nq,
                             precision=tiles.dot_precision(q.dtype, allow_tf32))
  return tiles.launch(
      kernel, inputs, name="flash_dq", grid=(nq, batch, heads), in_specs=in_specs,
      out_specs=specs.q(head_dim), out_shape=varying_struct(q.shape, q.dtype, inputs),
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)
