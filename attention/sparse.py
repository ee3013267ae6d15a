"""Top-k gather attention: each query attends only to its own selected keys.

    out[b, t, n] = sum_{s in sel(b, t, n)} softmax_s( q[b, t, n] . k[b, s, kv(n)] * scale ) v[b, s, kv(n)]

`indices [B, T, k]` selects keys shared by every head (DeepSeek's MQA-mode DSA), or
`[B, T, K, k]` one set per kv head (q head n uses kv head n // (N // K), as in GQA). A slot is
ignored when it is -1 (or out of range), or when its key is not visible under `mask`
(causal: key after the query's position `q_offset + t`; window; segments): causality is
re-checked after selection (`masks.effective_indices`). A query with nothing left returns 0.
Duplicated indices count twice (`indexer_topk` never produces them).

The front door of the sparse operation: the backend comes from the table `IMPLEMENTATIONS`,
each entry `attend(q, k, v, effective_indices, scale, block_sizes, interpret, mods) -> (out,
lse)` (`mods`: the soft-cap, `attention.scores`; ALiBi is refused):

    "xla"     attention/sparse_xla.py             blocks of queries, gathered K/V rows
    "pallas"  attention/kernels/sparse_pallas.py  Triton: one program per query, atomics
    "pallas_decode"  attention/kernels/sparse_decode_pallas.py  Triton, T <= DECODE_MAX_Q_LEN:
              one program per (query, slot split), partials merged (the DSA decode step)

"pallas" (or None on GPU) with `T <= DECODE_MAX_Q_LEN` queries runs "pallas_decode" (its
backward is "pallas"'s). The XLA path needs no decode variant: it gathers the selected rows
from the cache in place for any T.

Every entry saves `lse [B, N, T]` (float32) for the backward. Cost O(T * k * N * H) compute.
DeepSeek Sparse Attention (indexer selection + this) is `attention.dsa.dsa_attention`.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from attention import masks as masks_lib
from attention import scores as scores_lib
from attention import sparse_xla
from attention.block_sizes import SparseBlockSizes
from attention.common import DECODE_MAX_Q_LEN, Implementations
from attention.masks import Mask
from attention.reference import check_qkv, default_scale

IMPLEMENTATIONS = Implementations(
    "sparse_attention",
    xla=sparse_xla.attend,
    pallas="attention.kernels.sparse_pallas:attend",
    pallas_decode="attention.kernels.sparse_decode_pallas:attend",
    short_queries={"pallas": "pallas_decode"},
    short_max_q_len=DECODE_MAX_Q_LEN,
)


def sparse_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    indices: Int[Array, "B T k"] | Int[Array, "B T K k"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes=None,
    return_lse: bool = False,
    sink_logits: Float[Array, "N"] | None = None,
    implementation: str | None = None,
    block_sizes: SparseBlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """Softmax attention of each query over its selected keys only (see the module docstring).

  Args:
    q: `[B, T, N, H]`. k: `[B, S, K, H]`, v: `[B, S, K, Hv]` (Hv may differ from H),
      `N % K == 0`.
    indices: `[B, T, k]` key positions shared by all heads, or `[B, T, K, k]` per kv head;
      -1 marks an unused slot.
    mask: visibility re-applied to the selected keys (causal, window, segments, q_offset).
    scale: logit scale, default `H ** -0.5`.
    logits_soft_cap: `cap * tanh(s / cap)` on the scaled scores (`attention.scores`).
    alibi_slopes: not supported here (a ValueError); use flash_attention.
    return_lse: also return `lse [B, N, T]` (float32, natural log, -inf where nothing is
      selected and visible); gradients flow through both outputs.
    sink_logits: `[N]` learned sink logits (GPT-OSS), one more softmax term per row with a
      zero value (`attention.scores.apply_sink_logits`); the lse includes it.
    implementation: a name in `IMPLEMENTATIONS`: "xla", "pallas" (Triton kernels; CPU needs
      `interpret=True`) or None (Pallas on GPU, XLA elsewhere).
    block_sizes: `SparseBlockSizes` (XLA: `block_q`; Pallas: `block_k`); None = defaults.
      A field the chosen implementation does not use raises a ValueError.
    interpret: run the Pallas kernels in interpret mode; only with "pallas".

  Returns:
    `[B, T, N, Hv]` in q's dtype (0 for a query with no selected visible key), or `(out, lse)`.
  """
  b, t, s, n, kh, h = check_qkv(q, k, v, value_dim=True)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  scores_lib.refuse("sparse_attention", alibi_slopes=alibi_slopes)
  mods = scores_lib.make(logits_soft_cap, None, n)
  sinks = scores_lib.check_sink_logits(sink_logits, n)
  implementation = IMPLEMENTATIONS.resolve(implementation, interpret, t)
  if block_sizes is not None and not isinstance(block_sizes, SparseBlockSizes):
    raise ValueError(f"block_sizes must be an attention.SparseBlockSizes, got {block_sizes!r}.")
  idx = masks_lib.effective_indices(indices, mask, b, t, s, kh)
  attend = IMPLEMENTATIONS.get(implementation)
  out, lse = attend(q, k, v, idx, scale, block_sizes, bool(interpret), mods)
  out, lse = scores_lib.apply_sink_logits(out, lse, sinks)
  return (out, lse) if return_lse else out
