"""Token cross-entropy without `[B, T, V]` logits: the output projection runs chunk by chunk.

    losses, predictions = token_losses(logits_fn, x, targets, chunk=512)   # [B, T] each
    chunk = auto_loss_chunk(batch, seq_len, vocab_size)                     # -1 config -> tokens

At 128K tokens a 128K-token vocabulary makes the float32 logits of one row 64 GiB; the
per-token losses are 512 KiB. `token_losses` runs the head (`logits_fn`: final norm, head,
vocabulary projection, soft-cap, whatever the model does per position), the cross-entropy and
the argmax over chunks of `C` positions per row with `tiling.map_positions` (a `lax.scan`
whose body is under `jax.checkpoint` saving nothing), and keeps only the losses and argmaxes:
peak memory of the logits is O(B * C * V) forward and backward instead of O(B * T * V), at the
cost of one more vocabulary projection (the backward recomputes each chunk's logits). Chunks
are strided (models/tiling.py), so a sequence split over a `seq` mesh axis stays split.

Masks and weights are the caller's: the result is the loss of every position (ignored
positions, padding, other documents are weighted after), exactly as
`optax.softmax_cross_entropy_with_integer_labels` on the full logits would give.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from models import tiling

# Automatic chunking: used when the float32 logits of a batch would exceed LOGITS_LIMIT bytes;
# chunks are then made small enough that one chunk's logits take at most CHUNK_LOGITS bytes.
LOGITS_LIMIT = 1 << 30      # 1 GiB
CHUNK_LOGITS = 1 << 28      # 256 MiB

LogitsFn = Callable[[Float[Array, "B C D"]], Float[Array, "B C V"]]


def auto_loss_chunk(batch: int, seq_len: int, vocab_size: int) -> int:
  """Positions per chunk for `loss_chunk = -1`: 0 (plain logits) when the float32 logits
  `[batch, seq_len, vocab_size]` fit in `LOGITS_LIMIT`, else `ceil(seq_len / N)` for the
  smallest power of two `N` whose chunk logits fit in `CHUNK_LOGITS`."""
  for name, value in (("batch", batch), ("seq_len", seq_len), ("vocab_size", vocab_size)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"auto_loss_chunk: {name} must be a positive int, got {value!r}.")
  row_bytes = 4 * batch * vocab_size  # one position of every row, float32
  if row_bytes * seq_len <= LOGITS_LIMIT:
    return 0
  chunks = 1
  while chunks < seq_len and row_bytes * -(-seq_len // chunks) > CHUNK_LOGITS:
    chunks *= 2
  return -(-seq_len // min(chunks, seq_len))


def resolve_loss_chunk(loss_chunk: int, batch: int, seq_len: int, vocab_size: int) -> int:
  """The positions per chunk a run uses: `loss_chunk` itself (0 = plain logits, C > 0 = C
  positions per row per chunk), or `auto_loss_chunk` for -1."""
  if not isinstance(loss_chunk, int) or isinstance(loss_chunk, bool) or loss_chunk < -1:
    raise ValueError(f"loss_chunk must be -1 (automatic), 0 (plain logits) or a positive number "
                     f"of positions per chunk, got {loss_chunk!r}.")
  return auto_loss_chunk(batch, seq_len, vocab_size) if loss_chunk == -1 else loss_chunk


def plain_token_losses(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
                       ) -> tuple[Float[Array, "B T"], Int[Array, "B T"]]:
  """The reference: cross-entropy and argmax of full float32 logits."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return losses, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def token_losses(logits_fn: LogitsFn, x: Float[Array, "B T D"], targets: Int[Array, "B T"],
                 chunk: int, module: nnx.Module | None = None, wrt: Any = nnx.Param
                 ) -> tuple[Float[Array, "B T"], Int[Array, "B T"]]:
  """Per-position cross-entropy (float32) and argmax of `logits_fn(x)` against `targets`.

  Args:
    logits_fn: position-wise map `[B, C, D] -> [B, C, V]` float32 logits (the model's head);
      with `module`, `logits_fn(module, x)`.
    x: `[B, T, D]` features that `logits_fn` turns into logits.
    targets: `[B, T]` token ids (any value at ignored positions: weight them after).
    chunk: positions per row per chunk, `C > 0`; 0 = one call of `logits_fn` on all of `x`.
    module, wrt: the nnx module (and the filter of its parameters) the head uses: their
      gradients are summed over the chunks in float32 (`tiling.map_positions`), so bfloat16
      parameters get the unchunked loss's gradients, not one rounding per chunk.

  Equal to `plain_token_losses(logits_fn(x), targets)` (values and gradients); peak memory of
  the logits O(B C V) forward and backward. Cost: the head runs twice (once recomputed).
  """
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ValueError(f"chunk must be 0 (plain logits) or a positive number of positions, got "
                     f"{chunk!r}.")
  head = lambda *inputs: plain_token_losses(logits_fn(*inputs[:-1]), inputs[-1])  # [m,] x, t
  return tiling.map_positions(head, (x, targets), chunk or x.shape[1], module=module, wrt=wrt)
