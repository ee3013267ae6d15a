"""Flash-decoding on Pallas GPU (Triton): the "pallas_decode" entry of `flash.IMPLEMENTATIONS`.

A decode step (T <= 16 queries against a long cache) has too few query rows to fill a GPU with
one program per q block, and is bound by reading the cache. So the key axis is split
(FlashDecoding, Dao et al. 2023): one program per (batch row, kv head, key split), each reading
its share of the keys once, then an exact merge of the per-split partials::

    program (b, h, p):  rows = the G q heads of kv head h x the T queries, [Xp, H] (X = G*T,
                        zero rows up to Xp = max(16, next pow2): a tensor-core tile)
      for each key tile j of split p within the rows' reach:      # window/causal bounds
        s   = q k_j^T * scale * log2(e)   (soft-cap, ALiBi: tiles.scores2), masked per row
        m'  = max(m, rowmax s);  p = 2^(s - m');  l = l 2^(m - m') + rowsum p
        acc = acc 2^(m - m') + p v_j
      write (acc [Xp, Hv], m, l)                                   # partials, float32
    merge (XLA, `common.merge_partials`): M = max_p m_p;  out = sum_p acc_p e^(m_p - M) /
                                          sum_p l_p e^(m_p - M);  lse = M + log L

The reach of the rows (`[offset - left, offset + T - 1 + right]`, clipped to the cache) is
computed in the kernel from the row's offset and split evenly over the `P` programs, so a window
over a long cache reads only the window's tiles and still uses every program. With `Mask.sinks`
the sink tiles before the window join the split (steps `[0, ns)` are tiles `[0, ns)`, then the
window's). `P` is chosen so
that `B * K * P >= TARGET_PROGRAMS` (two waves of an H100's 132 SMs), at most one per tile.

Rows of a group share the kv head's keys, so K/V bytes are read once per kv head (GQA/MQA), not
once per q head. Gradients: the tiled kernels' backward (`flash_pallas.flash_backward_pallas`,
from the saved lse) through the shared lse custom_vjp. Row `r` of a program is q head
`h * G + r // T` at query `r % T`. The XLA twin is `attention.decode_xla`; the reference
`attention.reference_attention`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import masks as masks_lib
from attention.block_sizes import MIN_PALLAS_BLOCK, BlockSizes, padded_head_dim
from attention.common import merge_partials, next_pow2, pad_to_size, varying_struct, with_lse_vjp
from attention.kernels import flash_pallas
from attention.kernels import flash_tiles as tiles
from attention.masks import UNBOUNDED, Mask
from attention.reference import SUPPORTED_DTYPES, check_qkv
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods

TARGET_PROGRAMS = 264  # programs per call the split count aims for (2 x 132 SMs)


def padded_rows(rows: int) -> int:
  """Rows of a program's q tile: `max(16, next power of two >= rows)` (tl.dot needs >= 16)."""
  return max(MIN_PALLAS_BLOCK, next_pow2(rows))


def num_splits(batch: int, kv_heads: int, num_tiles: int) -> int:
  """Key splits per (batch row, kv head): enough programs for the GPU, at most one per tile."""
  return max(1, min(num_tiles, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def _reach(geom: tiles.Geometry, offset, q_len: int, block_kv: int, num_tiles: int):
  """`(lo, hi, ns)`: the rows at positions `offset .. offset + q_len - 1` see tiles `[lo, hi)`
  through their window and, with sinks, the sink tiles `[0, ns)` before it (`ns <= lo`)."""
  first = jnp.maximum(offset - geom.left, 0) if geom.left < UNBOUNDED else 0
  last = offset + q_len - 1 + geom.right if geom.right < UNBOUNDED else num_tiles * block_kv - 1
  lo = jnp.clip(first // block_kv, 0, num_tiles)
  hi = jnp.clip(last // block_kv + 1, lo, num_tiles)
  if not geom.sinks:
    return lo, hi, 0
  sink_tiles = min(tiles.cdiv(geom.sinks, block_kv), num_tiles)
  if not geom.causal:  # sinks right of the window: widen it
    hi = jnp.maximum(hi, sink_tiles)
  return lo, hi, jnp.minimum(sink_tiles, lo)


def _decode_kernel(offsets_ref, q_ref, k_ref, v_ref, *refs, geom: tiles.Geometry, scale: float,
                   q_len: int, block_kv: int, num_tiles: int, splits: int, precision):
  """Refs: offsets `[B]`, q `[Xp, H]` (rows of one kv head), k `[Sp, H]`, v `[Sp, Hv]`; then
  q_seg `[Xp]`, kv_seg `[Sp]` (segments only), slopes `[Xp]` (ALiBi only); outputs acc
  `[Xp, Hv]`, m `[Xp]` (natural log), l `[Xp]` of this program's split."""
  q_seg_ref, kv_seg_ref, slopes_ref, (acc_ref, m_ref, l_ref) = tiles.split_refs(geom, refs)
  b, p = pl.program_id(0), pl.program_id(2)
  rows, bk = q_ref.shape[0], block_kv
  offset = offsets_ref[b]
  q = q_ref[...]
  q_pos = offset + jnp.arange(rows, dtype=jnp.int32)[:, None] % q_len  # Xp 1
  q_seg = q_seg_ref[...][:, None] if geom.has_segments else None
  slope = slopes_ref[...][:, None] if geom.alibi else None
  lo, hi, ns = _reach(geom, offset, q_len, bk, num_tiles)
  total = ns + hi - lo  # steps over the sink tiles, then the window's (masks.kv_block_at)
  per = (total + splits - 1) // splits
  start = jnp.minimum(p * per, total)

  def step(i, carry):
    j = masks_lib.kv_block_at(i, lo, ns)
    m, l, acc = carry
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k, v = k_ref[kv, :], v_ref[kv, :]
    kv_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    s, _ = tiles.scores2(geom, plgpu.dot(q, k, trans_b=True, precision=precision), scale, slope,
                         q_pos, kv_pos)  # Xp bk, float32, base 2
    kv_seg = kv_seg_ref[kv][None, :] if geom.has_segments else None
    s = jnp.where(tiles.visible(geom, q_pos, kv_pos, q_seg, kv_seg), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    correction = jnp.exp2(m - m_use)
    prob = jnp.exp2(s - m_use[:, None])
    l = l * correction + jnp.sum(prob, axis=1)
    acc = acc * correction[:, None] + plgpu.dot(prob.astype(v.dtype), v, precision=precision)
    return m_new, l, acc

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, v_ref.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(start, jnp.minimum(start + per, total), step, init)
  acc_ref[...] = acc
  m_ref[...] = m * tiles.LN2  # base 2 -> natural log
  l_ref[...] = l


def decode_call(qx, k, v, offsets, segments, slopes, *, geom: tiles.Geometry, scale: float,
                q_len: int, block_kv: int, splits: int, num_warps: int, num_stages: int,
                allow_tf32: bool = False, interpret: bool = False):
  """Runs the split-K kernel on padded inputs.

  Args:
    qx: `[B, K, Xp, Hp]` rows per kv head. k: `[B, Sp, K, Hp]`, v: `[B, Sp, K, Hvp]`, Sp a
      multiple of `block_kv`. offsets: `[B]` int32 position of query 0.
    segments: None or `(q_seg [B, Xp], kv_seg [B, Sp])` (padding -1). slopes: None or
      `[K, Xp]` float32 per row.

  Returns:
    Partials `acc [B, K, P, Xp, Hvp]`, `m`, `l` `[B, K, P, Xp]` float32 (`m` natural log).
  """
  batch, kv_heads, rows, head_dim = qx.shape
  s_pad, value_dim = k.shape[1], v.shape[3]
  tile = lambda *shape: pl.BlockSpec((None, None, *shape), lambda b, h, p: (b, h) + (0,) * len(
      shape))
  kv = lambda d: pl.BlockSpec((None, s_pad, None, d), lambda b, h, p: (b, 0, h, 0))
  per_batch = lambda n: pl.BlockSpec((None, n), lambda b, h, p: (b, 0))
  in_specs, inputs = [tiles.whole(offsets), tile(rows, head_dim), kv(head_dim), kv(value_dim)], [
      offsets, qx, k, v]
  if segments is not None:
    in_specs, inputs = in_specs + [per_batch(rows), per_batch(s_pad)], inputs + list(segments)
  if slopes is not None:
    in_specs.append(pl.BlockSpec((None, rows), lambda b, h, p: (h, 0)))
    inputs.append(slopes)
  part = lambda *shape: pl.BlockSpec((None, None, None, *shape),
                                     lambda b, h, p: (b, h, p) + (0,) * len(shape))
  lead = (batch, kv_heads, splits)
  kernel = functools.partial(_decode_kernel, geom=geom, scale=scale, q_len=q_len,
                             block_kv=block_kv, num_tiles=s_pad // block_kv, splits=splits,
                             precision=tiles.dot_precision(qx.dtype, allow_tf32))
  return tiles.launch(
      kernel, inputs, name="flash_decode", grid=lead, in_specs=in_specs,
      out_specs=[part(rows, value_dim), part(rows), part(rows)],
      out_shape=[varying_struct((*lead, rows, value_dim), jnp.float32, inputs),
                 varying_struct((*lead, rows), jnp.float32, inputs),
                 varying_struct((*lead, rows), jnp.float32, inputs)],
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def decode_forward_pallas(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None,
                          interpret: bool = False, *, mods: ScoreMods = NO_MODS):
  """`(out [B, T, N, Hv] in q.dtype, lse [B, N, T] float32)`: split-K kernel, then the merge."""
  block_sizes = flash_pallas.resolve_block_sizes(block_sizes, max(q.shape[3], v.shape[3]),
                                                 q.dtype)
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  g, hv = n // kh, v.shape[3]
  x = g * t
  rows, hp, hvp = padded_rows(x), padded_head_dim(h), padded_head_dim(hv)
  bk = min(block_sizes.block_kv, max(MIN_PALLAS_BLOCK, next_pow2(s)))
  s_pad = -(-s // bk) * bk
  # q [B, T, N, H] -> rows [B, K, X, H] (row r = g * T + t) -> [B, K, Xp, Hp]
  qx = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, x, h)
  qx = pad_to_size(pad_to_size(qx, 2, rows), 3, hp)
  kp = pad_to_size(pad_to_size(k, 1, s_pad), 3, hp)
  vp = pad_to_size(pad_to_size(v, 1, s_pad), 3, hvp)
  t_of_row = jnp.arange(rows, dtype=jnp.int32) % t
  segments = None
  if mask.has_segments:
    q_seg = jnp.asarray(mask.q_segment_ids, jnp.int32)[:, t_of_row]
    q_seg = jnp.where(jnp.arange(rows) < x, q_seg, -1)  # padded rows see nothing
    segments = (q_seg, pad_to_size(jnp.asarray(mask.kv_segment_ids, jnp.int32), 1, s_pad, -1))
  slopes = None
  if mods.alibi_slopes is not None:
    slopes = pad_to_size(jnp.repeat(mods.alibi_slopes.reshape(kh, g), t, axis=1), 1, rows)
  stages = block_sizes.pallas_launch("fwd", h, q.dtype)[1]  # 4 warps: the resident tile is small
  acc, m, l = decode_call(
      qx, kp, vp, masks_lib.q_offsets(mask, b), segments, slopes,
      geom=tiles.Geometry.of(mask, s, mods), scale=scale, q_len=t, block_kv=bk,
      splits=num_splits(b, kh, s_pad // bk), num_warps=block_sizes.num_warps or 4,
      num_stages=stages, allow_tf32=block_sizes.allow_tf32, interpret=interpret)
  out, lse = merge_partials(m, l, acc, axis=2, dtype=q.dtype)  # B K Xp Hvp, B K Xp
  out = out[:, :, :x, :hv].reshape(b, kh, g, t, hv)
  lse = lse[:, :, :x].reshape(b, kh, g, t)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv), lse.reshape(b, n, t)


_pallas_decode = with_lse_vjp(decode_forward_pallas, flash_pallas.flash_backward_pallas)


def attend(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None,
           interpret: bool = False, mods: ScoreMods = NO_MODS):
  """The "pallas_decode" entry of `flash.IMPLEMENTATIONS` (inputs validated by the front door):
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both (backward: the tiled kernels).
  `block_sizes.block_kv` is the key tile of the inner loop; the backward's tiles as the tiled
  kernels'. ValueError (before tracing) for unsupported dtypes or tiles."""
  if not q.dtype == k.dtype == v.dtype or q.dtype not in map(jnp.dtype, SUPPORTED_DTYPES):
    raise ValueError(f"Pallas flash decoding needs q, k, v of one dtype among float32, bfloat16, "
                     f"float16; got {q.dtype}, {k.dtype}, {v.dtype}.")
  block_sizes = flash_pallas.resolve_block_sizes(block_sizes, max(q.shape[3], v.shape[3]),
                                                 q.dtype)
  return _pallas_decode(q, k, v, mask, scale, mods, block_sizes, bool(interpret))
