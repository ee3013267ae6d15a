"""Ring attention (context parallelism): the sequence is sharded over a mesh axis of P devices.

`ring_attention(q, k, v, mask=..., axis_name="seq")` runs inside `jax.shard_map`: device `r`
holds query block `r` (`[B, T, N, H]`, global positions `r*T .. r*T + T - 1`) and K/V block
`r` (`[B, S, K, H]`, positions `r*S ..`). It keeps its queries and passes K/V (and the kv
segment ids) around the ring with `lax.ppermute`, one block per step (arXiv 2310.01889)::

    out, lse = 0, -inf                              # [B, T, N, H] f32, [B, N, T] f32
    for step i:                                     # device r holds kv block s = r - i (mod P)
      kv_next = ppermute(kv, r -> r + 1)            # issued first: overlaps with the compute
      for (q chunk a of r, kv chunk b of s):        # 1 pair, or 2 x 2 in the zig-zag layout
        if visible(a, b):                           # lax.cond: positions + segment ranges
          o, l = flash_forward(q_a, k_b, v_b, Mask(..., q_offset = pos(a) - pos(b)))
          merge (o, l) into rows a:                 # lse' = logaddexp(lse, l)
            out = out e^(lse - lse') + o e^(l - lse')
      kv = kv_next

Layouts (attention/ring_layout.py): "contiguous" (device r holds chunk r of P) or "zigzag"
(chunks r and 2P-1-r of 2P, Llama 3's context parallelism). Causal contiguous is unbalanced
(device r computes r + 1 blocks); zig-zag computes, at every step, exactly the half block
needed (late chunk x earlier block, or whole block x later device's early chunk), so every
device does the same work. Measured from the executed schedule (`ring_layout.tile_counts`,
the chunk pairs the `lax.cond`s keep, counted in 512 x 512 flash tiles; 65536 causal tokens
on 8 devices): max / mean 1.87 contiguous -> 1.00 zig-zag.

The per-block computation is a flash backend's blockwise pair, from this front door's table
`IMPLEMENTATIONS` ("xla": `flash_xla.forward_blocks` / `backward_blocks`; "pallas": the Triton
kernels' `flash_forward_pallas` / `flash_backward_pallas`), so the key chunk's position enters only
as the pair's `q_offset` and the flash tiles skip whatever the causal/window mask hides inside
a block. The passes themselves are in attention/ring_pass.py.

Backward (`jax.custom_vjp`, also a ring): the same visits in the same order; each visit calls
the flash backward with the GLOBAL `out` and `lse` (which makes its dQ/dK/dV the exact partial
gradients), dQ accumulates locally and the dK/dV accumulators (float32) travel around the ring
together with K/V; a last `ppermute` sends each accumulator home. Nothing ever holds more than
one remote K/V block: the full sequence is never gathered.

Which blocks are visited (static, `ring_layout.ring_sweeps`, with `q_offset == 0`, `T == S`):

* no window: a full ring, P - 1 hops; chunk pairs hidden by causality are skipped by
  `lax.cond` (contiguous: device r computes only the blocks `s <= r`);
* window `(left, right)`: contiguous, only `ceil(left / S)` hops one way and `ceil(right / S)`
  the other (zig-zag: both ways, as a late chunk's left neighbours sit on higher devices).
  A local layer whose window fits in one block (`w <= S`) thus exchanges K/V with its
  neighbour(s) only: this is the halo exchange of sliding-window attention, with no special
  code, and costs O(T * w) compute per device (the flash tiles skip the rest of the block).

Costs per device: compute O(T * S_visible * H) (a 1/P share of the single-device flash work;
balanced under causality in the zig-zag layout), memory O(T + S) beyond the inputs (two kv
blocks in flight, the f32 accumulators), communication (hops + 1) x |kv block| forward, 2 x
that backward (K/V and their gradients). The last hop of each sweep is spent (issued before
the compute it overlaps with). `head_chunks=C` runs one ring per group of K/C kv heads, one
after the other: ~1/C of the per-device temporaries for C x as many (C x smaller) hops.
Measured (CPU, compile-only, 65536 causal tokens, B = 1, N = K = 4, H = 64, float32,
fwd+bwd): zig-zag data 103 MiB per device on 8 devices (0.30 of the 345 MiB of flash on one
device), 50 MiB with head_chunks=4 (0.145); contiguous 135 / 50 MiB; zig-zag relaid out
inside each call 111 / 74 MiB.

It works under `jax.shard_map` with the default `check_vma=True` (the loop carries of the ring
and of the flash tiles are cast to device-varying, `common.to_varying`) and with
`check_vma=False`, except the Pallas kernels in interpret mode (a CPU test aid), which JAX
0.10's Pallas interpreter cannot run under `check_vma=True` ("dynamic_slice requires varying
manual axes to match"): `ring_attention_sharded` turns the check off for them only.
`ring_attention_sharded` (registered as "ring") does the shard_map itself, from a mesh given
as an option or the ambient one (`jax.sharding.set_mesh`); it defaults to the zig-zag layout
for causal self-attention that visits every block, moving natural-order shards into it and
the output back (`ring_layout.relayout`: two half-block `ppermute`s per array), or, with
`permuted=True`, takes data already permuted once (`ring_layout.to_layout`, as
experiments/training/sharding.py does for training batches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attention import flash_xla
from attention import masks as masks_lib
from attention import ring_layout
from attention.block_sizes import BlockSizes
from attention.common import Implementations
from attention.flash import flash_attention
from attention.masks import Mask
from attention.reference import check_qkv, default_scale
from attention.ring_pass import RingPlan, ring_call

# Per-block compute of the ring: one flash backend's `(forward, backward)` blockwise pair.
IMPLEMENTATIONS = Implementations(
    "ring_attention",
    xla=(flash_xla.forward_blocks, flash_xla.backward_blocks),
    pallas=("attention.kernels.flash_pallas:flash_forward_pallas",
            "attention.kernels.flash_pallas:flash_backward_pallas"),
)


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
    layout: str = "contiguous",
) -> Float[Array, "B T N H"]:
  """Exact attention over a sequence sharded on mesh axis `axis_name`; call inside shard_map.

  Equals `reference_attention` of the gathered sequences. With `layout="contiguous"` query `t`
  of device `r` is global query `r * T + t` (position `q_offset + r * T + t`) and key `j` of
  device `s` is key `s * S + j`; with `layout="zigzag"` the first half of device r's block is
  global chunk `r` and the second half chunk `2P - 1 - r` (of 2P chunks of `T / 2` queries,
  `S / 2` keys), which balances causal work over the devices (attention/ring_layout.py).

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
    layout: which chunks of the sequence each device's q, k, v and segment ids hold:
      "contiguous" or "zigzag" (`ring_layout.to_layout` / `relayout` put data there).

  Returns:
    The local `[B, T, N, H]` output block, q's dtype; rows with no visible key are 0.

  Must run inside `jax.shard_map` over `axis_name` (`check_vma` True, the default, or False;
  False with `interpret=True`, see the module docstring).
  """
  _, t, s, _, kh, h = check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  masks_lib.refuse_sinks(mask, "ring_attention")
  _check_options(t, s, kh, head_chunks, block_sizes, layout)
  forward, backward = IMPLEMENTATIONS.get(IMPLEMENTATIONS.resolve(implementation, interpret))
  try:
    num_devices = int(lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(f"ring_attention: unbound axis {axis_name!r}; call it inside "
                     f"jax.shard_map over a mesh with that axis (or use "
                     f"ring_attention_sharded).") from e
  static_offset = isinstance(mask.q_offset, int) and mask.q_offset == 0
  plan = RingPlan(axis_name, num_devices, mask.causal, mask.window, default_scale(h, scale),
                  forward, backward, block_sizes, bool(interpret), head_chunks,
                  ring_layout.ring_sweeps(mask, layout, num_devices, t, s, static_offset),
                  layout)
  return ring_call(plan, q, k, v, _segments(mask), masks_lib.q_offsets(mask, q.shape[0]))


def _check_options(t: int, s: int, kh: int, head_chunks, block_sizes, layout) -> None:
  if not isinstance(head_chunks, int) or head_chunks < 1 or kh % head_chunks:
    raise ValueError(f"head_chunks must be a positive int dividing the {kh} kv heads, got "
                     f"{head_chunks!r}.")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be an attention.BlockSizes, got {block_sizes!r}.")
  c = ring_layout.chunks_per_device(layout)  # checks the name
  if t % c or s % c:
    raise ValueError(f"the {layout} layout needs local lengths divisible by {c}, got q {t} "
                     f"and kv {s}.")


def _segments(mask: Mask):
  """`(q_segment_ids, kv_segment_ids)` as int32, or None."""
  if not mask.has_segments:
    return None
  return (jnp.asarray(mask.q_segment_ids, jnp.int32), jnp.asarray(mask.kv_segment_ids, jnp.int32))


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
    layout: str | None = None,
    permuted: bool = False,
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
    layout: "contiguous" or "zigzag" (attention/ring_layout.py). None: "zigzag" for causal
      self-attention whose ring visits every block (no window that bounds it), which balances
      the causal work; "contiguous" otherwise (a window: contiguous needs the fewest hops).
    permuted: False: the arrays are in natural token order; each device's shards are moved
      into `layout` and the output back inside the shard_map (two `ppermute`s of half a block
      per array). True: they already are in `layout`'s order (`ring_layout.to_layout`,
      applied once to the batch: tokens, positions, segment ids) and the output stays in it;
      `layout` must then be given.
  """
  check_qkv(q, k, v)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  masks_lib.refuse_sinks(mask, "ring_attention_sharded")  # also on one device: one behaviour
  _check_layout_option(layout, permuted)
  mesh = _resolve_mesh(mesh)
  options = dict(scale=scale, implementation=implementation, block_sizes=block_sizes,
                 interpret=interpret)
  if mesh is None or axis_name not in mesh.axis_names or mesh.shape[axis_name] == 1:
    return flash_attention(q, k, v, mask=mask, **options)
  p = mesh.shape[axis_name]
  layout = _sharded_layout(mask, p, q.shape[1], k.shape[1], layout)
  c = ring_layout.chunks_per_device(layout)
  if q.shape[1] % (p * c) or k.shape[1] % (p * c):
    raise ValueError(f"ring attention over {axis_name!r} ({p} devices, {layout} layout) needs "
                     f"the query and key lengths divisible by {p * c}, got {q.shape[1]} and "
                     f"{k.shape[1]}.")
  batch = _batch_axes(mesh, axis_name, q.shape[0], batch_axes) or None
  relayout = None if permuted or layout == "contiguous" else layout
  return _shard_ring(q, k, v, mask, mesh, axis_name, batch, relayout,
                     dict(options, axis_name=axis_name, head_chunks=head_chunks, layout=layout))


def _check_layout_option(layout, permuted: bool) -> None:
  if layout is not None:
    ring_layout.check_layout(layout)
  elif permuted:
    raise ValueError("ring_attention_sharded: permuted=True needs the layout the inputs are in "
                     f"(layout= one of {ring_layout.LAYOUTS}).")


def _sharded_layout(mask: Mask, p: int, q_len: int, kv_len: int, layout) -> str:
  """The layout `ring_attention_sharded` runs: the given one, else the balanced default."""
  if layout is not None:
    return layout
  static = isinstance(mask.q_offset, int) and mask.q_offset == 0
  full_ring = ring_layout.ring_sweeps(mask, "contiguous", p, q_len // p, kv_len // p,
                                      static) == ((1, p - 1),)
  balanced = mask.causal and q_len == kv_len and q_len % (2 * p) == 0 and full_ring
  return "zigzag" if balanced else "contiguous"


def _shard_ring(q, k, v, mask: Mask, mesh, axis_name: str, batch, relayout, options):
  """`ring_attention` under `jax.shard_map`: sequence over `axis_name`, batch over `batch`;
  with `relayout` (a layout name) the natural-order shards are moved into it and back."""
  spec = jax.P(batch, axis_name, None, None)
  seg_spec = jax.P(batch, axis_name)
  static_offset = mask.q_offset if isinstance(mask.q_offset, int) else None
  offsets = None if static_offset is not None else masks_lib.q_offsets(mask, q.shape[0])

  p = mesh.shape[axis_name]
  move = lambda x, src, dst: x if relayout is None else ring_layout.relayout(
      x, axis_name, p, src, dst)

  def local(q, k, v, segments, offsets):
    q, k, v, segments = move((q, k, v, segments), "contiguous", relayout)
    q_seg, kv_seg = segments if segments is not None else (None, None)
    local_mask = Mask(causal=mask.causal, window=mask.window, q_segment_ids=q_seg,
                      kv_segment_ids=kv_seg,
                      q_offset=static_offset if offsets is None else offsets)
    return move(ring_attention(q, k, v, mask=local_mask, **options), relayout, "contiguous")

  segments = _segments(mask)
  in_specs = (spec, spec, spec, None if segments is None else (seg_spec, seg_spec),
              None if offsets is None else jax.P(batch))
  # JAX's Pallas interpreter fails vma checks inside its grid loop; the compiled paths pass.
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec,
                     check_vma=not options["interpret"])
  return fn(q, k, v, segments, offsets)
