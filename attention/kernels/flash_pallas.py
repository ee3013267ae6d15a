"""Flash attention on Pallas GPU (Triton) kernels: the `implementation="pallas"` path.

`flash_attention_pallas(q, k, v, mask=..., scale=...)` computes exactly what
`attention.reference_attention` (and the XLA path, `attention.flash_xla`) computes, with three
kernels wired through `jax.custom_vjp`:

    forward   flash_fwd.forward_call   grid (q blocks, B, N)   -> out, lse
    backward  delta = rowsum(out * dout)                          (one fused XLA reduction)
              flash_bwd.dkdv_call      grid (kv blocks, B, K)  -> dk, dv
              flash_bwd.dq_call        grid (q blocks, B, N)   -> dq

What happens here, outside the kernels (all O(T + S) or O(#blocks)):

* tiles are shrunk for short sequences (never below 16), and sequences are zero-padded to whole
  tiles; padded keys are masked out, padded queries are sliced off (dout = 0 there);
* head_dim is zero-padded to a power of two >= 16 (zeros change no score and no output); a value
  head dim Hv != H pads v, out, dout and dV to their own power of two;
* score modifiers (`attention.scores`: soft-cap static in `Geometry`, ALiBi slopes as a `[Np]`
  operand read per head) are applied inside the tiles of all three kernels;
* the mask becomes per-block schedules (`flash_tiles`): loop bounds from causal / window /
  per-row `q_offset` and segment ranges, plus the fully visible middle run that needs no mask;
* block sizes are validated (powers of two >= 16, fit in shared memory) before any tracing.

Float32 policy: float32 inputs are multiplied in exact float32 (Triton `inputPrecision = ieee`)
unless `BlockSizes.allow_tf32` (TF32 tensor cores); bf16/f16 use tensor cores in their own
dtype with float32 accumulation. Softmax statistics and accumulators are float32 in every case.

Layouts: `q [B, T, N, H]`, `k, v [B, S, K, H]` with `N % K == 0` (GQA/MQA read kv head `n // G`;
K/V are never repeated); `lse [B, N, T]` float32 natural log, -inf for rows with no visible key
(the XLA path's convention, so `flash_forward_pallas` / `flash_backward_pallas` can stand in for
`flash_xla.forward_blocks` / `backward_blocks`, e.g. in ring attention).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attention import masks as masks_lib
from attention.block_sizes import MIN_PALLAS_BLOCK, BlockSizes, padded_head_dim
from attention.common import backward_lse, pad_to_size, round_block, row_delta, with_lse_vjp
from attention.kernels import flash_bwd, flash_fwd
from attention.kernels import flash_tiles as tiles
from attention.masks import Mask
from attention.reference import SUPPORTED_DTYPES, check_qkv, default_scale
from attention.scores import NONE as NO_MODS
from attention.scores import ScoreMods


def _fit(block: int, length: int) -> int:
  """A tile no longer than the sequence needs: the next power of two >= length (>= 16)."""
  return round_block(block, length, MIN_PALLAS_BLOCK)


def resolve_block_sizes(block_sizes: BlockSizes | None, head_dim: int, dtype) -> BlockSizes:
  """Defaults per head_dim/dtype, or the given sizes validated (ValueError before tracing)."""
  if block_sizes is None:
    return BlockSizes.default_pallas(head_dim, dtype)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be an attention.BlockSizes, got {block_sizes!r}.")
  return block_sizes.validate_pallas(head_dim, dtype)


class _Padded:
  """One kernel call's padded operands: sequences to `(q_tile, kv_tile)` multiples, head_dim to
  a power of two, segment ids with -1 (and per-tile segment tables for the schedules)."""

  def __init__(self, q, k, v, mask: Mask, q_tile: int, kv_tile: int):
    b, self.t, self.s, _, _, self.h = check_qkv(q, k, v, value_dim=True)
    self.hv = v.shape[3]
    self.t_pad = tiles.cdiv(self.t, q_tile) * q_tile
    self.s_pad = tiles.cdiv(self.s, kv_tile) * kv_tile
    self.h_pad, self.hv_pad = padded_head_dim(self.h), padded_head_dim(self.hv)
    self.q = self.seq(q)
    self.k = pad_to_size(pad_to_size(k, 1, self.s_pad), 3, self.h_pad)
    self.v = pad_to_size(pad_to_size(v, 1, self.s_pad), 3, self.hv_pad)
    self.offsets = masks_lib.q_offsets(mask, b)
    self.q_seg = self.kv_seg = None
    if mask.has_segments:
      self.q_seg = pad_to_size(jnp.asarray(mask.q_segment_ids, jnp.int32), 1, self.t_pad, -1)
      self.kv_seg = pad_to_size(jnp.asarray(mask.kv_segment_ids, jnp.int32), 1, self.s_pad, -1)

  def seq(self, x, head_pad: int | None = None):
    """`[B, T, N, H]` -> `[B, Tp, N, Hp]` (zeros; `head_pad` instead of Hp if given)."""
    return pad_to_size(pad_to_size(x, 1, self.t_pad), 3, head_pad or self.h_pad)

  def segments(self, q_tile: int, kv_tile: int):
    """`((q_seg, kv_seg) kernel operands, (q_tab, kv_tab) schedule tables)`, or `(None, ())`."""
    if self.q_seg is None:
      return None, ()
    return (self.q_seg, self.kv_seg), (tiles.segment_table(self.q_seg, q_tile),
                                       tiles.segment_table(self.kv_seg, kv_tile))


# --- forward / backward with the XLA path's signatures -------------------------------------------


def _head_dim(q, v) -> int:
  """The head dim tiles are sized for: the larger of q/k's and v's."""
  return max(q.shape[3], v.shape[3])


def flash_forward_pallas(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None,
                         interpret: bool = False, *, mods: ScoreMods = NO_MODS):
  """Returns `out [B, T, N, Hv]` (q.dtype) and `lse [B, N, T]` float32 (-inf: no visible key)."""
  block_sizes = resolve_block_sizes(block_sizes, _head_dim(q, v), q.dtype)
  t, s, h = q.shape[1], k.shape[1], _head_dim(q, v)
  bq, bk = _fit(block_sizes.block_q, t), _fit(block_sizes.block_kv, s)
  x = _Padded(q, k, v, mask, bq, bk)
  segments, tabs = x.segments(bq, bk)
  schedule = tiles.q_major_schedule(mask, x.offsets, x.t_pad // bq, bq, s, bk, *tabs)
  warps, stages = block_sizes.pallas_launch("fwd", h, q.dtype)
  out, lse = flash_fwd.forward_call(
      x.q, x.k, x.v, x.offsets, schedule, segments, tiles.slopes_operand(mods),
      geom=tiles.Geometry.of(mask, s, mods), scale=scale, block_q=bq, block_kv=bk,
      num_warps=warps, num_stages=stages, allow_tf32=block_sizes.allow_tf32,
      interpret=interpret)
  return out[:, :t, :, :x.hv], lse[:, :, :t]


def flash_backward_pallas(q, k, v, out, lse, dout, mask: Mask, scale: float,
                          block_sizes: BlockSizes | None, interpret: bool = False, *,
                          mods: ScoreMods = NO_MODS, dlse=None):
  """Gradients `(dq, dk, dv)` from the saved `lse [B, N, T]`, recomputing scores tile by tile."""
  block_sizes = resolve_block_sizes(block_sizes, _head_dim(q, v), q.dtype)
  t, s, h = q.shape[1], k.shape[1], _head_dim(q, v)
  q_dq, kv_dq = block_sizes.dq_tiles
  bq_kv, bk_kv = _fit(block_sizes.block_q_bwd, t), _fit(block_sizes.block_kv_bwd, s)
  bq_q, bk_q = _fit(q_dq, t), _fit(kv_dq, s)
  x = _Padded(q, k, v, mask, max(bq_kv, bq_q), max(bk_kv, bk_q))  # powers of two: max = lcm
  geom, slopes = tiles.Geometry.of(mask, s, mods), tiles.slopes_operand(mods)

  dout_p = x.seq(dout.astype(q.dtype), x.hv_pad)
  delta = row_delta(out, dout, dlse)  # B T N
  delta = pad_to_size(jnp.swapaxes(delta, 1, 2), 2, x.t_pad)  # B N Tp
  # Base-2 lse; rows with no visible key (and padded rows) get +inf, hence p = 0.
  lse2 = pad_to_size(backward_lse(lse) * tiles.LOG2E, 2, x.t_pad, jnp.inf)

  segments, tabs = x.segments(bq_kv, bk_kv)
  schedule = tiles.kv_major_schedule(mask, x.offsets, x.s_pad // bk_kv, bk_kv, s, t, bq_kv, *tabs)
  warps, stages = block_sizes.pallas_launch("dkdv", h, q.dtype)
  dk, dv = flash_bwd.dkdv_call(
      x.q, x.k, x.v, dout_p, lse2, delta, x.offsets, schedule, segments, slopes, geom=geom,
      scale=scale,
      block_q=bq_kv, block_kv=bk_kv, num_warps=warps, num_stages=stages,
      allow_tf32=block_sizes.allow_tf32, interpret=interpret)

  segments, tabs = x.segments(bq_q, bk_q)
  schedule = tiles.q_major_schedule(mask, x.offsets, x.t_pad // bq_q, bq_q, s, bk_q, *tabs)
  warps, stages = block_sizes.pallas_launch("dq", h, q.dtype)
  dq = flash_bwd.dq_call(
      x.q, x.k, x.v, dout_p, lse2, delta, x.offsets, schedule, segments, slopes, geom=geom,
      scale=scale,
      block_q=bq_q, block_kv=bk_q, num_warps=warps, num_stages=stages,
      allow_tf32=block_sizes.allow_tf32, interpret=interpret)
  return dq[:, :t, :, :x.h], dk[:, :s, :, :x.h], dv[:, :s, :, :x.hv]


# --- custom_vjp wiring ---------------------------------------------------------------------------


_pallas_flash = with_lse_vjp(flash_forward_pallas, flash_backward_pallas)


def attend(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None,
           interpret: bool = False, mods: ScoreMods = NO_MODS):
  """The "pallas" entry of `flash.IMPLEMENTATIONS` (shapes and mask validated by the caller):
  `(out [B, T, N, Hv], lse [B, N, T])`, differentiable in both.

  Checks the dtypes and the block sizes (ValueError before tracing), then runs the kernels.
  """
  if not q.dtype == k.dtype == v.dtype or q.dtype not in map(jnp.dtype, SUPPORTED_DTYPES):
    raise ValueError(f"Pallas flash attention needs q, k, v of one dtype among float32, bfloat16, "
                     f"float16; got {q.dtype}, {k.dtype}, {v.dtype}.")
  block_sizes = resolve_block_sizes(block_sizes, _head_dim(q, v), q.dtype)
  return _pallas_flash(q, k, v, mask, scale, mods, block_sizes, bool(interpret))


def flash_attention_pallas(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
  """Exact attention with Pallas Triton kernels; equals `reference_attention` (see module doc).

  Args:
    q: `[B, T, N, H]`; k, v: `[B, S, K, H]`, `N % K == 0`. float32, bfloat16 or float16.
    mask: `attention.Mask` (causal, window, segment ids, q_offset) or None.
    scale: logit scale, default `H ** -0.5`.
    block_sizes: tiles and launch settings; None = `BlockSizes.default_pallas(H, q.dtype)`.
      Invalid sizes raise ValueError here, before tracing.
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    `[B, T, N, H]` in q's dtype; rows with no visible key are 0.

  Cost: O(T * S_visible * H) FLOPs forward (x2.5 backward), S_visible ~ S/2 causal, ~w for a
  window; O(T + S) memory beyond the inputs in both passes.
  """
  _, _, _, _, _, h = check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  return attend(q, k, v, mask, default_scale(h, scale), block_sizes, interpret)[0]
