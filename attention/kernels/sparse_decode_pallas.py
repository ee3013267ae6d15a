"""Top-k gather attention for decode on Pallas GPU (Triton): the DSA decode step's attention.

The "pallas_decode" entry of `sparse.IMPLEMENTATIONS`, chosen for `T <= DECODE_MAX_Q_LEN`
queries. The training kernel (`sparse_pallas`) runs one program per (batch, query, kv head)
over all of the query's `k` selected slots: at decode (`B * T * K` programs, often < 10) it
leaves the GPU idle. Here the slot list is split as flash-decoding splits keys: one program per
(batch, query, kv head, slot split), gathering its selected K/V rows straight from the cache
(`k [B, S, K, H]` read in place, no transposed copy), then an exact merge::

    program (b, t, x, p):  q = the G query heads of kv head x, [Gp, H] (Gp >= 16 rows)
      for each block of `block_k` slots of split p:
        rows = k[idx], v[idx]                     gathered in the cache's layout  [bk, H]
        s = cap(q rows^T * scale), -inf on -1 slots;  online softmax;  acc += p v[idx]
      write (acc [Gp, Hv], m, l)                 float32 partials
    merge (XLA, `common.merge_partials`) -> out [B, T, N, Hv], lse [B, N, T]

On effective indices `[B, T, X, k]` (`masks.effective_indices`: -1 = ignored, X = 1 shared or
X = K per kv head). The splits are chosen so that `B * T * K * P >= TARGET_PROGRAMS`, each with
at least `block_k` slots. Gradients: the training kernels' backward (`sparse_pallas`), from the
saved lse. Cost per query: O(k * Gp * H) tensor-core FLOPs and O(k * H) gathered bytes per kv
head, as the training kernel, over `P` times the programs.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention.block_sizes import SparseBlockSizes, padded_head_dim
from attention.common import lse_vjp, merge_partials, pad_to_size, varying_struct
from attention.kernels import flash_tiles as tiles
from attention.kernels import sparse_pallas
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods, modify

TARGET_PROGRAMS = 264  # programs per call the split count aims for (2 x 132 SMs)


def num_splits(programs: int, num_blocks: int) -> int:
  """Slot splits per (batch, query, kv head): enough programs, at most one per slot block."""
  return max(1, min(num_blocks, -(-TARGET_PROGRAMS // programs)))


def _kernel(q_ref, k_ref, v_ref, idx_ref, acc_ref, m_ref, l_ref, *, scale, soft_cap, block_k,
            num_blocks, precision):
  """Refs: q `[Gp, H]`, k `[S, H]`, v `[S, Hv]` (one kv head, in the cache's layout), idx
  `[kp / P]` (this split's slots); outputs acc `[Gp, Hv]`, m `[Gp]`, l `[Gp]`."""
  q = q_ref[...]
  g = q.shape[0]

  def body(c, carry):
    m, l, acc = carry
    idx = idx_ref[pl.ds(c * block_k, block_k)]
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    k_rows, v_rows = k_ref[safe], v_ref[safe]  # bk H
    s = plgpu.dot(q, k_rows, trans_b=True, precision=precision) * scale  # Gp bk
    s, _ = modify(s, soft_cap)
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    pv = plgpu.dot(p.astype(v_rows.dtype), v_rows, precision=precision)  # Gp Hv
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[:, None] + pv

  init = (jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32),
          jnp.zeros((g, v_ref.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, num_blocks, body, init)
  acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def sparse_decode_forward(q, k, v, idx, *, scale, soft_cap=None,
                          block_k=sparse_pallas.DEFAULT_BLOCK_K, num_warps=4, num_stages=2,
                          interpret=False):
  """`out [B, T, N, Hv]` (q.dtype) and `lse [B, N, T]` float32 from effective indices
  `[B, T, X, k]`: split-slot kernel, then the merge."""
  b, t, n, h = q.shape
  kh, hv = k.shape[2], v.shape[3]
  g, nx = n // kh, idx.shape[2]
  gp, hp, hvp = sparse_pallas.padded_group(g), padded_head_dim(h), padded_head_dim(hv)
  bk = min(block_k, max(sparse_pallas.MIN_DOT_ROWS, 1 << max(0, idx.shape[-1] - 1).bit_length()))
  blocks = -(-idx.shape[-1] // bk)
  splits = num_splits(b * t * kh, blocks)
  per = -(-blocks // splits)  # slot blocks per split
  qp = pad_to_size(pad_to_size(q.reshape(b, t, kh, g, h), 3, gp), 4, hp)
  kp, vp = pad_to_size(k, 3, hp), pad_to_size(v, 3, hvp)  # the cache's own layout
  idxp = pad_to_size(idx, 3, splits * per * bk, -1)
  q_spec = pl.BlockSpec((None, None, None, gp, hp), lambda i, j, x, p: (i, j, x, 0, 0))
  kv_spec = lambda d: pl.BlockSpec((None, k.shape[1], None, d), lambda i, j, x, p: (i, 0, x, 0))
  idx_spec = pl.BlockSpec((None, None, None, per * bk),
                          lambda i, j, x, p: (i, j, x if nx > 1 else 0, p))
  part = lambda *shape: pl.BlockSpec((None, None, None, None, *shape),
                                     lambda i, j, x, p: (i, j, x, p) + (0,) * len(shape))
  lead = (b, t, kh, splits)
  inputs = [qp, kp, vp, idxp]
  kernel = functools.partial(_kernel, scale=scale, soft_cap=soft_cap, block_k=bk,
                             num_blocks=per, precision=tiles.dot_precision(q.dtype, False))
  acc, m, l = tiles.launch(
      kernel, inputs, name="sparse_decode", grid=lead,
      in_specs=[q_spec, kv_spec(hp), kv_spec(hvp), idx_spec],
      out_specs=[part(gp, hvp), part(gp), part(gp)],
      out_shape=[varying_struct((*lead, gp, hvp), jnp.float32, inputs),
                 varying_struct((*lead, gp), jnp.float32, inputs),
                 varying_struct((*lead, gp), jnp.float32, inputs)],
      num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  out, lse = merge_partials(m, l, acc, axis=3, dtype=q.dtype)  # B T K Gp Hvp, B T K Gp
  out = out[..., :g, :hv].reshape(b, t, n, hv)
  return out, jnp.swapaxes(lse[..., :g].reshape(b, t, n), 1, 2)


_pallas_sparse_decode = lse_vjp(
    lambda q, k, v, idx, scale, soft_cap, block_k, interpret: sparse_decode_forward(
        q, k, v, idx, scale=scale, soft_cap=soft_cap, block_k=block_k, interpret=interpret),
    lambda q, k, v, idx, out, lse, dout, scale, soft_cap, block_k, interpret, dlse:
    sparse_pallas.sparse_backward_pallas(q, k, v, idx, out, lse, dout, scale=scale,
                                         soft_cap=soft_cap, dlse=dlse, block_k=block_k,
                                         interpret=interpret),
    lse_grad=True)


def attend(q, k, v, idx, scale: float, block_sizes: SparseBlockSizes | None,
           interpret: bool = False, mods: ScoreMods = NO_MODS):
  """The "pallas_decode" entry of `sparse.IMPLEMENTATIONS`: effective indices `[B, T, X, k]`;
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both (backward: `sparse_pallas`).
  `SparseBlockSizes.block_k` slots per inner step; `block_q` is refused."""
  block_sizes = (block_sizes or SparseBlockSizes()).only("pallas", "block_k")
  return _pallas_sparse_decode(q, k, v, idx, scale, mods.soft_cap,
                               block_sizes.block_k or sparse_pallas.DEFAULT_BLOCK_K,
                               bool(interpret))
