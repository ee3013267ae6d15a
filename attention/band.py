"""Banded XLA path of `flash_attention` for sliding windows: one contiguous key span per q tile.

A window `(left, right)` lets a tile of `bq` queries at positions `[p, p + bq)` see only keys
in `[p - left, p + bq - 1 + right]`: a contiguous band of `span = bq + left + right` keys. The
tiled path (`flash_xla.flash_forward_xla`) covers that band with whole kv tiles, so it visits up to
`bq + 2 * bk` extra keys, classifies every tile and runs an online softmax across them. Here
each q tile slices its exact band once and does a single masked softmax over it::

    for each q tile i (lax.map):                    # start = offset + i * bq - left
      k_i, v_i = K[start : start + span], V[...]    # [B, K, span, H], zero-padded outside [0, S)
      s   = q_i k_i^T * scale, masked elementwise   # [B, K, G, bq, span] float32
      out_i = softmax(s) v_i;  lse_i = logsumexp(s) # a row with no visible key: out 0, lse -inf

Backward (`common.with_lse_vjp`, from the saved lse) is a scan over the same q tiles: `dq_i` is
written once per tile, `dk`/`dv` are accumulated into their band of a `[B, K, S + pad, H]`
carry. Compute is O(T * span * H) = O(T * (w + bq) * H); memory O(T + S) plus one
`bq x span` score tile. For a causal (255, 0) window and bq = 256 a query visits 511 keys for
256 visible (the tiled path: up to 768); the win is mostly fewer, larger ops per tile.

Used by `flash_attention(implementation="xla")` when `band_applies`: the mask has a window
(both sides finite), `q_offset` is one concrete non-negative value (an int or a concrete 0-d
array, as in training; traced or `[B]` offsets, as in decoding, take the tiled path), the
band is shorter than the key sequence, and the mask has no `sinks` (keys outside the band).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention import masks as masks_lib
from attention.common import backward_lse, finish_softmax, pad_to_size, row_delta, tile_grads
from attention.masks import UNBOUNDED, Mask
from attention.reference import check_qkv
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods

_ALIGN = 8  # band lengths are rounded up to this many keys


def band_span(mask: Mask, block_q: int) -> int | None:
  """Keys one q tile must visit, or None when the mask has no finite window."""
  left, right = mask.bounds
  if mask.window is None or max(left, right) >= UNBOUNDED:
    return None
  return -(-(block_q + left + right) // _ALIGN) * _ALIGN


def static_offset(q_offset) -> int | None:
  """`q_offset` as a Python int when it is one concrete value for the whole batch, else None."""
  if isinstance(q_offset, jax.core.Tracer) or np.ndim(q_offset) != 0:
    return None
  return int(q_offset)


def band_applies(mask: Mask, kv_len: int, block_q: int) -> bool:
  """True when the banded path is valid and cheaper than visiting all `kv_len` keys."""
  span = band_span(mask, block_q)
  offset = static_offset(mask.q_offset)
  if mask.sinks:  # the band is one contiguous key span; sinks lie outside it (tiled path)
    return False
  return span is not None and offset is not None and offset >= 0 and span < kv_len


class _Band:
  """Layout and per-tile visibility shared by the banded forward and backward."""

  def __init__(self, q, k, v, mask: Mask, block_q: int, mods: ScoreMods):
    b, t, s, n, kh, _ = check_qkv(q, k, v, value_dim=True)
    self.b, self.t, self.s, self.n, self.kh, self.g = b, t, s, n, kh, n // kh
    self.mask, self.bq, self.mods = mask, block_q, mods
    self.slopes = None  # ALiBi: [1, K, G, 1, 1]
    if mods.alibi_slopes is not None:
      self.slopes = mods.alibi_slopes.reshape(1, kh, self.g, 1, 1)
    self.left = mask.bounds[0]
    self.span = band_span(mask, block_q)
    self.nq = -(-t // block_q)
    # One offset >= 0 for all rows (band_applies); q_offsets broadcasts it to [B].
    self.offset = masks_lib.q_offsets(mask, b)[0]
    # Keys padded so that key position p sits at index p + left and any band fits.
    self.kv_pad = (self.left, self.span)
    self.q_seg = self.kv_seg = None
    if mask.has_segments:
      self.q_seg = self.pad_q(jnp.asarray(mask.q_segment_ids, jnp.int32), -1)
      self.kv_seg = jnp.pad(jnp.asarray(mask.kv_segment_ids, jnp.int32),
                            ((0, 0), self.kv_pad), constant_values=-1)

  def pad_q(self, x, value=0):
    """Pads axis 1 (queries) to whole tiles."""
    return pad_to_size(x, 1, self.nq * self.bq, value)

  def q_tile(self, x, i):
    """Tile i of a padded `[B, Tp, N, ...]` array as `[B, K, G, bq, ...]`.

    Queries stay in the caller's layout: each tile is transposed on the fly (it is read once,
    and a tile fits in cache), which is cheaper than transposing the whole sequence.
    """
    x = lax.dynamic_slice_in_dim(x, i * self.bq, self.bq, axis=1)
    return jnp.moveaxis(x.reshape(self.b, self.bq, self.kh, self.g, *x.shape[3:]), 1, 3)

  def untile(self, x):
    """Per-tile `[nq, B, K, G, bq, ...]` outputs -> `[B, T, N, ...]`."""
    x = jnp.moveaxis(x, 4, 2)  # nq B bq K G ...
    x = jnp.moveaxis(x, 0, 1)  # B nq bq K G ...  (free when B = 1)
    return x.reshape(self.b, self.nq * self.bq, self.n, *x.shape[5:])[:, :self.t]

  def kv_layout(self, x):
    """`[B, S, K, H]` -> `[B, K, S + pads, H]` (zeros outside the sequence).

    Keys are transposed once up front: every key is read by about `span / bq` q tiles.
    """
    return jnp.pad(x, ((0, 0), self.kv_pad, (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  def start(self, i):
    """Index of tile i's first band key in the padded layout (key position start - left)."""
    # offset >= 0 (band_applies), so only tiles past the last key get clamped, and they see
    # nothing: every key of their band is past the sequence.
    return jnp.minimum(self.offset + i * self.bq, self.left + self.s)

  def visible(self, i, start) -> jnp.ndarray:
    """`[B | 1, bq, span]` bool: which band keys each query of tile i sees."""
    # Band key r of query t sits at relative position r - left - t in every tile (clamped
    # tiles see nothing anyway): the window part of the mask is one constant; only the
    # sequence edges and segments vary per tile.
    rel = np.arange(self.span)[None, :] - self.left - np.arange(self.bq)[:, None]
    left, right = self.mask.bounds
    vis = jnp.asarray((rel >= -left) & (rel <= right))[None]
    kv_pos = start - self.left + jnp.arange(self.span, dtype=jnp.int32)
    vis = vis & ((kv_pos >= 0) & (kv_pos < self.s))[None, None]
    if self.q_seg is not None:
      q_seg = lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, axis=1)
      kv_seg = lax.dynamic_slice_in_dim(self.kv_seg, start, self.span, axis=1)
      vis = vis & (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] >= 0)
    return vis

  def scores(self, q_i, k_i, i, start, scale):
    """`(s, dcap)`: masked logits `[B, K, G, bq, span]` float32 (hidden keys at -inf), soft-capped
    and ALiBi-biased (`attention.scores`); `dcap` the cap's derivative or None."""
    s = jnp.einsum("BKGtH,BKsH->BKGts", q_i, k_i, preferred_element_type=jnp.float32) * scale
    dcap = None
    if self.mods.active:
      q_pos = self.offset + i * self.bq + jnp.arange(self.bq, dtype=jnp.int32)
      kv_pos = start - self.left + jnp.arange(self.span, dtype=jnp.int32)
      s, dcap = self.mods.apply(s, self.slopes, q_pos[:, None], kv_pos)
    return jnp.where(self.visible(i, start)[:, None, None], s, -jnp.inf), dcap


def band_forward(q, k, v, mask: Mask, scale: float, block_q: int, *,
                 mods: ScoreMods = NO_MODS):
  """Returns `out [B, T, N, Hv]` (q.dtype) and `lse [B, N, T]` float32."""
  band = _Band(q, k, v, mask, block_q, mods)
  span = band.span
  qp, kp, vp = band.pad_q(q), band.kv_layout(k), band.kv_layout(v)

  def q_tile(i):
    start = band.start(i)
    q_i = band.q_tile(qp, i)  # B K G bq H
    k_i = lax.dynamic_slice_in_dim(kp, start, span, axis=2)  # B K span H
    v_i = lax.dynamic_slice_in_dim(vp, start, span, axis=2)
    s, _ = band.scores(q_i, k_i, i, start, scale)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)  # rows with no visible key
    p = jnp.exp(s - m_safe[..., None])
    acc = jnp.einsum("BKGts,BKsH->BKGtH", p.astype(v_i.dtype), v_i,
                     preferred_element_type=jnp.float32)
    return finish_softmax(m_safe, jnp.sum(p, axis=-1), acc, q.dtype)

  out, lse = lax.map(q_tile, jnp.arange(band.nq))  # [nq, B, K, G, bq, H], [nq, B, K, G, bq]
  return band.untile(out), jnp.moveaxis(band.untile(lse), 1, 2)


def band_backward(q, k, v, out, lse, dout, mask: Mask, scale: float, block_q: int, *,
                  mods: ScoreMods = NO_MODS, dlse=None):
  """Gradients `(dq, dk, dv)` from the saved `lse`, recomputing each tile's band scores."""
  band = _Band(q, k, v, mask, block_q, mods)
  span = band.span
  qp, kp, vp = band.pad_q(q), band.kv_layout(k), band.kv_layout(v)
  dout_p = band.pad_q(dout)
  delta = band.pad_q(row_delta(out, dout, dlse))
  # Rows with no visible key (lse = -inf) get p = exp(-inf - inf) = 0 everywhere.
  lse_p = band.pad_q(jnp.moveaxis(backward_lse(lse), 1, 2), jnp.inf)

  def q_tile(carry, i):
    dk, dv = carry
    start = band.start(i)
    q_i, do_i, lse_i, delta_i = (band.q_tile(x, i) for x in (qp, dout_p, lse_p, delta))
    k_i = lax.dynamic_slice_in_dim(kp, start, span, axis=2)  # B K span H
    v_i = lax.dynamic_slice_in_dim(vp, start, span, axis=2)
    s, dcap = band.scores(q_i, k_i, i, start, scale)
    dq_i, dk_i, dv_i = tile_grads(s, q_i, k_i, v_i, do_i, lse_i, delta_i, scale, dcap)
    add = lambda acc, x: lax.dynamic_update_slice_in_dim(
        acc, lax.dynamic_slice_in_dim(acc, start, span, axis=2) + x, start, axis=2)
    return (add(dk, dk_i), add(dv, dv_i)), dq_i

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  (dk, dv), dq = lax.scan(q_tile, (zeros(kp), zeros(vp)), jnp.arange(band.nq))
  unpad = lambda x, like: x[:, :, band.left:band.left + band.s].transpose(0, 2, 1, 3).astype(
      like.dtype)
  return band.untile(dq).astype(q.dtype), unpad(dk, k), unpad(dv, v)
