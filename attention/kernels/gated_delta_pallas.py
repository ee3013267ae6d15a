"""The gated delta rule on Pallas GPU (Triton) kernels: the `implementation="pallas"` path.

Computes what `attention.gated_delta_reference` (and the XLA chunk form,
`attention.gated_delta_chunk`) computes, with two kernels wired through `jax.custom_vjp`:

    forward   gated_delta_fwd.forward_call    grid (v blocks, B, H) -> o, chunk states, final
    backward  gated_delta_bwd.backward_call   grid (v blocks, B, H) -> dq, dk, dv, dbeta, dg, dh0

The backward restarts each chunk from the state the forward saved on entering it (one
`[dk, dv]` float32 state per chunk: O(T dk dv / C) memory) and recomputes the chunk's terms.

What happens here, outside the kernels (all O(T d)): time is zero-padded to whole chunks (g = 0,
beta = 0: padded tokens leave the state alone), head dims to powers of two >= 16 (zero key
columns change no dot; zero value columns stay zero); `g` becomes its in-chunk cumsum and the
segment resets their in-chunk counts (`attention.gated_delta_reference`); the partial
gradients of the v blocks (and of the v heads sharing a q/k head) are summed. Block sizes are
validated (`GatedDeltaBlockSizes.validate_pallas`) before anything is traced.

Float32 policy: the kernels take float32 operands (q and k arrive normalised in float32; v, g,
beta are cast here) and multiply in exact float32 (Triton `inputPrecision = ieee`); the state
and every accumulator are float32. bf16 inputs therefore cost float32 traffic and CUDA-core
dots: exact, not yet tuned for tensor cores (no GPU was available to measure).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attention.block_sizes import GatedDeltaBlockSizes, padded_head_dim
from attention.common import pad_to_size
from attention.gated_delta_reference import chunk_cumsum, chunk_reset_counts, pad_time
from attention.kernels import gated_delta_bwd, gated_delta_fwd


def resolve_block_sizes(block_sizes: GatedDeltaBlockSizes | None, key_dim: int,
                        value_dim: int) -> GatedDeltaBlockSizes:
  """Defaults, or the given sizes, checked and completed (ValueError before tracing)."""
  if block_sizes is None:
    block_sizes = GatedDeltaBlockSizes()
  if not isinstance(block_sizes, GatedDeltaBlockSizes):
    raise ValueError(f"block_sizes must be an attention.GatedDeltaBlockSizes, got "
                     f"{block_sizes!r}.")
  return block_sizes.validate_pallas(key_dim, value_dim)


def _launch(sizes: GatedDeltaBlockSizes, interpret: bool) -> dict:
  return dict(chunk=sizes.chunk_size, block_v=sizes.block_v, num_warps=sizes.num_warps,
              num_stages=sizes.num_stages, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _kernels(q, k, v, g, beta, h0, counts, sizes, interpret):
  o, _, final = gated_delta_fwd.forward_call(q, k, v, g, beta, h0, counts,
                                             **_launch(sizes, interpret))
  return o, final


def _kernels_fwd(q, k, v, g, beta, h0, counts, sizes, interpret):
  o, states, final = gated_delta_fwd.forward_call(q, k, v, g, beta, h0, counts,
                                                  **_launch(sizes, interpret))
  return (o, final), (q, k, v, g, beta, counts, states)


def _kernels_bwd(sizes, interpret, residuals, cotangents):
  q, k, v, g, beta, counts, states = residuals
  do, dfinal = cotangents
  dq, dk, dv, dbeta, dg, dh0 = gated_delta_bwd.backward_call(
      q, k, v, g, beta, counts, states, do, dfinal, **_launch(sizes, interpret))
  b, t_pad, qk_heads, key_dim = q.shape
  group = v.shape[2] // qk_heads
  per_qk_head = lambda x: jnp.sum(x.reshape(-1, b, t_pad, qk_heads, group, key_dim), axis=(0, 4))
  return (per_qk_head(dq), per_qk_head(dk), dv, jnp.sum(dg, axis=0), jnp.sum(dbeta, axis=0),
          dh0, None)


_kernels.defvjp(_kernels_fwd, _kernels_bwd)


def chunk_gated_delta(q, k, v, g, beta, initial_state, reset,
                      block_sizes: GatedDeltaBlockSizes | None = None,
                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The "pallas" entry of `gated_delta.IMPLEMENTATIONS` (inputs validated by the front door).

  Args: `q` scaled and `k` (normalised) float32 `[B, T, K, dk]`; `v [B, T, H, dv]`, `g, beta
  [B, T, H]`; `initial_state [B, H, dk, dv]` float32 or None; `reset [B, T]` bool or None.
  Returns float32 `(o [B, T, H, dv], final_state [B, H, dk, dv])`, differentiable in all five
  arrays and the initial state.
  """
  b, t, _, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  sizes = resolve_block_sizes(block_sizes, key_dim, value_dim)
  chunk = sizes.chunk_size
  t_pad = -(-t // chunk) * chunk
  dk, dv = padded_head_dim(key_dim), padded_head_dim(value_dim)
  per_head = lambda x: jnp.swapaxes(pad_time(x.astype(jnp.float32), t_pad), 1, 2)  # B H Tp
  counts = None if reset is None else chunk_reset_counts(pad_time(reset, t_pad), chunk)
  h0 = (jnp.zeros((b, heads, dk, dv), jnp.float32) if initial_state is None
        else pad_to_size(pad_to_size(initial_state, 2, dk), 3, dv))
  padded = lambda x, d: pad_to_size(pad_time(x.astype(jnp.float32), t_pad), 3, d)
  o, final = _kernels(padded(q, dk), padded(k, dk), padded(v, dv),
                      chunk_cumsum(per_head(g), chunk), per_head(beta), h0, counts, sizes,
                      bool(interpret))
  return o[:, :t, :, :value_dim], final[:, :, :key_dim, :value_dim]
