"""The ring passes of `ring_attention` (attention/ring.py): visiting plan, forward, backward.

Device `r` of a `P`-device mesh axis keeps its queries and passes K/V (and kv segment ids)
around the ring with `lax.ppermute`. A visit (device r's queries, device s's keys) is the
`C x C` pairs of their chunks (`RingPlan.layout`, attention/ring_layout.py: C = 1 contiguous,
2 zig-zag); each pair the mask does not hide runs one flash backend's blockwise pair
(`RingPlan.block_forward` / `block_backward`, lse `[B, N, T]`) with `q_offset` = the chunks'
position difference, and merges into its query rows by log-sum-exp. The backward sends the
dK/dV accumulators around with their block. See attention/ring.py for the algorithm and costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from attention import masks as masks_lib
from attention import ring_layout
from attention.block_sizes import BlockSizes
from attention.common import lse_vjp, to_varying, varying_axes
from attention.masks import EMPTY, Mask
from attention.reference import check_qkv


# --- static configuration -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RingPlan:
  """Static (hashable) description of one ring call: axis, block compute, visiting plan.

  `block_forward(q, k, v, mask, scale, block_sizes, interpret) -> (out, lse [B, N, T])` and
  `block_backward(q, k, v, out, lse, dout, mask, scale, block_sizes, interpret)` are one
  flash backend's blockwise pair (the ring front door's table picks them).
  """

  axis_name: str
  num_devices: int
  causal: bool
  window: tuple[int, int] | None
  scale: float
  block_forward: Callable
  block_backward: Callable
  block_sizes: BlockSizes | None
  interpret: bool
  head_chunks: int
  # Sweeps `(shift, hops)`: with `shift` +1 device r receives from r - 1 (blocks r-1, r-2, ...).
  # The first sweep also visits the device's own block (`ring_layout.ring_sweeps`).
  sweeps: tuple[tuple[int, int], ...]
  layout: str = "contiguous"  # which chunks each device holds (attention/ring_layout.py)

  @property
  def chunks(self) -> int:
    return ring_layout.chunks_per_device(self.layout)

  def mask(self, q_seg, kv_seg, offsets) -> Mask:
    return Mask(causal=self.causal, window=self.window, q_segment_ids=q_seg,
                kv_segment_ids=kv_seg, q_offset=offsets)

  def varying(self, carry, *arrays):
    """`carry` typed as varying over the ring axis and every axis `arrays` vary over, as the
    block updates that flow into it are (needed under shard_map's default `check_vma=True`)."""
    return to_varying(carry, (self.axis_name,) + varying_axes(*arrays))

  def forward(self, q, k, v, mask):
    """One block's `(out [B, T, N, H], lse [B, N, T])`."""
    return self.block_forward(q, k, v, mask, self.scale, self.block_sizes, self.interpret)

  def backward(self, q, k, v, out, lse, dout, mask):
    """One block's exact partial `(dq, dk, dv)`, given the global `out` and `lse`."""
    return self.block_backward(q, k, v, out, lse, dout, mask, self.scale, self.block_sizes,
                               self.interpret)


# --- one visit: chunk pairs, each skipped when hidden -------------------------------------------


def _pair_visible(ring: RingPlan, q_lo, q_hi, kv_lo, kv_len: int, q_seg, kv_seg):
  """Traced bool: some query at `[q_lo, q_hi]` may see some of the `kv_len` keys from `kv_lo`
  (`ring_layout.pair_visible`, then the segment ranges of the two chunks)."""
  visible = ring_layout.pair_visible(ring.mask(None, None, 0), q_lo, q_hi, kv_lo,
                                     kv_lo + kv_len - 1)
  if q_seg is not None:
    q_min, q_max = masks_lib.segment_ranges(q_seg, q_seg.shape[1])
    kv_min, kv_max = masks_lib.segment_ranges(kv_seg, kv_seg.shape[1])
    seg_kind = masks_lib.classify_segments(q_min, q_max, kv_min, kv_max,
                                           jnp.all(q_seg >= 0, axis=1, keepdims=True),
                                           jnp.all(kv_seg >= 0, axis=1, keepdims=True))
    visible &= seg_kind != EMPTY
  return visible


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Rows `[start, start + size)` of a local block along a sequence axis (start may be traced)."""

  start: Any
  size: int

  def get(self, x, axis: int = 1):
    return lax.dynamic_slice_in_dim(x, self.start, self.size, axis=axis)

  def put(self, x, part, axis: int = 1):
    return lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), self.start, axis=axis)


def _for_each_pair(ring: RingPlan, r, s, q_len: int, kv_len: int, offsets, q_seg, kv_seg,
                   step, carry):
  """`carry = step(carry, q_rows, kv_rows, mask)` for every (query chunk, key chunk) pair of
  the visit (device r's queries, device s's keys) that `_pair_visible` keeps; the others are
  skipped by `lax.cond`. `q_rows` / `kv_rows` (`_Rows`) locate the chunks in the local blocks;
  `mask` has the pair's segment ids and relative `q_offset`. One pair (contiguous) runs
  inline; the C x C pairs of the zig-zag layout in a `fori_loop` (one traced body)."""
  c = ring.chunks
  qc, kc = q_len // c, kv_len // c

  def pair(j, carry):
    a, b = j // c, j % c
    q_rows, kv_rows = _Rows(a * qc, qc), _Rows(b * kc, kc)
    q_pos = offsets + ring_layout.chunk_index(ring.layout, ring.num_devices, r, a) * qc  # B
    kv_pos = ring_layout.chunk_index(ring.layout, ring.num_devices, s, b) * kc
    q_seg_a = None if q_seg is None else q_rows.get(q_seg)
    kv_seg_b = None if kv_seg is None else kv_rows.get(kv_seg)
    visible = _pair_visible(ring, jnp.min(q_pos), jnp.max(q_pos) + qc - 1, kv_pos, kc,
                            q_seg_a, kv_seg_b)
    mask = ring.mask(q_seg_a, kv_seg_b, q_pos - kv_pos)
    return lax.cond(visible, lambda acc: step(acc, q_rows, kv_rows, mask), lambda acc: acc,
                    carry)

  if c == 1:
    return pair(0, carry)
  return lax.fori_loop(0, c * c, pair, carry)


def _permute(ring: RingPlan, tree, shift: int):
  """Sends every leaf of `tree` from device j to device j + shift (mod P)."""
  p = ring.num_devices
  perm = [(j, (j + shift) % p) for j in range(p)]
  return jax.tree.map(lambda x: lax.ppermute(x, ring.axis_name, perm), tree)


# --- forward ---------------------------------------------------------------------------------


def _merge(out, lse, out_i, lse_i):
  """Log-sum-exp merge of two partial softmax results (rows with no key stay 0 / -inf)."""
  new = jnp.logaddexp(lse, lse_i)  # B N T
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  w_old = jnp.swapaxes(jnp.exp(lse - safe), 1, 2)[..., None]  # B T N 1
  w_new = jnp.swapaxes(jnp.exp(lse_i - safe), 1, 2)[..., None]
  return out * w_old + out_i.astype(jnp.float32) * w_new, new


def _forward_pass(ring: RingPlan, q, k, v, q_seg, kv_seg, offsets):
  """`(out [B, T, N, H] q.dtype, lse [B, N, T] f32)` of the local queries against all keys."""
  b, t, s_len, n, _, _ = check_qkv(q, k, v)
  r = lax.axis_index(ring.axis_name)

  def visit(acc, kv, s):
    k_s, v_s, kv_seg_s = kv

    def step(acc, q_rows, kv_rows, mask):
      out, lse = acc
      out_a, lse_a = _merge(q_rows.get(out), q_rows.get(lse, 2),
                            *ring.forward(q_rows.get(q), kv_rows.get(k_s), kv_rows.get(v_s), mask))
      return q_rows.put(out, out_a), q_rows.put(lse, lse_a, 2)

    return _for_each_pair(ring, r, s, t, s_len, offsets, q_seg, kv_seg_s, step, acc)

  acc = ring.varying((jnp.zeros(q.shape, jnp.float32), jnp.full((b, n, t), -jnp.inf, jnp.float32)),
                     q, k, v, q_seg, kv_seg, offsets)
  own = (k, v, kv_seg)
  for sweep, (shift, hops) in enumerate(ring.sweeps):
    start = 0 if sweep == 0 else 1  # the own block is visited once, in the first sweep

    def body(i, carry, shift=shift):
      kv, acc = carry
      kv_next = _permute(ring, kv, shift)  # no data dependence on the compute: overlaps it
      return kv_next, visit(acc, kv, ring_layout.source(ring.num_devices, r, shift, i))

    kv0 = own if start == 0 else _permute(ring, own, shift)
    _, acc = lax.fori_loop(start, hops + 1, body, (kv0, acc))
  out, lse = acc
  return out.astype(q.dtype), lse


# --- backward --------------------------------------------------------------------------------


def _backward_pass(ring: RingPlan, q, k, v, q_seg, kv_seg, offsets, out, lse, dout):
  """`(dq, dk, dv)`: blockwise, with the dK/dV accumulators travelling with their K/V block."""
  _, t, s_len, _, _, _ = check_qkv(q, k, v)
  r = lax.axis_index(ring.axis_name)
  p = ring.num_devices

  def visit(dq, kv, dkv, s):
    k_s, v_s, kv_seg_s = kv

    def step(grads, q_rows, kv_rows, mask):
      dq, (dk, dv) = grads
      q_a, out_a, dout_a = (q_rows.get(x) for x in (q, out, dout))
      dq_a, dk_b, dv_b = ring.backward(q_a, kv_rows.get(k_s), kv_rows.get(v_s), out_a,
                                       q_rows.get(lse, 2), dout_a, mask)
      add = lambda acc, part, rows: rows.put(acc, rows.get(acc) + part.astype(jnp.float32))
      return add(dq, dq_a, q_rows), (add(dk, dk_b, kv_rows), add(dv, dv_b, kv_rows))

    return _for_each_pair(ring, r, s, t, s_len, offsets, q_seg, kv_seg_s, step, (dq, dkv))

  arrays = (q, k, v, q_seg, kv_seg, offsets, out, lse, dout)
  dq, dk, dv = ring.varying(tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v)), *arrays)
  own = (k, v, kv_seg)
  for sweep, (shift, hops) in enumerate(ring.sweeps):
    start = 0 if sweep == 0 else 1

    def body(i, carry, shift=shift):
      kv, dkv, dq = carry
      kv_next = _permute(ring, kv, shift)
      dq, dkv = visit(dq, kv, dkv, ring_layout.source(p, r, shift, i))
      return kv_next, _permute(ring, dkv, shift), dq  # the gradient follows its block

    kv0 = own if start == 0 else _permute(ring, own, shift)
    zeros = ring.varying((jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)),
                         *arrays)
    _, dkv, dq = lax.fori_loop(start, hops + 1, body, (kv0, zeros, dq))
    # Device j now holds the accumulator of block j - shift * (hops + 1): send it home.
    home = (-shift * (hops + 1)) % p
    if home:
      dkv = _permute(ring, dkv, home)
    dk, dv = dk + dkv[0], dv + dkv[1]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# --- head chunks: a whole ring per group of kv heads, one group after the other ----------------
#
# Every per-device buffer of the ring (K/V in flight, accumulators, flash tiles) scales with the
# heads it carries; `head_chunks = C` runs C rings of K/C kv heads (and their N/C q heads)
# sequentially, dividing the temporary memory by ~C for C x more (C x smaller) hops. A
# fori_loop keeps the chunks sequential (unrolled, XLA interleaves them and keeps all alive);
# chunks are sliced from the [B, T, N, H] arrays along the head axis and written back in place
# (`dynamic_update_slice`), so neither the inputs nor the outputs are copied or re-laid out.


def _ring_forward(ring: RingPlan, q, k, v, q_seg, kv_seg, offsets):
  c = ring.head_chunks
  if c == 1:
    return _forward_pass(ring, q, k, v, q_seg, kv_seg, offsets)
  b, t, s, n, kh, h = check_qkv(q, k, v)
  nc, kc = n // c, kh // c

  def body(i, acc):
    out, lse = acc
    o_i, l_i = _forward_pass(ring, lax.dynamic_slice_in_dim(q, i * nc, nc, axis=2),
                             lax.dynamic_slice_in_dim(k, i * kc, kc, axis=2),
                             lax.dynamic_slice_in_dim(v, i * kc, kc, axis=2),
                             q_seg, kv_seg, offsets)
    return (lax.dynamic_update_slice_in_dim(out, o_i, i * nc, axis=2),
            lax.dynamic_update_slice_in_dim(lse, l_i, i * nc, axis=1))

  init = ring.varying((jnp.zeros(q.shape, q.dtype), jnp.zeros((b, n, t), jnp.float32)),
                      q, k, v, q_seg, kv_seg, offsets)
  return lax.fori_loop(0, c, body, init)


def _ring_backward(ring: RingPlan, q, k, v, q_seg, kv_seg, offsets, out, lse, dout):
  c = ring.head_chunks
  if c == 1:
    return _backward_pass(ring, q, k, v, q_seg, kv_seg, offsets, out, lse, dout)
  _, _, _, n, kh, _ = check_qkv(q, k, v)
  nc, kc = n // c, kh // c

  def body(i, grads):
    dq, dk, dv = grads
    qs = lambda x: lax.dynamic_slice_in_dim(x, i * nc, nc, axis=2)
    ks = lambda x: lax.dynamic_slice_in_dim(x, i * kc, kc, axis=2)
    dq_i, dk_i, dv_i = _backward_pass(
        ring, qs(q), ks(k), ks(v), q_seg, kv_seg, offsets, qs(out),
        lax.dynamic_slice_in_dim(lse, i * nc, nc, axis=1), qs(dout))
    return (lax.dynamic_update_slice_in_dim(dq, dq_i, i * nc, axis=2),
            lax.dynamic_update_slice_in_dim(dk, dk_i, i * kc, axis=2),
            lax.dynamic_update_slice_in_dim(dv, dv_i, i * kc, axis=2))

  init = ring.varying(tuple(jnp.zeros(x.shape, x.dtype) for x in (q, k, v)),
                      q, k, v, q_seg, kv_seg, offsets, out, lse, dout)
  return lax.fori_loop(0, c, body, init)


# --- custom_vjp wiring --------------------------------------------------------------------------


def _forward(q, k, v, arrays, ring: RingPlan):
  segments, offsets = arrays
  return _ring_forward(ring, q, k, v, *_unpack(segments), offsets)


def _backward(q, k, v, arrays, out, lse, dout, ring: RingPlan):
  segments, offsets = arrays
  return _ring_backward(ring, q, k, v, *_unpack(segments), offsets, out, lse, dout)


_ring = lse_vjp(_forward, _backward)


def ring_call(ring: RingPlan, q, k, v, segments, offsets):
  """The ring's output `[B, T, N, H]`, differentiable (`common.lse_vjp`); call in shard_map.

  `segments`: `(q_segment_ids [B, T], kv_segment_ids [B, S])` local blocks, or None;
  `offsets [B]` int32 global query offsets.
  """
  return _ring(q, k, v, (segments, offsets), ring)


def _unpack(segments):
  return segments if segments is not None else (None, None)
