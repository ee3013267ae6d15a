"""Ring attention (context parallelism): the sequence is sharded over a mesh axis of P devices.

`ring_attention(q, k, v, mask=..., axis_name="seq")` runs inside `jax.shard_map`: device `r`
holds query block `r` (`[B, T, N, H]`, global positions `r*T .. r*T + T - 1`) and K/V block
`r` (`[B, S, K, H]`, positions `r*S ..`). It keeps its queries and passes K/V (and the kv
segment ids) around the ring with `lax.ppermute`, one block per step (arXiv 2310.01889)::

    out, lse = 0, -inf                              # [B, T, N, H] f32, [B, N, T] f32
    for step i:                                     # device r holds kv block s = r - i (mod P)
      kv_next = ppermute(kv, r -> r + 1)            # issued first: overlaps with the compute
      if classify(q block r, kv block s) != EMPTY:  # lax.cond from positions + segment ranges
        o_i, lse_i = flash_forward(q, k_s, v_s, Mask(..., q_offset = r*T - s*S))
        lse' = logaddexp(lse, lse_i); out = out e^(lse - lse') + o_i e^(lse_i - lse')
      kv = kv_next

The per-block computation is the flash path (`implementation="xla"`: `flash_forward_xla` /
`flash_backward_xla`; "pallas": the Triton kernels' `flash_forward_pallas` /
`flash_backward_pallas`), so the key offset `s*S` enters only as `q_offset = r*T - s*S` and the
flash tiles skip whatever the causal/window mask hides inside a block.

Backward (`jax.custom_vjp`, also a ring): the same visits in the same order; each visit calls
the flash backward with the GLOBAL `out` and `lse` (which makes its dQ/dK/dV the exact partial
gradients), dQ accumulates locally and the dK/dV accumulators (float32) travel around the ring
together with K/V; a last `ppermute` sends each accumulator home. Nothing ever holds more than
one remote K/V block: the full sequence is never gathered.

Which blocks are visited (static, from the mask's reach with `q_offset == 0` and `T == S`):

* no window: a full ring, P - 1 hops; blocks hidden by causality are skipped by `lax.cond`
  (with causal, device r computes only the blocks `s <= r`; the ring still turns P - 1 times
  because device P - 1 needs every block);
* window `(left, right)`: only `ceil(left / S)` hops one way and `ceil(right / S)` the other.
  A local layer whose window fits in one block (`w <= S`) thus exchanges K/V with its
  neighbour(s) only: this is the halo exchange of sliding-window attention, with no special
  code, and costs O(T * w) compute per device (the flash tiles skip the rest of the block).

Costs per device: compute O(T * S_visible * H) (a 1/P share of the single-device flash work,
unbalanced under causality: device r does r + 1 blocks; a striped/zig-zag token layout would
balance it), memory O(T + S) beyond the inputs (two kv blocks in flight, the f32
accumulators), communication (hops + 1) x |kv block| forward, 2 x that backward (K/V and
their gradients). The last hop of each sweep is spent (issued before the compute it overlaps
with). `head_chunks=C` runs one ring per group of K/C kv heads, one after the other: ~1/C of
the per-device temporaries for C x as many (C x smaller) hops. Measured (CPU, compile-only,
65536 causal tokens, B = 1, N = K = 4, H = 64, float32, fwd+bwd): 135 MiB per device on 8
devices (0.39 of the 345 MiB of flash on one device), 50 MiB with head_chunks=4 (0.145).

Caveat: `jax.shard_map(..., check_vma=False)` is required (the flash loops' carries are not
typed as device-varying). `ring_attention_sharded` (registered as "ring") does the shard_map
itself, from a mesh given as an option or the ambient one (`jax.sharding.set_mesh`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attention import flash as flash_lib
from attention import masks as masks_lib
from attention.block_sizes import BlockSizes
from attention.masks import EMPTY, Mask
from attention.reference import check_qkv, default_scale


# --- static configuration -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static (hashable) description of one ring call: axis, block compute, visiting plan."""

  axis_name: str
  num_devices: int
  causal: bool
  window: tuple[int, int] | None
  scale: float
  implementation: str
  block_sizes: BlockSizes
  interpret: bool
  head_chunks: int
  # Sweeps `(shift, hops)`: with `shift` +1 device r receives from r - 1 (blocks r-1, r-2, ...).
  # The first sweep also visits the device's own block.
  sweeps: tuple[tuple[int, int], ...]

  def mask(self, q_seg, kv_seg, offsets) -> Mask:
    return Mask(causal=self.causal, window=self.window, q_segment_ids=q_seg,
                kv_segment_ids=kv_seg, q_offset=offsets)

  def forward(self, q, k, v, mask):
    """One block's `(out [B, T, N, H], lse [B, N, T])`."""
    if self.implementation == "pallas":
      from attention.kernels import flash_pallas  # pylint: disable=g-import-not-at-top
      return flash_pallas.flash_forward_pallas(q, k, v, mask, self.scale, self.block_sizes,
                                               self.interpret)
    bq, bk = self._xla_tiles(q.shape[1], k.shape[1])
    return flash_lib.flash_forward_xla(q, k, v, mask, self.scale, bq, bk)

  def backward(self, q, k, v, out, lse, dout, mask):
    """One block's exact partial `(dq, dk, dv)`, given the global `out` and `lse`."""
    if self.implementation == "pallas":
      from attention.kernels import flash_pallas  # pylint: disable=g-import-not-at-top
      return flash_pallas.flash_backward_pallas(q, k, v, out, lse, dout, mask, self.scale,
                                                self.block_sizes, self.interpret)
    bq, bk = self._xla_tiles(q.shape[1], k.shape[1])
    return flash_lib.flash_backward_xla(q, k, v, out, lse, dout, mask, self.scale, bq, bk)

  def _xla_tiles(self, t: int, s: int) -> tuple[int, int]:
    # The same tile rounding as flash_attention's XLA path.
    round_block = flash_lib._round_block  # pylint: disable=protected-access
    return round_block(self.block_sizes.block_q, t), round_block(self.block_sizes.block_kv, s)


def ring_sweeps(mask: Mask, num_devices: int, q_len: int, kv_len: int,
                static_offset: bool) -> tuple[tuple[int, int], ...]:
  """The static visiting plan `((shift, hops), ...)` for a mask on `num_devices` blocks.

  One sweep of `P - 1` hops (every block) unless the window bounds the reach: then
  `ceil(left / S)` hops receiving from the left and `ceil(right / S)` from the right. Only
  when the query offset is the static 0 and `T == S` (self-attention over a sharded sequence);
  otherwise the full ring, where `lax.cond` still skips hidden blocks.
  """
  full = ((1, num_devices - 1),)
  if mask.window is None or not static_offset or q_len != kv_len:
    return full
  left, right = mask.bounds
  hops_left = min(num_devices - 1, -(-left // kv_len))
  hops_right = min(num_devices - 1, -(-right // kv_len))
  if hops_left + hops_right >= num_devices - 1:
    return full
  return ((1, hops_left), (-1, hops_right)) if hops_right else ((1, hops_left),)


# --- one visit: classification + block compute ---------------------------------------------------


def _block_kind(mask_q: Mask, r, s, t: int, kv_len: int, offsets, q_seg, kv_seg):
  """EMPTY / PARTIAL / FULL of (query block r, key block s) from positions and segment ranges."""
  q_lo = jnp.min(offsets) + r * t
  q_hi = jnp.max(offsets) + r * t + t - 1
  kind = masks_lib.classify_positions(mask_q, q_lo, q_hi, s * kv_len, s * kv_len + kv_len - 1)
  if q_seg is not None:
    q_min, q_max = masks_lib.segment_ranges(q_seg, t)
    kv_min, kv_max = masks_lib.segment_ranges(kv_seg, kv_len)
    seg_kind = masks_lib.classify_segments(q_min, q_max, kv_min, kv_max,
                                           jnp.all(q_seg >= 0, axis=1, keepdims=True),
                                           jnp.all(kv_seg >= 0, axis=1, keepdims=True))
    kind = masks_lib.combine(kind, seg_kind)
  return kind


def _source(ring: _Ring, r, shift: int, i):
  """Index of the kv block device r holds after `i` hops of `shift`."""
  return (r - shift * i) % ring.num_devices


def _permute(ring: _Ring, tree, shift: int):
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


def _forward_pass(ring: _Ring, q, k, v, q_seg, kv_seg, offsets):
  """`(out [B, T, N, H] q.dtype, lse [B, N, T] f32)` of the local queries against all keys."""
  b, t, s_len, n, _, _ = check_qkv(q, k, v)
  r = lax.axis_index(ring.axis_name)
  mask_q = ring.mask(None, None, offsets)

  def visit(carry, kv, s):
    out, lse = carry
    k_s, v_s, kv_seg_s = kv
    kind = _block_kind(mask_q, r, s, t, s_len, offsets, q_seg, kv_seg_s)

    def compute(carry):
      mask = ring.mask(q_seg, kv_seg_s, offsets + r * t - s * s_len)
      return _merge(*carry, *ring.forward(q, k_s, v_s, mask))

    return lax.cond(kind != EMPTY, compute, lambda c: c, (out, lse))

  acc = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, n, t), -jnp.inf, jnp.float32))
  own = (k, v, kv_seg)
  for sweep, (shift, hops) in enumerate(ring.sweeps):
    start = 0 if sweep == 0 else 1  # the own block is visited once, in the first sweep

    def body(i, carry, shift=shift):
      kv, acc = carry
      kv_next = _permute(ring, kv, shift)  # no data dependence on the compute: overlaps it
      return kv_next, visit(acc, kv, _source(ring, r, shift, i))

    kv0 = own if start == 0 else _permute(ring, own, shift)
    _, acc = lax.fori_loop(start, hops + 1, body, (kv0, acc))
  out, lse = acc
  return out.astype(q.dtype), lse


# --- backward --------------------------------------------------------------------------------


def _backward_pass(ring: _Ring, q, k, v, q_seg, kv_seg, offsets, out, lse, dout):
  """`(dq, dk, dv)`: blockwise, with the dK/dV accumulators travelling with their K/V block."""
  _, t, s_len, _, _, _ = check_qkv(q, k, v)
  r = lax.axis_index(ring.axis_name)
  mask_q = ring.mask(None, None, offsets)
  p = ring.num_devices

  def visit(dq, kv, dkv, s):
    k_s, v_s, kv_seg_s = kv
    kind = _block_kind(mask_q, r, s, t, s_len, offsets, q_seg, kv_seg_s)

    def compute(args):
      dq, (dk, dv) = args
      mask = ring.mask(q_seg, kv_seg_s, offsets + r * t - s * s_len)
      dq_i, dk_i, dv_i = ring.backward(q, k_s, v_s, out, lse, dout, mask)
      return dq + dq_i.astype(jnp.float32), (dk + dk_i.astype(jnp.float32),
                                              dv + dv_i.astype(jnp.float32))

    return lax.cond(kind != EMPTY, compute, lambda a: a, (dq, dkv))

  dq = jnp.zeros(q.shape, jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  own = (k, v, kv_seg)
  for sweep, (shift, hops) in enumerate(ring.sweeps):
    start = 0 if sweep == 0 else 1

    def body(i, carry, shift=shift):
      kv, dkv, dq = carry
      kv_next = _permute(ring, kv, shift)
      dq, dkv = visit(dq, kv, dkv, _source(ring, r, shift, i))
      return kv_next, _permute(ring, dkv, shift), dq  # the gradient follows its block

    kv0 = own if start == 0 else _permute(ring, own, shift)
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
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


def _ring_forward(ring: _Ring, q, k, v, q_seg, kv_seg, offsets):
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

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, n, t), jnp.float32))
  return lax.fori_loop(0, c, body, init)


def _ring_backward(ring: _Ring, q, k, v, q_seg, kv_seg, offsets, out, lse, dout):
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

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
  return lax.fori_loop(0, c, body, init)


# --- custom_vjp wiring --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, segments, offsets):
  return _ring_forward(ring, q, k, v, *_unpack(segments), offsets)[0]


def _ring_fwd(ring: _Ring, q, k, v, segments, offsets):
  out, lse = _ring_forward(ring, q, k, v, *_unpack(segments), offsets)
  return out, (q, k, v, segments, offsets, out, lse)


def _ring_bwd(ring: _Ring, res, dout):
  q, k, v, segments, offsets, out, lse = res
  dq, dk, dv = _ring_backward(ring, q, k, v, *_unpack(segments), offsets, out, lse, dout)
  return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _unpack(segments):
  return segments if segments is not None else (None, None)


# --- public entry points ------------------------------------------------------------------------


def ring_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    axis_name: str,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    head_chunks: int = 1,
) -> Float[Array, "B T N H"]:
  """Exact attention over a sequence sharded on mesh axis `axis_name`; call inside shard_map.

  Equals `reference_attention` of the gathered sequences: query `t` of device `r` is global
  query `r * T + t` (position `q_offset + r * T + t`), key `j` of device `s` is key `s * S + j`.

  Args:
    q: the local `[B, T, N, H]` query block. k, v: the local `[B, S, K, H]` blocks, `N % K == 0`.
    mask: `attention.Mask` with global semantics; its segment ids are the LOCAL blocks
      (`[B, T]`, `[B, S]`, sharded like q and k); `q_offset` is a global offset (int or `[B]`).
    scale: logit scale, default `H ** -0.5`.
    axis_name: the shard_map mesh axis the sequence is sharded over (static).
    implementation: per-block compute, "xla" or "pallas" (Triton kernels; CPU needs
      `interpret=True`); None: Pallas on GPU, XLA elsewhere.
    block_sizes: flash tiles (`BlockSizes`); defaults as in `flash_attention`.
    interpret: run the Pallas kernels in interpret mode (tests).
    head_chunks: run the ring for this many groups of kv heads one after the other (must
      divide K): ~1/head_chunks of the temporary memory, head_chunks x as many (smaller) hops.

  Returns:
    The local `[B, T, N, H]` output block, q's dtype; rows with no visible key are 0.

  Must run inside `jax.shard_map(..., check_vma=False)` (see the module docstring).
  """
  _, t, s, _, kh, h = check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  if not isinstance(head_chunks, int) or head_chunks < 1 or kh % head_chunks:
    raise ValueError(f"head_chunks must be a positive int dividing the {kh} kv heads, got "
                     f"{head_chunks!r}.")
  implementation = flash_lib.resolve_implementation(implementation, interpret)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be an attention.BlockSizes, got {block_sizes!r}.")
  if implementation == "xla":
    block_sizes = block_sizes or BlockSizes.default_xla(h, window=mask.window)
  else:
    from attention.kernels import flash_pallas  # pylint: disable=g-import-not-at-top
    block_sizes = flash_pallas.resolve_block_sizes(block_sizes, h, q.dtype)
  try:
    num_devices = lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"ring_attention: unbound axis {axis_name!r}; call it inside "
                     f"jax.shard_map over a mesh with that axis (or use "
                     f"ring_attention_sharded).") from e
  static_offset = isinstance(mask.q_offset, int) and mask.q_offset == 0
  ring = _Ring(axis_name, int(num_devices), mask.causal, mask.window, scale, implementation,
               block_sizes, bool(interpret), head_chunks,
               ring_sweeps(mask, int(num_devices), t, s, static_offset))
  segments = None
  if mask.has_segments:
    segments = (jnp.asarray(mask.q_segment_ids, jnp.int32),
                jnp.asarray(mask.kv_segment_ids, jnp.int32))
  offsets = masks_lib.q_offsets(mask, q.shape[0])
  return _ring(ring, q, k, v, segments, offsets)


# --- shard_map wrapper (registered as "ring") ----------------------------------------------------


def _resolve_mesh(mesh):
  """The given mesh, else the ambient one (`jax.sharding.set_mesh`), else None."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not mesh.axis_names:
      return None
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (or None for the ambient mesh), got "
                     f"{type(mesh).__name__}.")
  return mesh


def _batch_axes(mesh, axis_name: str, batch: int, batch_axes):
  """Mesh axes the batch dimension is split over: by default every other axis of size > 1,
  as far as their product divides `batch` (else those axes see the whole batch)."""
  if batch_axes is not None:
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    size = 1
    for name in batch_axes:
      if name not in mesh.axis_names or name == axis_name:
        raise ValueError(f"batch_axes {batch_axes} must be mesh axes other than {axis_name!r}; "
                         f"mesh axes: {mesh.axis_names}.")
      size *= mesh.shape[name]
    if batch % size:
      raise ValueError(f"batch {batch} is not divisible by the size {size} of batch_axes "
                       f"{batch_axes}.")
    return batch_axes
  chosen, size = [], 1
  for name in mesh.axis_names:
    if name != axis_name and mesh.shape[name] > 1 and batch % (size * mesh.shape[name]) == 0:
      chosen.append(name)
      size *= mesh.shape[name]
  return tuple(chosen)


def ring_attention_sharded(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str = "seq",
    batch_axes: str | tuple[str, ...] | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    head_chunks: int = 1,
) -> Float[Array, "B T N H"]:
  """`ring_attention` on global arrays: shards the sequence over `axis_name` with shard_map.

  The registered "ring" attention (`fn(q, k, v, *, mask, scale, **options)`), so a model layer
  kind selects it with `KindSettings(attention="ring")`. `mesh` defaults to the ambient mesh
  (`with jax.sharding.set_mesh(mesh):` around jit/tracing); with no mesh, no `axis_name` axis,
  or an axis of size 1, it is plain `flash_attention` (one device).

  Args:
    q, k, v, mask, scale, implementation, block_sizes, interpret, head_chunks: as
      `ring_attention` (head_chunks is ignored on one device), with
      global `[B, T, ...]` arrays and a global mask (segment ids `[B, T]`, `[B, S]`).
    mesh: a `jax.sharding.Mesh`, or None for the ambient one.
    axis_name: the mesh axis the sequence is split over; `T` and `S` must divide by its size.
    batch_axes: mesh axes splitting the batch (default: the other axes, where they divide B).
  """
  check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  mesh = _resolve_mesh(mesh)
  if mesh is None or axis_name not in mesh.axis_names or mesh.shape[axis_name] == 1:
    return flash_lib.flash_attention(q, k, v, mask=mask, scale=scale,
                                     implementation=implementation, block_sizes=block_sizes,
                                     interpret=interpret)
  p = mesh.shape[axis_name]
  if q.shape[1] % p or k.shape[1] % p:
    raise ValueError(f"ring attention over {axis_name!r} ({p} devices) needs the query and key "
                     f"lengths divisible by {p}, got {q.shape[1]} and {k.shape[1]}.")
  batch = _batch_axes(mesh, axis_name, q.shape[0], batch_axes) or None
  spec = jax.P(batch, axis_name, None, None)
  seg_spec = jax.P(batch, axis_name)
  static_offset = mask.q_offset if isinstance(mask.q_offset, int) else None
  offsets = None if static_offset is not None else masks_lib.q_offsets(mask, q.shape[0])

  def local(q, k, v, segments, offsets):
    q_seg, kv_seg = _unpack(segments)
    local_mask = Mask(causal=mask.causal, window=mask.window, q_segment_ids=q_seg,
                      kv_segment_ids=kv_seg,
                      q_offset=static_offset if offsets is None else offsets)
    return ring_attention(q, k, v, mask=local_mask, scale=scale, axis_name=axis_name,
                          implementation=implementation, block_sizes=block_sizes,
                          interpret=interpret, head_chunks=head_chunks)

  segments = None
  if mask.has_segments:
    segments = (jnp.asarray(mask.q_segment_ids, jnp.int32),
                jnp.asarray(mask.kv_segment_ids, jnp.int32))
  in_specs = (spec, spec, spec, None if segments is None else (seg_spec, seg_spec),
              None if offsets is None else jax.P(batch))
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
  return fn(q, k, v, segments, offsets)
