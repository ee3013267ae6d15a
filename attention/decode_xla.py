"""The XLA decode path of `flash_attention`: a few queries (T <= `DECODE_MAX_Q_LEN`, decode,
speculative decoding, small prefill chunks) against a long KV cache, at the memory bound.

A decode step is bound by reading the cache, and the tiled path (`flash_xla`) reads it badly for
one query: its `[G*T, H] x [H, bk]` scores make XLA write a transposed copy of every key tile
first, and its q tile pads T to 8 rows. Here the cache is read once, in its own layout, with the
keys as the matmul's rows, the key axis cut into chunks of c keys::

    k [B, S, K, H] -> [B, C, c, K*H]     C chunks (a reshape: no copy when c divides S)
    s = k_chunks @ q_bd                  [B, C, c, K*X]: X = G*T rows per kv head, all
                                         q heads of a group together; q_bd [K*H, K*X] is
                                         block-diagonal over the kv heads (K = 1: plain q)
    s = mask(mods(s * scale))            soft-cap, ALiBi, causal/window/segments per row
    m_c = max over chunk c;  M = max_c m_c          the chunks' maxima, merged exactly
    p = exp(s - M);  L = sum p;  o = p^T v          [B, K*X, K*Hv] over every reached key
    out = o / L;  lse = M + log L        (the diagonal kv-head blocks of o kept)

This is flash-decoding's split (per-chunk statistics merged exactly) with the merge taken before
the value matmul: on a CPU the matmuls and fusions over all chunks are each one large operation
(no sequential chunk loop, whose per-chunk copies would cost more than they save), which XLA's
CPU runtime runs on its intra-op thread pool. The GPU kernel (`kernels/decode_pallas.py`) keeps
per-split partials and merges them after (`common.merge_partials`).

Reach: a mask with a bounded window (`Mask.window`, causal or not) reads only the chunks the
window reaches from each batch row's offset (a per-row gather of `n_w` chunks, O(window));
`Mask.sinks` puts the first `ceil(sinks / c)` chunks in front of those (keys the window chunks
also hold are masked there, so none counts twice): O(window + sinks);
without a window every chunk is read (keys past a causal query are computed and masked:
skipping them would need a sequential loop, whose per-chunk copies cost more on CPU than the
masked work at the cache lengths that matter). A cache length that is not a multiple of the
chunk is zero-padded (one copy of the cache).

GQA with K > 1 kv heads: the cache's heads are interleaved per key, so the scores use a
block-diagonal q over the heads (reads the cache in place, K x the FLOPs of both matmuls) while
`K * X <= BLOCK_DIAGONAL_MAX`; wider groups use per-head matmuls (XLA transposes the cache).

Gradients (`jax.grad` reaches this path through `flash_attention`): the forward is this one, the
backward the tiled path's (`flash_xla.flash_backward_xla`, from the saved lse), both through the
shared lse `custom_vjp`; so decode-length calls are differentiable and equal the reference.

Memory: the float32 scores `[B, N * T, S_reach]` (at T = 1, N / (K * (H + Hv)) of a float32
cache's bytes). Cost O(T * N * S_reach * H) compute, one read of the reached cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention import flash_xla
from attention import masks as masks_lib
from attention.block_sizes import BlockSizes
from attention.common import finish_softmax, next_pow2, pad_to_size, with_lse_vjp
from attention.masks import UNBOUNDED, Mask
from attention.reference import check_qkv
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods, modify

DEFAULT_CHUNK = 1024  # keys per chunk (a power of two); `BlockSizes.block_kv` overrides it
MIN_CHUNK = 16
BLOCK_DIAGONAL_MAX = 64  # K * X up to which the block-diagonal scores beat per-head matmuls
SCOPE = "flash_decode_xla"  # the named scope of the forward (visible in lowered programs)
PV_CHUNK = 2048  # keys per value matmul (their partial products are summed; see `_values`)
_ROWS = 128  # the transposed probabilities are written in [.., c // 128, 128] tiles (below)


def chunk_size(block_sizes: BlockSizes | None, kv_len: int, mask: Mask) -> int:
  """Keys per chunk: `block_sizes.block_kv` if given, else `DEFAULT_CHUNK` shrunk towards a
  window's width (not below 128); never above the cache length's next power of two."""
  if block_sizes is not None:
    chunk = block_sizes.block_kv
  else:
    chunk = DEFAULT_CHUNK
    if mask.window is not None:
      chunk = min(chunk, max(128, next_pow2(sum(mask.window) + 1)))
  return max(MIN_CHUNK, min(chunk, next_pow2(kv_len)))


class _Rows:
  """The `X = G * T` query rows of each kv head: row `r` is q head `g = r // T` of the group at
  query `t = r % T`. Per batch row: absolute positions `pos [B, X]`, segment ids `seg [B, X]`."""

  def __init__(self, q, mask: Mask, kv_heads: int):
    b, t, n, _ = q.shape
    self.g, self.t, self.x = n // kv_heads, t, n // kv_heads * t
    t_of_row = jnp.arange(self.x, dtype=jnp.int32) % t
    self.pos = masks_lib.q_offsets(mask, b)[:, None] + t_of_row[None]  # B X
    self.seg = None
    if mask.has_segments:
      self.seg = jnp.asarray(mask.q_segment_ids, jnp.int32)[:, t_of_row]  # B X

  def queries(self, q):
    """`q [B, T, N, H]` -> `[B, K, H, X]` (rows in the order above)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, n // self.g, self.g, h).transpose(0, 2, 4, 3, 1).reshape(
        b, n // self.g, h, self.x)

  def unrows(self, x, b: int):
    """`[B, K, X, ...]` -> `[B, T, N, ...]`."""
    kh, rest = x.shape[1], x.shape[3:]
    x = x.reshape(b, kh, self.g, self.t, *rest)
    return jnp.moveaxis(x, 3, 1).reshape(b, self.t, kh * self.g, *rest)


def _reach_chunks(mask: Mask, t: int, chunk: int, num_chunks: int) -> int | None:
  """Chunks a batch row's window reaches (static), or None when it reaches them all."""
  left, right = mask.bounds
  if left >= UNBOUNDED or right >= UNBOUNDED:
    return None
  width = left + max(right, 0) + t  # keys from (first query - left) to (last query + right)
  reach = -(-width // chunk) + 1  # + 1: the range need not start on a chunk boundary
  return reach if reach < num_chunks else None


def _chunks(k, v, kv_seg, mask: Mask, rows: _Rows, chunk: int):
  """`(k [B, C', c, K, H], v [B, C', c, K, Hv], kv_pos [B, C', c], kv_seg [B, C', c] | None)`:
  the chunks each batch row reaches (all C, or a window's C' from its own first chunk)."""
  b, s = k.shape[:2]
  s_pad = -(-s // chunk) * chunk
  split = lambda x: pad_to_size(x, 1, s_pad).reshape(b, s_pad // chunk, chunk, *x.shape[2:])
  k, v = split(k), split(v)
  kv_seg = None if kv_seg is None else split(pad_to_size(kv_seg, 1, s_pad, -1))
  kv_pos = jnp.arange(s_pad, dtype=jnp.int32).reshape(1, -1, chunk)
  reach = _reach_chunks(mask, rows.t, chunk, s_pad // chunk)
  if reach is None:
    return k, v, jnp.broadcast_to(kv_pos, (b, *kv_pos.shape[1:])), kv_seg
  first = jnp.clip((jnp.min(rows.pos, axis=1) - mask.bounds[0]) // chunk, 0,
                   s_pad // chunk - reach)  # B: each row's first reached chunk
  take = jax.vmap(lambda x, j: lax.dynamic_slice_in_dim(x, j, reach, axis=0))
  kv_pos = jnp.broadcast_to(kv_pos, (b,) + kv_pos.shape[1:])
  seg_all, kv_seg = kv_seg, None if kv_seg is None else take(kv_seg, first)
  k_w, v_w, pos_w = take(k, first), take(v, first), take(kv_pos, first)
  if not mask.sinks:
    return k_w, v_w, pos_w, kv_seg
  # Sinks: the first chunks go in front; keys the window chunks also hold get an out-of-range
  # position (never visible), so no key counts twice.
  ns = -(-mask.sinks // chunk)
  pos_s = kv_pos[:, :ns]
  start, stop = first[:, None, None] * chunk, (first[:, None, None] + reach) * chunk
  pos_s = jnp.where((pos_s < start) | (pos_s >= stop), pos_s, UNBOUNDED)
  cat = lambda a, c: jnp.concatenate([a[:, :ns], c], axis=1)
  return (cat(k, k_w), cat(v, v_w), jnp.concatenate([pos_s, pos_w], axis=1),
          None if kv_seg is None else cat(seg_all, kv_seg))


def _scores(k, q):
  """Raw dots `[B, C, c, K, X]` float32 of chunked keys `[B, C, c, K, H]` with q `[B, K, H, X]`."""
  b, nc, c, kh, h = k.shape
  x = q.shape[-1]
  f32 = jnp.float32
  if kh == 1 or kh * x <= BLOCK_DIAGONAL_MAX:  # keys as rows, read in place
    eye = jnp.eye(kh, dtype=q.dtype)
    q_bd = jnp.einsum("BKHX,KJ->BKHJX", q, eye).reshape(b, kh * h, kh * x)
    s = jnp.einsum("BCcD,BDY->BCcY", k.reshape(b, nc, c, kh * h), q_bd, preferred_element_type=f32)
    return s.reshape(b, nc, c, kh, x)
  return jnp.einsum("BCcKH,BKHX->BCcKX", k, q, preferred_element_type=f32)


def _values(p, v):
  """`o [B, K, X, Hv]` float32 = p^T v over all reached keys, for `p [B, C, c, K, X]` and
  `v [B, C, c, K, Hv]`, as a sum of matmuls over `PV_CHUNK` keys each.

  The probabilities are transposed to `[B, n, K*X, PV_CHUNK]` through `[.., 128]` tiles: a plain
  transpose lets XLA fold it into the matmul as a transposed operand, which its CPU runtime
  then computes in float32 after converting all of v (16-bit caches). The contraction is cut
  into chunks because XLA's CPU runtime computes 16-bit matmuls with contractions of 32K+ keys
  several times slower (CPU time of a decode step at batch 8, 32768 bfloat16 keys: 41 ms whole,
  17-23 ms in chunks of 1024-2048 keys; 2048 was best at 131072 keys too).
  """
  b, nc, c, kh, x = p.shape
  hv, keys = v.shape[-1], nc * c
  cv = min(PV_CHUNK, keys & -keys)  # a power of two dividing the keys
  n, rows = keys // cv, min(cv, _ROWS)
  pt = p.reshape(b, n, cv // rows, rows, kh * x).transpose(0, 1, 4, 2, 3)
  pt = pt.reshape(b, n, kh * x, cv).astype(v.dtype)
  f32 = jnp.float32
  if kh == 1 or kh * x <= BLOCK_DIAGONAL_MAX:
    o = jnp.einsum("BnYc,BncD->BnYD", pt, v.reshape(b, n, cv, kh * hv), preferred_element_type=f32)
    o = jnp.sum(o, axis=1).reshape(b, kh, x, kh, hv)
    return jnp.einsum("BKXJH,KJ->BKXH", o, jnp.eye(kh, dtype=f32))  # each head's own values
  o = jnp.einsum("BnKXc,BncKH->BnKXH", pt.reshape(b, n, kh, x, cv), v.reshape(b, n, cv, kh, hv),
                 preferred_element_type=f32)
  return jnp.sum(o, axis=1)


def decode_forward(q, k, v, mask: Mask, scale: float, chunk: int, *,
                   mods: ScoreMods = NO_MODS):
  """`(out [B, T, N, Hv] in q.dtype, lse [B, N, T] float32)` (module docstring)."""
  with jax.named_scope(SCOPE):
    return _decode_forward(q, k, v, mask, scale, chunk, mods)


def _decode_forward(q, k, v, mask: Mask, scale: float, chunk: int, mods: ScoreMods):
  b, _, s_len, _, kh, _ = check_qkv(q, k, v, value_dim=True)
  rows = _Rows(q, mask, kh)
  kv_seg = jnp.asarray(mask.kv_segment_ids, jnp.int32) if mask.has_segments else None
  kc, vc, kv_pos, kv_seg = _chunks(k, v, kv_seg, mask, rows, chunk)
  s = _scores(kc, rows.queries(q)) * scale  # B C c K X
  q_pos = rows.pos[:, None, None, None, :]  # B 1 1 1 X
  k_pos = kv_pos[..., None, None]  # B C c 1 1
  if mods.active:
    slopes = None
    if mods.alibi_slopes is not None:  # [N] -> [K, X]: row r of kv head k is q head k*G + r//T
      slopes = jnp.repeat(mods.alibi_slopes.reshape(kh, rows.g), rows.t, axis=1)
    s, _ = modify(s, mods.soft_cap, slopes, q_pos, k_pos)
  left, right = mask.bounds
  in_reach = (k_pos - q_pos >= -left) & (k_pos - q_pos <= right)
  sink = masks_lib.sink_visible(mask, q_pos, k_pos)
  visible = (k_pos < s_len) & (in_reach if sink is None else in_reach | sink)
  if kv_seg is not None:
    q_seg = rows.seg[:, None, None, None, :]
    visible &= (q_seg == kv_seg[..., None, None]) & (q_seg >= 0)
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=(1, 2))  # B K X: the chunks' maxima merged (module docstring)
  p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[:, None, None])
  out, lse = finish_softmax(m, jnp.sum(p, axis=(1, 2)), _values(p, vc), q.dtype)
  return rows.unrows(out, b), jnp.swapaxes(rows.unrows(lse, b), 1, 2)


# The forward above, the tiled path's backward (from the saved lse; `bwd_tiles` its tiles).
_decode = with_lse_vjp(
    lambda q, k, v, mask, scale, chunk, bwd_tiles, *, mods: decode_forward(
        q, k, v, mask, scale, chunk, mods=mods),
    lambda q, k, v, out, lse, dout, mask, scale, chunk, bwd_tiles, *, mods, dlse:
    flash_xla.flash_backward_xla(q, k, v, out, lse, dout, mask, scale, *bwd_tiles, mods=mods,
                                 dlse=dlse))


def attend(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None,
           interpret: bool = False, mods: ScoreMods = NO_MODS):
  """The "xla_decode" entry of `flash.IMPLEMENTATIONS` (inputs validated by the front door):
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both. `block_sizes.block_kv` is the
  chunk; the backward uses `block_q_bwd` / `block_kv_bwd` as the tiled path does."""
  del interpret  # refused by the front door for the XLA paths
  resolved = flash_xla.resolve_block_sizes(block_sizes, q.shape[3], mask)
  bwd = flash_xla.xla_tiles(resolved, q.shape[1], k.shape[1], backward=True)
  return _decode(q, k, v, mask, scale, mods, chunk_size(block_sizes, k.shape[1], mask), bwd)
