"""Flash attention: exact softmax attention computed tile by tile, never forming the T x S matrix.

`flash_attention(q, k, v, mask=..., implementation="xla" | "pallas")` computes exactly what
`reference_attention` computes. The XLA path here is pure JAX:

Forward (per q tile of `block_q` queries, for all batch rows and heads at once)::

    m, l, acc = -inf, 0, 0                       # running max, denominator, numerator
    for each kv tile j the mask can reach:       # loop bounds from the mask, not a mask
      s   = q_i k_j^T * scale                    # [B, K, G, bq, bk] float32
      s   = where(visible, s, -inf)              # only on PARTIAL tiles; FULL tiles skip it
      m'  = max(m, rowmax(s));  p = exp(s - m')
      l   = l * exp(m - m') + rowsum(p);  acc = acc * exp(m - m') + p v_j;  m = m'
    out_i = acc / l;  lse_i = m + log(l)         # a row with no visible key: out 0, lse -inf

Backward (`jax.custom_vjp`, one pass over kv tiles, recomputing p from the saved lse)::

    delta = rowsum(out * dout)
    for each kv tile j: for each q tile i that can see it:
      p = exp(s_ij - lse_i);  dv_j += p^T dout_i;  dp = dout_i v_j^T
      ds = p * (dp - delta_i) * scale;  dk_j += ds^T q_i;  dq_i += ds k_j

Memory is O(T + S) in both passes (plus one tile of scores). Tiles the mask hides entirely
are skipped by the loop bounds (causal: half the tiles; window w: O(L * w) work) or, for
segment ids, by a per-tile `lax.switch` on the block class (EMPTY / PARTIAL / FULL).
Narrow windows take the banded path instead (`attention/band.py`): each q tile slices the
exact contiguous band of keys its window reaches and does one masked softmax over it.
GQA: q heads are grouped `[K, G]` against `K` kv heads; K/V are never repeated.
Any lengths work: inputs are padded to whole tiles internally; `T != S` with `q_offset` gives
decode and chunked prefill.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attention import band as band_lib
from attention import masks as masks_lib
from attention.block_sizes import BlockSizes
from attention.masks import EMPTY, FULL, PARTIAL, Mask
from attention.reference import check_qkv, default_scale

IMPLEMENTATIONS = ("xla", "pallas")


# --- shared tile helpers ----------------------------------------------------------------------


def _pad_to(x, axis: int, multiple: int, value=0):
  size = x.shape[axis]
  pad = -size % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _round_block(block: int, length: int) -> int:
  """Shrinks a tile to the next power of two >= length for short sequences (no wasted work)."""
  return min(block, max(8, 1 << max(0, (length - 1)).bit_length()))


class _Tiling:
  """Static geometry + per-tile visibility for one call (lengths, tiles, mask)."""

  def __init__(self, mask: Mask, batch: int, q_len: int, kv_len: int, block_q: int, block_kv: int,
               q_seg=None, kv_seg=None, offsets=None):
    self.mask, self.q_len, self.kv_len = mask, q_len, kv_len
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

  def kv_range(self, i):
    q_lo = self.off_min + i * self.bq
    q_hi = self.off_max + i * self.bq + self.bq - 1
    return masks_lib.kv_block_range(self.mask, q_lo, q_hi, self.bk, self.nk)

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

  def visible(self, i, j):
    """Elementwise visibility of tile (i, j): `[B, bq, bk]` bool."""
    q_pos = self.offsets[:, None] + i * self.bq + jnp.arange(self.bq, dtype=jnp.int32)[None]
    kv_idx = j * self.bk + jnp.arange(self.bk, dtype=jnp.int32)
    q_seg = kv_seg = None
    if self.q_seg is not None:
      q_seg = lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, axis=1)
      kv_seg = lax.dynamic_slice_in_dim(self.kv_seg, j * self.bk, self.bk, axis=1)
    vis = masks_lib.element_mask(self.mask, q_pos, kv_idx[None], q_seg, kv_seg)
    return vis & (kv_idx < self.kv_len)[None, None, :]


def _tiles_loop(lo, hi, body: Callable, carry):
  """`for j in range(lo, hi): carry = body(j, carry)` with traced bounds (a while loop)."""
  return lax.fori_loop(lo, hi, body, carry)


def _prepare(q, k, v, mask: Mask, block_q: int, block_kv: int):
  """Pads and lays out inputs: q `[B, K, G, Tp, H]`, k/v `[B, K, Sp, H]` plus the tiling."""
  b, t, s, n, kh, h = check_qkv(q, k, v)
  g = n // kh
  q = _pad_to(q, 1, block_q).reshape(b, -1, kh, g, h).transpose(0, 2, 3, 1, 4)
  k = _pad_to(k, 1, block_kv).transpose(0, 2, 1, 3)
  v = _pad_to(v, 1, block_kv).transpose(0, 2, 1, 3)
  q_seg = kv_seg = None
  if mask.has_segments:
    q_seg = _pad_to(jnp.asarray(mask.q_segment_ids, jnp.int32), 1, block_q, value=-1)
    kv_seg = _pad_to(jnp.asarray(mask.kv_segment_ids, jnp.int32), 1, block_kv, value=-1)
  tiling = _Tiling(mask, b, t, s, block_q, block_kv, q_seg, kv_seg,
                   masks_lib.q_offsets(mask, b))
  return q, k, v, tiling


# --- XLA forward --------------------------------------------------------------------------------


def flash_forward_xla(q, k, v, mask: Mask, scale: float, block_q: int, block_kv: int):
  """Returns `out [B, T, N, H]` (q.dtype) and `lse [B, N, T]` float32."""
  b, t, _, n, kh, h = check_qkv(q, k, v)
  g = n // kh
  qp, kp, vp, tiling = _prepare(q, k, v, mask, block_q, block_kv)
  bq, bk = block_q, block_kv

  def q_tile(i):
    q_i = lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=3)  # B K G bq H

    def update(j, carry, masked: bool):
      m, l, acc = carry
      k_j = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=2)  # B K bk H
      v_j = lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=2)
      s = jnp.einsum("BKGtH,BKsH->BKGts", q_i, k_j, preferred_element_type=jnp.float32) * scale
      if masked:
        s = jnp.where(tiling.visible(i, j)[:, None, None], s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = l * alpha + jnp.sum(p, axis=-1)
      pv = jnp.einsum("BKGts,BKsH->BKGtH", p.astype(v_j.dtype), v_j,
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * alpha[..., None] + pv

    def body(j, carry):
      return lax.switch(tiling.classify(i, j),
                        [lambda c: c,
                         functools.partial(update, j, masked=True),
                         functools.partial(update, j, masked=False)], carry)

    init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32))
    lo, hi = tiling.kv_range(i)
    m, l, acc = _tiles_loop(lo, hi, body, init)
    has_key = l > 0
    out = acc / jnp.where(has_key, l, 1.0)[..., None]
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse

  out, lse = lax.map(q_tile, jnp.arange(tiling.nq))  # [nq, B, K, G, bq, H], [nq, B, K, G, bq]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tiling.nq * bq, n, h)[:, :t]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, n, tiling.nq * bq)[..., :t]
  return out, lse


# --- XLA backward -------------------------------------------------------------------------------


def flash_backward_xla(q, k, v, out, lse, dout, mask: Mask, scale: float, block_q: int,
                  block_kv: int):
  """Gradients `(dq, dk, dv)` from the saved `lse`, recomputing scores tile by tile."""
  b, t, s, n, kh, h = check_qkv(q, k, v)
  g = n // kh
  qp, kp, vp, tiling = _prepare(q, k, v, mask, block_q, block_kv)
  bq, bk = block_q, block_kv

  def to_bkgth(x, pad_value=0):  # [B, T, N, ...] -> [B, K, G, Tp, ...]
    x = _pad_to(x, 1, bq, pad_value)
    x = x.reshape(b, x.shape[1], kh, g, *x.shape[3:])
    return jnp.moveaxis(x, 1, 3)

  dout_p = to_bkgth(dout)
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # B T N
  delta = to_bkgth(delta)  # B K G Tp
  # Rows with no visible key (lse = -inf) get p = exp(-inf - inf) = 0 everywhere.
  lse_p = to_bkgth(jnp.moveaxis(jnp.where(jnp.isfinite(lse), lse, jnp.inf), 1, 2), jnp.inf)

  def kv_tile(dq, j):
    k_j = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=2)  # B K bk H
    v_j = lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=2)

    def update(i, carry, masked: bool):
      dk, dv, dq = carry
      q_i = lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=3)  # B K G bq H
      do_i = lax.dynamic_slice_in_dim(dout_p, i * bq, bq, axis=3)
      lse_i = lax.dynamic_slice_in_dim(lse_p, i * bq, bq, axis=3)  # B K G bq
      delta_i = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
      s = jnp.einsum("BKGtH,BKsH->BKGts", q_i, k_j, preferred_element_type=jnp.float32) * scale
      if masked:
        s = jnp.where(tiling.visible(i, j)[:, None, None], s, -jnp.inf)
      p = jnp.exp(s - lse_i[..., None])
      dv = dv + jnp.einsum("BKGts,BKGtH->BKsH", p.astype(do_i.dtype), do_i,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("BKGtH,BKsH->BKGts", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None]) * scale
      dk = dk + jnp.einsum("BKGts,BKGtH->BKsH", ds.astype(q_i.dtype), q_i,
                           preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("BKGts,BKsH->BKGtH", ds.astype(k_j.dtype), k_j,
                        preferred_element_type=jnp.float32)
      dq = lax.dynamic_update_slice_in_dim(
          dq, lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=3) + dq_i, i * bq, axis=3)
      return dk, dv, dq

    def body(i, carry):
      return lax.switch(tiling.classify(i, j),
                        [lambda c: c,
                         functools.partial(update, i, masked=True),
                         functools.partial(update, i, masked=False)], carry)

    init = (jnp.zeros((b, kh, bk, h), jnp.float32), jnp.zeros((b, kh, bk, h), jnp.float32), dq)
    lo, hi = tiling.q_range(j)
    dk, dv, dq = _tiles_loop(lo, hi, body, init)
    return dq, (dk, dv)

  dq0 = jnp.zeros(qp.shape, jnp.float32)
  dq, (dk, dv) = lax.scan(kv_tile, dq0, jnp.arange(tiling.nk))  # dk, dv: [nk, B, K, bk, H]
  dq = jnp.moveaxis(dq, 3, 1).reshape(b, -1, n, h)[:, :t].astype(q.dtype)
  dk = dk.transpose(1, 0, 3, 2, 4).reshape(b, tiling.nk * bk, kh, h)[:, :s].astype(k.dtype)
  dv = dv.transpose(1, 0, 3, 2, 4).reshape(b, tiling.nk * bk, kh, h)[:, :s].astype(v.dtype)
  return dq, dk, dv


# --- custom_vjp wiring --------------------------------------------------------------------------


def with_lse_vjp(forward: Callable, backward: Callable) -> Callable:
  """Wraps a blockwise `(forward, backward)` pair into an attention with a `custom_vjp`.

  `forward(q, k, v, mask, scale, *static) -> (out, lse)` and
  `backward(q, k, v, out, lse, dout, mask, scale, *static) -> (dq, dk, dv)`; the residuals are
  the inputs, `out` and the float32 `lse`, so backward memory stays O(T + S). Returns
  `attend(q, k, v, mask, scale, *static) -> out` (`static`: hashable settings such as tiles).
  The mask's array leaves (segment ids, offsets) travel as primal inputs with no cotangent;
  its static structure (causal, window) is a non-differentiable argument.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
  def attend(q, k, v, mask_arrays, offsets, mask_static, scale, static):
    return forward(q, k, v, _rebuild(mask_static, mask_arrays, offsets), scale, *static)[0]

  def attend_fwd(q, k, v, mask_arrays, offsets, mask_static, scale, static):
    mask = _rebuild(mask_static, mask_arrays, offsets)
    out, lse = forward(q, k, v, mask, scale, *static)
    return out, (q, k, v, mask_arrays, offsets, out, lse)

  def attend_bwd(mask_static, scale, static, res, dout):
    q, k, v, mask_arrays, offsets, out, lse = res
    mask = _rebuild(mask_static, mask_arrays, offsets)
    dq, dk, dv = backward(q, k, v, out, lse, dout, mask, scale, *static)
    return dq, dk, dv, None, None

  attend.defvjp(attend_fwd, attend_bwd)

  def call(q, k, v, mask: Mask, scale: float, *static):
    mask_arrays = (mask.q_segment_ids, mask.kv_segment_ids) if mask.has_segments else None
    offsets = masks_lib.q_offsets(mask, q.shape[0])
    return attend(q, k, v, mask_arrays, offsets, (mask.causal, mask.window), scale, static)

  return call


def _rebuild(mask_static, mask_arrays, offsets) -> Mask:
  causal, window = mask_static
  q_seg, kv_seg = mask_arrays if mask_arrays is not None else (None, None)
  return Mask(causal=causal, window=window, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
              q_offset=offsets)


_xla_flash = with_lse_vjp(flash_forward_xla, flash_backward_xla)
_xla_band = with_lse_vjp(band_lib.band_forward, band_lib.band_backward)


def xla_flash_attention(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes):
  """The pure-JAX path of `flash_attention` (inputs already validated)."""
  t, s = q.shape[1], k.shape[1]
  bq, bk = _round_block(block_sizes.block_q, t), _round_block(block_sizes.block_kv, s)
  if band_lib.band_applies(mask, s, bq):  # a narrow window: one exact key band per q tile
    return _xla_band(q, k, v, mask, scale, bq)
  # One tile size for both passes keeps the saved lse layout trivially shared.
  return _xla_flash(q, k, v, mask, scale, bq, bk)


# --- public entry point -------------------------------------------------------------------------


def resolve_implementation(implementation: str | None, interpret: bool) -> str:
  """"xla" or "pallas": None picks Pallas on GPU (or with `interpret`), XLA elsewhere."""
  if implementation is None:
    return "pallas" if interpret or jax.default_backend() == "gpu" else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got "
                     f"{implementation!r}.")
  return implementation


def flash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
  """Exact attention, blockwise; equals `reference_attention(q, k, v, mask=mask, scale=scale)`.

  Args:
    q: `[B, T, N, H]` queries. k, v: `[B, S, K, H]` with `N % K == 0` (GQA/MQA).
    mask: visibility (`attention.Mask`); None = every query sees every key.
    scale: logit scale, default `H ** -0.5`.
    implementation: "xla" (pure JAX, any backend), "pallas" (GPU Triton kernels, or CPU with
      `interpret=True`), or None: Pallas on GPU, XLA elsewhere.
    block_sizes: tile sizes (`BlockSizes`); defaults depend on the implementation.
    interpret: run the Pallas kernels in interpret mode (CPU tests).

  Returns:
    `[B, T, N, H]` in q's dtype. Rows with no visible key are 0.

  Cost: O(T * S_visible * H) compute with S_visible the keys the mask can reach from each q tile
  (S for full, ~S/2 causal, ~w for a window); O(T + S) memory in forward and backward.
  """
  _, _, _, _, _, h = check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  implementation = resolve_implementation(implementation, interpret)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be an attention.BlockSizes, got {block_sizes!r}.")
  if implementation == "xla":
    block_sizes = block_sizes or BlockSizes.default_xla(h, window=mask.window)
    return xla_flash_attention(q, k, v, mask, scale, block_sizes)
  from attention.kernels import flash_pallas  # pylint: disable=g-import-not-at-top
  return flash_pallas.flash_attention_pallas(q, k, v, mask=mask, scale=scale,
                                             block_sizes=block_sizes, interpret=interpret)


def local_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    **options,
) -> Float[Array, "B T N H"]:
  """Sliding-window attention: `flash_attention` with a window. O(T * w) compute and memory.

  `window` is an int `w` (causal masks: the last `w` keys including the query itself; otherwise
  `w // 2` keys each side plus the query) or an explicit `(left, right)`. Combined with any
  window already in `mask` by intersection; None uses the mask's window (one is required).
  Causality and segments come from `mask`.
  """
  check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  if window is None:
    if mask.window is None:
      raise ValueError("local attention needs a window: pass window=w (or (left, right)) or a "
                       "Mask with a window.")
    window = mask.window
  if isinstance(window, int):
    window = masks_lib.local_mask(window, causal=mask.causal).window
  if mask.window is not None:
    window = (min(window[0], mask.window[0]), min(window[1], mask.window[1]))
  mask = Mask(causal=mask.causal, window=tuple(window), q_segment_ids=mask.q_segment_ids,
              kv_segment_ids=mask.kv_segment_ids, q_offset=mask.q_offset)
  return flash_attention(q, k, v, mask=mask, scale=scale, **options)
