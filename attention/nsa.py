"""NSA's parameter-free pieces (Native Sparse Attention, Yuan et al. 2025, DeepSeek).

NSA mixes three branches under learned gates (the layer, with the learned compression and
gates, is `models/nsa.py`). For the query at absolute position p:

* compressed: blocks of `block_len` (l) keys taken every `stride` (d) keys, block c =
  keys `[c d, c d + l)`, each compressed to one key / value by a learned map (the model's);
  the query attends to the compressed blocks that end at or before it (`c d + l - 1 <= p`),
  like ordinary keys: `p_cmp = softmax(q . k_cmp * scale)`.
* selection: keys cut into blocks of `select_block` (l'); block j's importance is the
  compressed attention on the compressed blocks overlapping it, summed over the query heads of
  a GQA group (the group shares one selection, as in the paper, eqs. 9-10):

      p_slc[j] = sum_{g in group} sum_{m < l'/d} sum_{n < l/d} p_cmp_g[(l'/d) j + m - n]

  (compressed block c overlaps block j over `overlap(c, j)` keys and enters with weight
  `overlap / d`: `selection_weights`). The `top_n` causally visible blocks by `p_slc` are
  selected, the first `initial_blocks` blocks and the `local_blocks` blocks ending with the
  query's own always among them; the query then attends to their keys exactly
  (`block_sparse_attention`, causal inside its own block).
* sliding window: the last `window` keys (flash attention with a window).

Requires l % d == 0 and l' % d == 0 (the paper's assumption). Segment ids (packed documents):
a compressed block is visible only if all its keys carry the query's segment; the selection
and window branches apply the mask elementwise. Ties in the top-n go to the lower block id.

Cost per query: compressed O(S / d * N * H), selection O(top_n * l' * N * H) + the block
scores O(S / d * S / l') per kv head (`selection_weights` is a dense `[C, J]` matrix),
window O(window * N * H). Memory: queries in chunks of `block_q`, each recomputed in the
backward pass (`jax.checkpoint`): O(block_q * S / d * N) at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int, Shaped

from attention import masks as masks_lib
from attention.common import pad_to_multiple
from attention.masks import Mask
from attention.reference import default_scale

BLOCK_Q = 256  # queries per chunk of the compressed branch


def check_geometry(block_len, stride, select_block) -> tuple[int, int, int]:
  """`(l, d, l')` as ints, or a ValueError: positive, l and l' multiples of d."""
  values = (block_len, stride, select_block)
  if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in values) or (
      block_len % stride or select_block % stride):
    raise ValueError(f"NSA needs positive ints block_len (l), stride (d), select_block (l') "
                     f"with l % d == 0 and l' % d == 0, got l={block_len!r}, d={stride!r}, "
                     f"l'={select_block!r}.")
  return int(block_len), int(stride), int(select_block)


def num_compressed(kv_len: int, block_len: int, stride: int) -> int:
  """Compressed blocks over `kv_len` keys: `(S - l) // d + 1` (at least 1: a block past the
  end is padding, never visible)."""
  return max((kv_len - block_len) // stride + 1, 1)


def compression_windows(x: Shaped[Array, "B S K H"], block_len: int, stride: int
                        ) -> Shaped[Array, "B C l K H"]:
  """The keys (or values) of every compressed block, `[B, C, l, K, H]`; zero-padded past S."""
  s = x.shape[1]
  c = num_compressed(s, block_len, stride)
  x = jnp.pad(x, ((0, 0), (0, max(block_len - s, 0)), (0, 0), (0, 0)))
  at = jnp.arange(c)[:, None] * stride + jnp.arange(block_len)[None]  # C l
  return x[:, at]


def selection_weights(num_cmp: int, num_sel: int, block_len: int, stride: int,
                      select_block: int) -> np.ndarray:
  """`[C, J]` float32: `overlap(compressed block c, selection block j) / d` (module docstring),
  so `p_slc = p_cmp @ W` is the paper's double sum."""
  c = np.arange(num_cmp)[:, None] * stride
  j = np.arange(num_sel)[None, :] * select_block
  overlap = np.minimum(c + block_len, j + select_block) - np.maximum(c, j)
  return (np.maximum(overlap, 0) / stride).astype(np.float32)


def _compressed_segments(mask: Mask, block_len: int, stride: int, num_cmp: int):
  """`[B, C]` the segment id shared by all keys of each compressed block, -2 where they differ
  or a key is padding (no query segment matches)."""
  seg = jnp.asarray(mask.kv_segment_ids, jnp.int32)[:, :, None, None]  # B S 1 1
  win = compression_windows(seg, block_len, stride)[..., 0, 0]  # B C l
  win = jnp.where(jnp.arange(num_cmp)[:, None] * stride + jnp.arange(block_len) < seg.shape[1],
                  win, -2)
  same = jnp.all(win == win[..., :1], axis=-1) & (win[..., 0] >= 0)
  return jnp.where(same, win[..., 0], -2)


def compressed_attention(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    kv_len: int,
    block_len: int,
    stride: int,
    select_block: int,
    top_n: int,
    initial_blocks: int = 1,
    local_blocks: int = 2,
    mask: Mask | None = None,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
) -> tuple[Float[Array, "B T N Hv"], Int[Array, "B T K n"]]:
  """NSA's compressed branch and the selection it drives (module docstring).

  Args:
    q: `[B, T, N, H]` queries at absolute positions `mask.q_offset + t`.
    k_cmp, v_cmp: `[B, C, K, H]`, `[B, C, K, Hv]` the compressed keys / values of the
      `C = num_compressed(kv_len, l, d)` blocks of `kv_len` keys.
    kv_len: S, the number of (uncompressed) keys, for the selection blocks `ceil(S / l')`.
    block_len, stride, select_block: l, d, l' (`check_geometry`).
    top_n: selected blocks per query and kv head (the forced ones included).
    initial_blocks, local_blocks: blocks always selected: the first ones, and the ones ending
      with the query's own block.
    mask: causal, no window; segment ids and `q_offset` honoured. kv segment ids are `[B, S]`.
    scale: logit scale, default `H ** -0.5`.
    block_q: queries per chunk (memory; each chunk is recomputed in the backward pass).

  Returns:
    `(out [B, T, N, Hv]` in q's dtype (0 where no compressed block is visible),
    `block_ids [B, T, K, min(top_n, ceil(S / l'))]` int32 (decreasing importance, -1 for
    unused slots)). The selection carries no gradient.
  """
  l, d, ls = check_geometry(block_len, stride, select_block)
  b, t, n, h = q.shape
  mask = _check(mask, k_cmp.shape[1], kv_len, l, d, top_n=top_n, initial_blocks=initial_blocks,
                local_blocks=local_blocks)
  pos = masks_lib.q_offsets(mask, b)[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # B T
  q_seg = (jnp.asarray(mask.q_segment_ids, jnp.int32) if mask.has_segments
           else jnp.zeros((b, t), jnp.int32))
  chunk = _chunk_fn(q, k_cmp, v_cmp, mask, default_scale(h, scale), kv_len, l, d, ls, top_n,
                    initial_blocks, local_blocks)
  bq = min(block_q, t)
  pad = lambda x, value=0: pad_to_multiple(x, 1, bq, value)
  split = lambda x: x.reshape(b, -1, bq, *x.shape[2:]).swapaxes(0, 1)  # chunks B bq ...
  out, ids = lax.map(chunk, (split(pad(q)), split(pad(pos, -1)), split(pad(q_seg, -1))))
  merge = lambda x: x.swapaxes(0, 1).reshape(b, -1, *x.shape[3:])[:, :t]
  return merge(out), merge(ids)


def _check(mask, c: int, kv_len: int, l: int, d: int, **counts) -> Mask:
  mask = Mask(causal=True) if mask is None else mask
  if not mask.causal or mask.window is not None:
    raise ValueError(f"NSA's compressed branch needs a causal mask without a window, got "
                     f"causal={mask.causal}, window={mask.window}.")
  if c != num_compressed(kv_len, l, d):
    raise ValueError(f"k_cmp holds {c} compressed blocks; {kv_len} keys with l={l}, d={d} "
                     f"make {num_compressed(kv_len, l, d)}.")
  for name, value in counts.items():
    low = 1 if name == "top_n" else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
  return mask


def _chunk_fn(q, k_cmp, v_cmp, mask: Mask, scale: float, kv_len: int, l: int, d: int, ls: int,
              top_n: int, initial: int, local: int):
  """The compressed attention and selection of one chunk of queries, recomputed in the
  backward pass: `(q [B, Tc, N, H], pos [B, Tc], seg [B, Tc]) -> (out, block ids)`."""
  b, _, n, h = q.shape
  c, kh = k_cmp.shape[1], k_cmp.shape[2]
  nsel = -(-kv_len // ls)
  weights = jnp.asarray(selection_weights(c, nsel, l, d, ls))  # C J
  ends = jnp.arange(c, dtype=jnp.int32) * d + l - 1  # last key of each compressed block
  cmp_seg = _compressed_segments(mask, l, d, c) if mask.has_segments else None

  @jax.checkpoint
  def chunk(args):
    q_c, pos_c, seg_c = args  # B Tc N H, B Tc, B Tc
    q_c = q_c.reshape(b, -1, kh, n // kh, h)
    s = jnp.einsum("BTKGH,BCKH->BKGTC", q_c, k_cmp,
                   preferred_element_type=jnp.float32) * scale
    visible = ends[None, None, :] <= pos_c[:, :, None]  # B Tc C
    if cmp_seg is not None:
      visible &= cmp_seg[:, None, :] == seg_c[:, :, None]
    visible = visible[:, None, None]  # B 1 1 Tc C
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - jnp.where(m > -jnp.inf, m, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("BKGTC,BCKH->BTKGH", p.astype(v_cmp.dtype), v_cmp,
                     preferred_element_type=jnp.float32)
    importance = jnp.einsum("BKGTC,CJ->BTKJ", lax.stop_gradient(p), weights,
                            precision=lax.Precision.HIGHEST)
    return out.reshape(b, -1, n, v_cmp.shape[-1]).astype(q.dtype), _select(
        importance, pos_c, ls, nsel, min(top_n, nsel), initial, local)

  return chunk


def _select(importance, pos, select_block: int, nsel: int, top: int, initial: int, local: int):
  """`[B, Tc, K, top]` the top blocks by importance among the causally visible ones, the
  initial and local blocks forced (+inf), -1 for the slots past the visible blocks."""
  j = jnp.arange(nsel, dtype=jnp.int32)
  own = (pos // select_block)[:, :, None]  # B Tc 1
  visible = (j <= own) & (pos[:, :, None] >= 0)
  forced = (j < initial) | ((j > own - local) & (j <= own))
  score = jnp.where(forced, jnp.inf, 0.0)[:, :, None] + importance  # B Tc K J
  score = jnp.where(visible[:, :, None], score, -jnp.inf)
  value, ids = lax.top_k(score, top)
  return jnp.where(value > -jnp.inf, ids, -1).astype(jnp.int32)
