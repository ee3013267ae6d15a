"""Token cross-entropy without `[B, T, V]` logits: the output projection runs chunk by chunk.

    losses, predictions = token_losses(logits_fn, x, targets, chunk=512)   # [B, T] each
    chunk = auto_loss_chunk(batch, seq_len, vocab_size)                     # -1 config -> tokens

At 128K tokens a 128K-token vocabulary makes the float32 logits of one row 64 GiB; the
per-token losses are 512 KiB. `token_losses` splits the sequence into `N = ceil(T / C)` chunks
of `C` positions per row, and a `lax.scan` over them computes each chunk's logits
(`logits_fn`: final norm, head, vocabulary projection, soft-cap, whatever the model does per
token), its cross-entropy and argmax, and keeps only those. The scan body is under
`jax.checkpoint` saving nothing, so the backward pass recomputes one chunk's logits at a time
instead of keeping all of them: peak memory is O(B * C * V) instead of O(B * T * V), at the
cost of one more vocabulary projection (forward FLOPs of the head, ~2 B T D V).

Chunk `n` holds the positions `t` with `t % N == n` (strided, not contiguous): a sequence that
is split over a `seq` mesh axis in contiguous blocks stays split the same way inside every
chunk, so each device computes the logits of its own tokens and nothing is gathered. The
losses come back in token order; positions padded to make `T` a multiple of `N` are dropped.

Masks and weights are the caller's: the result is the loss of every position (ignored
positions, padding, other documents are weighted after), exactly as
`optax.softmax_cross_entropy_with_integer_labels` on the full logits would give.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, Float, Int

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
                 chunk: int) -> tuple[Float[Array, "B T"], Int[Array, "B T"]]:
  """Per-position cross-entropy (float32) and argmax of `logits_fn(x)` against `targets`.

  Args:
    logits_fn: position-wise map `[B, C, D] -> [B, C, V]` float32 logits (the model's head).
    x: `[B, T, D]` features that `logits_fn` turns into logits.
    targets: `[B, T]` token ids (any value at ignored positions: weight them after).
    chunk: positions per row per chunk, `C > 0`; 0 = one call of `logits_fn` on all of `x`.

  Equal to `plain_token_losses(logits_fn(x), targets)` (values and gradients); peak memory of
  the logits O(B C V) forward and backward. Cost: the head runs twice (once recomputed).
  """
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ValueError(f"chunk must be 0 (plain logits) or a positive number of positions, got "
                     f"{chunk!r}.")
  b, t, d = x.shape
  if chunk == 0 or chunk >= t:
    return plain_token_losses(logits_fn(x), targets)
  n = -(-t // chunk)      # chunks
  c = -(-t // n)          # positions per chunk; n * c >= t
  pad = n * c - t
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  xs = x.reshape(b, c, n, d).transpose(2, 0, 1, 3)       # N B C D: chunk n = positions t % N == n
  ts = targets.reshape(b, c, n).transpose(2, 0, 1)       # N B C

  @jax.checkpoint
  def chunk_losses(xc, tc):  # saves nothing: the backward recomputes this chunk's logits
    return plain_token_losses(logits_fn(xc), tc)

  def body(carry, inputs):
    return carry, chunk_losses(*inputs)

  _, (losses, predictions) = lax.scan(body, None, (xs, ts))  # N B C each
  untangle = lambda a: a.transpose(1, 2, 0).reshape(b, n * c)[:, :t]
  return untangle(losses), untangle(predictions)
