"""Block-sparse attention: each query attends to the union of its own selected key blocks.

    out[b, t, n] = sum_{s in keys(b, t, n)} softmax_s( q[b, t, n] . k[b, s, kv(n)] * scale ) v[b, s, kv(n)]
    keys(b, t, n) = { s : s // block_size in sel(b, t, kv(n)) and mask shows s to t }

Block `j` covers keys `[j * block_size, (j + 1) * block_size)` (the last block may be short).
`block_indices [B, T, nb]` selects blocks shared by every head, or `[B, T, K, nb]` one list per
kv head (q head n uses kv head n // (N // K), as in GQA). A slot is ignored when it is -1 (or
out of range); a block listed twice counts once (deduplicated, `effective_block_indices`).
The `Mask` (causal, window, segments, q_offset) is applied elementwise inside the blocks, so a
block cut by the diagonal, a window edge or a segment boundary contributes only its visible
keys. A query with nothing visible returns 0 (lse -inf). MoBA (`attention.moba`) and NSA's
selection branch are this operation with a block gate in front; DSA (`attention.sparse`) is the
token-level analogue (block_size 1).

The front door of the operation: the backend comes from the table `IMPLEMENTATIONS`, each
entry `attend(q, k, v, effective_block_indices, mask, block_size, scale, block_sizes,
interpret, mods) -> (out, lse)` (`mods`: the soft-cap, `attention.scores`; ALiBi is refused):

    "xla"     attention/block_sparse_xla.py             key-block-major: a scan over chunks of
                                                        the queries that selected one block
    "pallas"  attention/kernels/block_sparse_pallas.py  Triton: one program per (query, kv
                                                        head), contiguous block loads; dK/dV
                                                        key-block-major, no atomics

Cost O(T * nb * block_size * N * H) compute. The reference is `block_sparse_reference`:
`reference_attention` under the dense mask `block_sparse_mask` (selected keys only).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from attention import block_sparse_xla
from attention import masks as masks_lib
from attention import scores as scores_lib
from attention.block_sizes import BlockSparseBlockSizes
from attention.common import Implementations
from attention.masks import Mask
from attention.reference import check_qkv, default_scale, reference_attention_with_lse

IMPLEMENTATIONS = Implementations(
    "block_sparse_attention",
    xla=block_sparse_xla.attend,
    pallas="attention.kernels.block_sparse_pallas:attend",
)


def check_block_size(block_size) -> int:
  """`block_size` as an int, or a ValueError (any positive int; the Pallas kernels need a power
  of two >= 16, which they check)."""
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int (keys per block), got {block_size!r}.")
  return int(block_size)


def _as_per_set(block_indices, batch: int, q_len: int, kv_heads: int):
  """Validated `[B, T, X, nb]` int32 (X = 1 shared, or K)."""
  shape = jnp.shape(block_indices)
  if len(shape) not in (3, 4) or shape[:2] != (batch, q_len) or (
      len(shape) == 4 and shape[2] != kv_heads) or shape[-1] < 1:
    raise ValueError(f"block_indices must have shape [B, T, nb] = [{batch}, {q_len}, nb] (shared "
                     f"by all heads) or [B, T, K, nb] = [{batch}, {q_len}, {kv_heads}, nb] (per kv "
                     f"head), nb >= 1, got {shape}.")
  if not jnp.issubdtype(jnp.asarray(block_indices).dtype, jnp.integer):
    raise ValueError(f"block_indices must be integers, got dtype "
                     f"{jnp.asarray(block_indices).dtype}.")
  idx = jnp.asarray(block_indices, jnp.int32)
  return idx[:, :, None, :] if idx.ndim == 3 else idx


def effective_block_indices(block_indices, mask: Mask, block_size: int, batch: int, q_len: int,
                            kv_len: int, kv_heads: int) -> Int[Array, "B T X nb"]:
  """`block_indices` made safe for the kernels: `[B, T, X, nb]` int32, per query the distinct
  block ids in increasing order, then -1 for every dropped slot: -1 / out of range, a
  duplicate, or a block the mask's positions (causality, window, `q_offset`) hide entirely
  from the query (segments are left to the elementwise mask). O(T * nb log nb)."""
  idx = _as_per_set(block_indices, batch, q_len, kv_heads)
  nbk = -(-kv_len // block_size)
  valid = (idx >= 0) & (idx < nbk)
  first = jnp.where(valid, idx, 0) * block_size
  last = jnp.minimum(first + block_size, kv_len) - 1
  q_pos = masks_lib.q_offsets(mask, batch)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None]
  q_pos = q_pos[:, :, None, None]
  left, right = mask.bounds
  valid &= (last >= q_pos - left) & (first <= q_pos + right)
  ids = jnp.sort(jnp.where(valid, idx, nbk), axis=-1)  # nbk: the dropped slots, last
  repeat = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]],
                           axis=-1)
  ids = jnp.sort(jnp.where(repeat, nbk, ids), axis=-1)
  return jnp.where(ids < nbk, ids, -1)


def block_sparse_mask(block_indices: Int[Array, "B T nb"] | Int[Array, "B T K nb"],
                      block_size: int, kv_len: int) -> Bool[Array, "B X T S"]:
  """The selection as a dense boolean `[B, X, T, S]` (X = 1 shared, or K): key s is selected
  for query t iff `s // block_size` is one of its block ids (the mask not applied).
  O(T * nb * S) memory: references and tests only."""
  idx = jnp.asarray(block_indices, jnp.int32)
  idx = idx[:, :, None, :] if idx.ndim == 3 else idx  # B T X nb
  key_block = jnp.arange(kv_len, dtype=jnp.int32) // block_size
  selected = jnp.any(idx[..., None] == key_block, axis=-2)  # B T X S (-1 never matches)
  return jnp.swapaxes(selected, 1, 2)


def block_sparse_reference(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    block_indices: Int[Array, "B T nb"] | Int[Array, "B T K nb"],
    *,
    block_size: int,
    mask: Mask | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_lse: bool = False,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """`reference_attention` under `mask` AND the selected keys (`block_sparse_mask`): the oracle
  of `block_sparse_attention`. Dense, O(T * S) memory."""
  b, t, s, n, kh, _ = check_qkv(q, k, v, value_dim=True)
  _as_per_set(block_indices, b, t, kh)
  selected = block_sparse_mask(block_indices, check_block_size(block_size), s)
  out, lse = reference_attention_with_lse(q, k, v, mask=mask, scale=scale,
                                          mods=scores_lib.make(logits_soft_cap, None, n),
                                          selected=selected)
  return (out, lse) if return_lse else out


def block_sparse_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    block_indices: Int[Array, "B T nb"] | Int[Array, "B T K nb"],
    *,
    block_size: int,
    mask: Mask | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes=None,
    return_lse: bool = False,
    sink_logits=None,
    implementation: str | None = None,
    block_sizes: BlockSparseBlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """Softmax attention of each query over the keys of its selected blocks (module docstring).

  Args:
    q: `[B, T, N, H]`. k: `[B, S, K, H]`, v: `[B, S, K, Hv]` (Hv may differ from H),
      `N % K == 0`.
    block_indices: `[B, T, nb]` block ids shared by all heads, or `[B, T, K, nb]` per kv head;
      -1 marks an unused slot; duplicates count once.
    block_size: keys per block (any positive int; "pallas": a power of two >= 16).
    mask: visibility applied inside the selected blocks (causal, window, segments, q_offset).
    scale: logit scale, default `H ** -0.5`.
    logits_soft_cap: `cap * tanh(s / cap)` on the scaled scores (`attention.scores`).
    alibi_slopes: not supported here (a ValueError); use flash_attention.
    return_lse: also return `lse [B, N, T]` (float32, natural log, -inf where nothing is
      visible); gradients flow through both outputs.
    sink_logits: `[N]` learned sink logits (`attention.scores.apply_sink_logits`).
    implementation: a name in `IMPLEMENTATIONS`: "xla", "pallas" (Triton kernels; CPU needs
      `interpret=True`) or None (Pallas on GPU, XLA elsewhere).
    block_sizes: `BlockSparseBlockSizes` (XLA: `block_entries`; Pallas: `block_rows`); None =
      defaults. A field the chosen implementation does not use raises a ValueError.
    interpret: run the Pallas kernels in interpret mode; only with "pallas".

  Returns:
    `[B, T, N, Hv]` in q's dtype (0 for a query with no visible selected key), or `(out, lse)`.
  """
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  block_size = check_block_size(block_size)
  scores_lib.refuse("block_sparse_attention", alibi_slopes=alibi_slopes)
  masks_lib.refuse_sinks(mask, "block_sparse_attention")  # the blocks are the selection
  mods = scores_lib.make(logits_soft_cap, None, n)
  sinks = scores_lib.check_sink_logits(sink_logits, n)
  implementation = IMPLEMENTATIONS.resolve(implementation, interpret)
  if block_sizes is not None and not isinstance(block_sizes, BlockSparseBlockSizes):
    raise ValueError(f"block_sizes must be an attention.BlockSparseBlockSizes, got "
                     f"{block_sizes!r}.")
  idx = effective_block_indices(block_indices, mask, block_size, b, t, s, kh)
  attend = IMPLEMENTATIONS.get(implementation)
  out, lse = attend(q, k, v, idx, mask, block_size, scale, block_sizes, bool(interpret), mods)
  out, lse = scores_lib.apply_sink_logits(out, lse, sinks)
  return (out, lse) if return_lse else out
