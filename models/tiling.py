"""Position-wise functions applied a chunk of positions at a time, recomputed in the backward.

    y = map_positions(fn, (x,), chunk=4096)      # fn: [B, C, ...] arrays -> [B, C, ...] pytree

For a function that treats every position alone (an MLP, the vocabulary projection + loss),
`map_positions` splits the sequence into `N = ceil(T / C)` chunks, runs `fn` on one chunk per
step of a `lax.scan` under `jax.checkpoint` (saving nothing), and reassembles the outputs in
position order. Its intermediates then exist for `C` positions at a time, forward and backward
(the backward recomputes one chunk's), instead of for all `T`: this is how the chunked loss
(models/chunked_loss.py) never holds `[B, T, V]` logits and how the tiled MLP
(`ModelConfig.mlp_chunk`) never holds `[B, T, 2F]` activations. Cost: `fn` runs twice.

Chunk `n` holds the positions `t` with `t % N == n` (strided, not contiguous): a sequence split
over a `seq` mesh axis in contiguous blocks stays split the same way inside every chunk, so
each device computes its own positions and nothing is gathered, as long as `N` divides `T`
(else `T` is padded with zeros to a multiple of `N`, the padded positions' outputs dropped,
and on a mesh the padding makes XLA gather: checked on `seq:4` at T = 128, chunk 32 compiles
with no all-gather, chunk 48 with some).

Gradients with respect to what `fn` closes over (weights) are summed over the chunks by the
scan's transpose, in the weights' dtype: with bfloat16 weights that is one rounding per chunk
(256 chunks of a vocabulary projection made its gradient 7x less accurate than the unchunked
one's). Pass the weights' module as `module` instead (`fn(module, *chunks)`): the gradients of
its low-precision float parameters are then summed in float32 and rounded once, as the
unchunked computation rounds them, for a float32 copy of those parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array


def map_positions(fn: Callable[..., Any], arrays: Sequence[Array], chunk: int,
                  module: nnx.Module | None = None, wrt: Any = nnx.Param) -> Any:
  """`fn(*arrays)` computed `chunk` positions (axis 1) at a time; see the module docstring.

  Args:
    fn: position-wise function of `[B, C, ...]` arrays returning a pytree of `[B, C, ...]`;
      with `module`, `fn(module, *chunks)`.
    arrays: `[B, T, ...]` inputs (same B and T).
    chunk: positions per chunk, `> 0`; `chunk >= T` calls `fn` once on everything.
    module: the nnx module whose parameters `fn` uses: their gradients are summed over the
      chunks in float32 (bfloat16 / float16 parameters: rounded once, not once per chunk).
    wrt: an nnx filter of the module's parameters that `fn` uses (default: all of them).
  """
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
    raise ValueError(f"chunk must be a positive number of positions, got {chunk!r}.")
  b, t = arrays[0].shape[:2]
  if chunk >= t:  # one call: nothing to sum over chunks
    return fn(*arrays) if module is None else fn(module, *arrays)
  if module is not None:
    return _map_with_wide_gradients(fn, arrays, chunk, module, wrt)
  n = -(-t // chunk)      # chunks
  c = -(-t // n)          # positions per chunk; n * c >= t

  def split(a):  # [B, T, ...] -> [N, B, C, ...]: chunk n = positions t % N == n
    a = jnp.pad(a, [(0, 0), (0, n * c - t)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(b, c, n, *a.shape[2:]), 2, 0)

  def merge(a):  # [N, B, C, ...] -> [B, T, ...]
    return jnp.moveaxis(a, 0, 2).reshape(b, n * c, *a.shape[3:])[:, :t]

  step = jax.checkpoint(fn)  # saves nothing: the backward recomputes one chunk at a time
  _, out = lax.scan(lambda carry, xs: (carry, step(*xs)), None, tuple(map(split, arrays)))
  return jax.tree.map(merge, out)


def _low_precision(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32


def _map_with_wide_gradients(fn, arrays, chunk, module, wrt):
  """`map_positions` of `fn(module, *chunks)` where the scan closes over float32 copies of the
  module's low-precision parameters, cast back inside each chunk: the scan's transpose then
  sums their cotangents in float32, and the cast outside rounds the total once."""
  graphdef, params, rest = nnx.split(module, nnx.All(nnx.Param, wrt), ...)
  dtypes = jax.tree.map(lambda p: p.dtype, params)
  wide = jax.tree.map(lambda p: p.astype(jnp.float32) if _low_precision(p) else p, params)

  def call(*chunks):
    narrow = jax.tree.map(lambda w, dtype: w.astype(dtype), wide, dtypes)
    return fn(nnx.merge(graphdef, narrow, rest), *chunks)

  return map_positions(call, arrays, chunk)
