"""The pure-JAX (XLA) backend of `flash_attention`: tiled online softmax, forward and backward.

Forward (per q tile of `block_q` queries, for all batch rows and heads at once)::

    m, l, acc = -inf, 0, 0                       # running max, denominator, numerator
    for each kv tile j the mask can reach:       # loop bounds from the mask, not a mask
      s   = q_i k_j^T * scale                    # [B, K, G, bq, bk] float32
      s   = mods(s)                              # soft-cap, ALiBi from positions (scores.py)
      s   = where(visible, s, -inf)              # only on PARTIAL tiles; FULL tiles skip it
      m'  = max(m, rowmax(s));  p = exp(s - m')
      l   = l * exp(m - m') + rowsum(p);  acc = acc * exp(m - m') + p v_j;  m = m'
    out_i = acc / l;  lse_i = m + log(l)         # a row with no visible key: out 0, lse -inf

Backward (one pass over kv tiles, recomputing p from the saved lse, `common.tile_grads`; its
tiles are `BlockSizes.block_kv_bwd` keys x `block_q_bwd` queries, independent of the forward's)::

    delta = rowsum(out * dout)
    for each kv tile j: for each q tile i that can see it:
      p = exp(s_ij - lse_i);  dv_j += p^T dout_i;  dp = dout_i v_j^T
      ds = p * (dp - delta_i) * scale * cap'(s);  dk_j += ds^T q_i;  dq_i += ds k_j

(`delta` has the lse cotangent subtracted when the lse is an output: `common.row_delta`.)
A value head dim Hv != H only changes the shapes of v, out, dout and dv.

Memory is O(T + S) in both passes (plus one tile of scores). Tiles the mask hides entirely
are skipped by the loop bounds (causal: half the tiles; window w: O(L * w) work; with
`Mask.sinks` a q tile visits the sink blocks, then its window band: O(L * (w + sinks))) or, for
segment ids, by a per-tile `lax.switch` on the block class (EMPTY / PARTIAL / FULL).
Narrow windows take the banded path instead (`attention/band.py`). GQA: q heads are grouped
`[K, G]` against `K` kv heads; K/V are never repeated. Any lengths work: inputs are padded to
whole tiles internally; `T != S` with `q_offset` gives decode and chunked prefill.
The reference is `attention.reference.reference_attention_with_lse`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from attention import band as band_lib
from attention import masks as masks_lib
from attention.block_sizes import BlockSizes
from attention.common import (backward_lse, finish_softmax, pad_to_multiple, round_block,
                              row_delta, tile_grads, to_varying, varying_axes, with_lse_vjp)
from attention.masks import PARTIAL, Mask
from attention.reference import check_qkv
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods


class _Tiling:
  """Static geometry + per-tile visibility for one call (lengths, tiles, mask)."""

  def __init__(self, mask: Mask, batch: int, q_len: int, kv_len: int, block_q: int, block_kv: int,
               q_seg=None, kv_seg=None, offsets=None, mods: ScoreMods = NO_MODS, kv_heads=1):
    self.mask, self.q_len, self.kv_len, self.mods = mask, q_len, kv_len, mods
    self.slopes = None  # ALiBi: [1, K, G, 1, 1]
    if mods.alibi_slopes is not None:
      self.slopes = mods.alibi_slopes.reshape(1, kv_heads, -1, 1, 1)
    self.bq, self.bk = block_q, block_kv
    self.nq, self.nk = -(-q_len // block_q), -(-kv_len // block_kv)
    self.offsets = offsets  # [B] int32
    self.off_min, self.off_max = jnp.min(offsets), jnp.max(offsets)
    self.q_seg, self.kv_seg = q_seg, kv_seg  # padded with -1, or None
    if q_seg is not None:
      self.q_seg_min, self.q_seg_max = masks_lib.segment_ranges(q_seg, block_q)
      self.kv_seg_min, self.kv_seg_max = masks_lib.segment_ranges(kv_seg, block_kv)
      self.q_seg_full = jnp.all(q_seg.reshape(batch, self.nq, block_q) >= 0, axis=-1)
      self.kv_seg_full = jnp.all(kv_seg.reshape(batch, self.nk, block_kv) >= 0, axis=-1)

  def varying(self, carry, *arrays):
    """`carry` typed as varying over every shard_map axis the mask or `arrays` vary over, so
    the `lax.switch` branches of a tile agree (a no-op outside shard_map)."""
    return to_varying(carry, varying_axes(self.offsets, self.q_seg, self.kv_seg, *arrays))

  def kv_steps(self, i):
    """`(steps, block_of)`: q tile i visits kv blocks `block_of(0 .. steps-1)`: the sink blocks
    before its window band (`masks.sink_blocks`), then the band."""
    q_lo = self.off_min + i * self.bq
    q_hi = self.off_max + i * self.bq + self.bq - 1
    lo, hi = masks_lib.kv_block_range(self.mask, q_lo, q_hi, self.bk, self.nk)
    sinks = masks_lib.sink_blocks(self.mask, lo, self.bk)
    return sinks + hi - lo, lambda step: masks_lib.kv_block_at(step, lo, sinks)

  def q_range(self, j):
    return masks_lib.q_block_range(self.mask, j * self.bk, j * self.bk + self.bk - 1,
                                   self.off_min, self.off_max, self.bq, self.nq)

  def classify(self, i, j):
    """Block class of (q tile i, kv tile j), over the whole batch."""
    kind = masks_lib.classify_positions(
        self.mask, self.off_min + i * self.bq, self.off_max + i * self.bq + self.bq - 1,
        j * self.bk, j * self.bk + self.bk - 1)
    # Tiles holding padded keys need the elementwise mask.
    has_kv_padding = (j + 1) * self.bk > self.kv_len
    kind = jnp.where(has_kv_padding, jnp.minimum(kind, PARTIAL), kind)
    if self.q_seg is not None:
      seg_kind = masks_lib.classify_segments(
          self.q_seg_min[:, i], self.q_seg_max[:, i], self.kv_seg_min[:, j],
          self.kv_seg_max[:, j], self.q_seg_full[:, i], self.kv_seg_full[:, j])
      kind = masks_lib.combine(kind, seg_kind)
    return kind

  def positions(self, i, j):
    """Query positions `[B, bq]` of q tile i and key positions `[bk]` of kv tile j."""
    q_pos = self.offsets[:, None] + i * self.bq + jnp.arange(self.bq, dtype=jnp.int32)[None]
    return q_pos, j * self.bk + jnp.arange(self.bk, dtype=jnp.int32)

  def visible(self, i, j):
    """Elementwise visibility of tile (i, j): `[B, bq, bk]` bool."""
    q_pos, kv_idx = self.positions(i, j)
    q_seg = kv_seg = None
    if self.q_seg is not None:
      q_seg = lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, axis=1)
      kv_seg = lax.dynamic_slice_in_dim(self.kv_seg, j * self.bk, self.bk, axis=1)
    vis = masks_lib.element_mask(self.mask, q_pos, kv_idx[None], q_seg, kv_seg)
    return vis & (kv_idx < self.kv_len)[None, None, :]


def _prepare(q, k, v, mask: Mask, block_q: int, block_kv: int, mods: ScoreMods):
  """Pads and lays out inputs: q `[B, K, G, Tp, H]`, k/v `[B, K, Sp, H | Hv]` plus the tiling."""
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  g = n // kh
  q = pad_to_multiple(q, 1, block_q).reshape(b, -1, kh, g, h).transpose(0, 2, 3, 1, 4)
  k = pad_to_multiple(k, 1, block_kv).transpose(0, 2, 1, 3)
  v = pad_to_multiple(v, 1, block_kv).transpose(0, 2, 1, 3)
  q_seg = kv_seg = None
  if mask.has_segments:
    q_seg = pad_to_multiple(jnp.asarray(mask.q_segment_ids, jnp.int32), 1, block_q, value=-1)
    kv_seg = pad_to_multiple(jnp.asarray(mask.kv_segment_ids, jnp.int32), 1, block_kv, value=-1)
  tiling = _Tiling(mask, b, t, s, block_q, block_kv, q_seg, kv_seg,
                   masks_lib.q_offsets(mask, b), mods, kh)
  return q, k, v, tiling


def _switch_tile(tiling: _Tiling, i, j, update, carry):
  """`update(carry, masked)` on tile (i, j) by its class: EMPTY skips, FULL skips the mask."""
  return lax.switch(tiling.classify(i, j),
                    [lambda c: c, functools.partial(update, masked=True),
                     functools.partial(update, masked=False)], carry)


def _scores(tiling: _Tiling, q_i, k_j, i, j, scale: float, masked: bool):
  """`(s, dcap)`: logits `[B, K, G, bq, bk]` float32 of tile (i, j), soft-capped and ALiBi-biased
  (`attention.scores`), hidden keys -inf when `masked`; `dcap` the cap's derivative or None."""
  s = jnp.einsum("BKGtH,BKsH->BKGts", q_i, k_j, preferred_element_type=jnp.float32) * scale
  dcap = None
  if tiling.mods.active:
    q_pos, kv_pos = tiling.positions(i, j)
    s, dcap = tiling.mods.apply(s, tiling.slopes, q_pos[:, None, None, :, None], kv_pos)
  if masked:
    s = jnp.where(tiling.visible(i, j)[:, None, None], s, -jnp.inf)
  return s, dcap


# --- forward ------------------------------------------------------------------------------------


def flash_forward_xla(q, k, v, mask: Mask, scale: float, block_q: int, block_kv: int, *,
                      mods: ScoreMods = NO_MODS):
  """Returns `out [B, T, N, Hv]` (q.dtype) and `lse [B, N, T]` float32."""
  b, t, _, n, kh, _ = check_qkv(q, k, v, value_dim=True)
  g, hv = n // kh, v.shape[3]
  qp, kp, vp, tiling = _prepare(q, k, v, mask, block_q, block_kv, mods)
  bq, bk = block_q, block_kv

  def q_tile(i):
    q_i = lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=3)  # B K G bq H

    def update(carry, j, masked: bool):
      m, l, acc = carry
      k_j = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=2)  # B K bk H
      v_j = lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=2)
      s, _ = _scores(tiling, q_i, k_j, i, j, scale, masked)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = l * alpha + jnp.sum(p, axis=-1)
      pv = jnp.einsum("BKGts,BKsH->BKGtH", p.astype(v_j.dtype), v_j,
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * alpha[..., None] + pv

    steps, block_of = tiling.kv_steps(i)

    def body(step, carry):
      j = block_of(step)
      return _switch_tile(tiling, i, j, lambda c, masked: update(c, j, masked), carry)

    init = tiling.varying((jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
                           jnp.zeros((b, kh, g, bq), jnp.float32),
                           jnp.zeros((b, kh, g, bq, hv), jnp.float32)), q_i, kp, vp)
    m, l, acc = lax.fori_loop(0, steps, body, init)
    return finish_softmax(m, l, acc, q.dtype)

  out, lse = lax.map(q_tile, jnp.arange(tiling.nq))  # [nq, B, K, G, bq, H], [nq, B, K, G, bq]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tiling.nq * bq, n, hv)[:, :t]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, n, tiling.nq * bq)[..., :t]
  return out, lse


# --- backward -----------------------------------------------------------------------------------


def _backward_rows(out, lse, dout, dlse, kh: int, bq: int):
  """`dout [B, K, G, Tp, Hv]`, `lse` and `delta` (`common.row_delta`) as `[B, K, G, Tp]`."""
  b, _, n, _ = dout.shape

  def to_bkgth(x, pad_value=0):  # [B, T, N, ...] -> [B, K, G, Tp, ...]
    x = pad_to_multiple(x, 1, bq, pad_value)
    x = x.reshape(b, x.shape[1], kh, n // kh, *x.shape[3:])
    return jnp.moveaxis(x, 1, 3)

  delta = row_delta(out, dout, dlse)  # B T N
  lse_p = to_bkgth(jnp.moveaxis(backward_lse(lse), 1, 2), jnp.inf)
  return to_bkgth(dout), lse_p, to_bkgth(delta)


def flash_backward_xla(q, k, v, out, lse, dout, mask: Mask, scale: float, block_q: int,
                       block_kv: int, *, mods: ScoreMods = NO_MODS, dlse=None):
  """Gradients `(dq, dk, dv)` from the saved `lse`, recomputing scores tile by tile."""
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  hv = v.shape[3]
  qp, kp, vp, tiling = _prepare(q, k, v, mask, block_q, block_kv, mods)
  bq, bk = block_q, block_kv
  dout_p, lse_p, delta = _backward_rows(out, lse, dout, dlse, kh, bq)
  q_slice = lambda x, i: lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3)

  def kv_tile(dq, j):
    k_j = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=2)  # B K bk H
    v_j = lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=2)

    def update(carry, i, masked: bool):
      dk, dv, dq = carry
      q_i, do_i, lse_i, delta_i = (q_slice(x, i) for x in (qp, dout_p, lse_p, delta))
      s_ij, dcap = _scores(tiling, q_i, k_j, i, j, scale, masked)
      dq_i, dk_j, dv_j = tile_grads(s_ij, q_i, k_j, v_j, do_i, lse_i, delta_i, scale, dcap)
      dq = lax.dynamic_update_slice_in_dim(dq, q_slice(dq, i) + dq_i, i * bq, axis=3)
      return dk + dk_j, dv + dv_j, dq

    def body(i, carry):
      return _switch_tile(tiling, i, j, lambda c, masked: update(c, i, masked), carry)

    init = tiling.varying((jnp.zeros((b, kh, bk, h), jnp.float32),
                           jnp.zeros((b, kh, bk, hv), jnp.float32)), qp, k_j, v_j, dout_p, lse_p,
                          delta) + (dq,)
    dk, dv, dq = lax.fori_loop(*tiling.q_range(j), body, init)
    return dq, (dk, dv)

  dq0 = tiling.varying(jnp.zeros(qp.shape, jnp.float32), qp, kp, vp, dout_p, lse_p, delta)
  dq, (dk, dv) = lax.scan(kv_tile, dq0, jnp.arange(tiling.nk))  # dk, dv: [nk, B, K, bk, H]
  dq = jnp.moveaxis(dq, 3, 1).reshape(b, -1, n, h)[:, :t].astype(q.dtype)
  dk = dk.transpose(1, 0, 3, 2, 4).reshape(b, tiling.nk * bk, kh, h)[:, :s].astype(k.dtype)
  dv = dv.transpose(1, 0, 3, 2, 4).reshape(b, tiling.nk * bk, kh, hv)[:, :s].astype(v.dtype)
  return dq, dk, dv


# --- entry points with the Pallas backend's signatures --------------------------------------------


def resolve_block_sizes(block_sizes: BlockSizes | None, head_dim: int, mask: Mask) -> BlockSizes:
  """`BlockSizes.default_xla` unless given; Triton-only settings are refused, not ignored."""
  if block_sizes is None:
    return BlockSizes.default_xla(head_dim, window=mask.window)
  if block_sizes.allow_tf32:
    raise ValueError("BlockSizes.allow_tf32 is a Pallas/Triton setting; the XLA path follows "
                     "jax.default_matmul_precision.")
  for name in ("num_warps", "num_stages", "block_q_dq", "block_kv_dq"):
    if getattr(block_sizes, name) is not None:
      raise ValueError(f"BlockSizes.{name} is a Pallas/Triton setting; the XLA path does not "
                       f"use it (got {getattr(block_sizes, name)!r}); leave it None.")
  return block_sizes


def xla_tiles(block_sizes: BlockSizes, q_len: int, kv_len: int,
              backward: bool = False) -> tuple[int, int]:
  """The XLA path's `(q tile, kv tile)` for these lengths: `block_q`/`block_kv` of the
  forward, or with `backward` the `block_q_bwd`/`block_kv_bwd` of the backward. The two passes
  tile independently: the backward re-tiles from the saved per-row lse."""
  bq, bk = ((block_sizes.block_q_bwd, block_sizes.block_kv_bwd) if backward
            else (block_sizes.block_q, block_sizes.block_kv))
  return round_block(bq, q_len), round_block(bk, kv_len)


def forward_blocks(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None,
                   interpret: bool = False, *, mods: ScoreMods = NO_MODS):
  """`(out, lse [B, N, T])` of the tiled path with `BlockSizes` (as `flash_forward_pallas`)."""
  del interpret  # the ring's uniform block signature; the XLA path has nothing to interpret
  block_sizes = resolve_block_sizes(block_sizes, q.shape[3], mask)
  tiles = xla_tiles(block_sizes, q.shape[1], k.shape[1])
  return flash_forward_xla(q, k, v, mask, scale, *tiles, mods=mods)


def backward_blocks(q, k, v, out, lse, dout, mask: Mask, scale: float,
                    block_sizes: BlockSizes | None, interpret: bool = False, *,
                    mods: ScoreMods = NO_MODS, dlse=None):
  """`(dq, dk, dv)` of the tiled path with `BlockSizes` (as `flash_backward_pallas`)."""
  del interpret
  block_sizes = resolve_block_sizes(block_sizes, q.shape[3], mask)
  tiles = xla_tiles(block_sizes, q.shape[1], k.shape[1], backward=True)
  return flash_backward_xla(q, k, v, out, lse, dout, mask, scale, *tiles, mods=mods, dlse=dlse)


def _forward_tiles(forward):
  """`forward(..., *fwd_tiles)` taking `(..., fwd_tiles, bwd_tiles)`: the custom_vjp pair
  shares its static arguments; each pass reads its own tiles."""
  return lambda q, k, v, mask, scale, fwd_tiles, bwd_tiles, **kw: forward(
      q, k, v, mask, scale, *fwd_tiles, **kw)


def _backward_tiles(backward):
  return lambda q, k, v, out, lse, dout, mask, scale, fwd_tiles, bwd_tiles, **kw: backward(
      q, k, v, out, lse, dout, mask, scale, *bwd_tiles, **kw)


# `xla_flash(q, k, v, mask, scale, mods, (bq, bk), (bq_bwd, bk_bwd))`;
# `xla_band(q, k, v, mask, scale, mods, (bq,), (bq_bwd,))`.
xla_flash = with_lse_vjp(_forward_tiles(flash_forward_xla), _backward_tiles(flash_backward_xla))
xla_band = with_lse_vjp(_forward_tiles(band_lib.band_forward),
                        _backward_tiles(band_lib.band_backward))


def attend(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None,
           interpret: bool = False, mods: ScoreMods = NO_MODS):
  """The "xla" entry of `flash.IMPLEMENTATIONS` (inputs validated by the front door):
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both."""
  del interpret  # refused by the front door for "xla"
  block_sizes = resolve_block_sizes(block_sizes, q.shape[3], mask)
  bq, bk = xla_tiles(block_sizes, q.shape[1], k.shape[1])
  bwd = xla_tiles(block_sizes, q.shape[1], k.shape[1], backward=True)
  if band_lib.band_applies(mask, k.shape[1], bq):  # a narrow window: one key band per q tile
    return xla_band(q, k, v, mask, scale, mods, (bq,), bwd[:1])  # backward q tile: block_q_bwd
  return xla_flash(q, k, v, mask, scale, mods, (bq, bk), bwd)
