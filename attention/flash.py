"""Flash attention: exact softmax attention computed tile by tile, never forming the T x S matrix.

The front door of the flash operation. `flash_attention(q, k, v, mask=..., implementation=...)`
computes exactly what `reference_attention` computes, with the backend picked from the table
`IMPLEMENTATIONS` (as tokamax's `api.py`):

    "xla"     attention/flash_xla.py   pure JAX tiled online softmax (+ attention/band.py for
                                       narrow windows), any backend
    "pallas"  attention/kernels/flash_pallas.py   Triton kernels (GPU; CPU with interpret=True)
    "xla_decode"     attention/decode_xla.py              few queries vs a long cache (XLA)
    "pallas_decode"  attention/kernels/decode_pallas.py   split-K flash-decoding kernel + merge

Decode dispatch: a call with `T <= DECODE_MAX_Q_LEN` queries (decode, speculative decoding,
small chunked-prefill steps) runs the `_decode` entry of the chosen family ("xla" ->
"xla_decode", "pallas" -> "pallas_decode", None -> the family None picks), so a model's
KV-cache step reads its cache once in its own layout; longer calls run the tiled entries.
Naming a `_decode` entry runs it at any T. The decode entries are differentiable (their
backward is the tiled family's, from the saved lse), so `jax.grad` through a short call is
exact too.

Every entry is `attend(q, k, v, mask, scale, block_sizes, interpret, mods) -> (out, lse)` on
validated inputs (`mods`: soft-cap and ALiBi, `attention.scores`), differentiable in both
outputs through the shared lse `custom_vjp` (`attention.common`), with softmax statistics in
float32 and `lse [B, N, T]`. Backends never import this module; a new backend
registers with `IMPLEMENTATIONS.register(name, attend)`.

Cost: O(T * S_visible * H) compute, S_visible the keys the mask can reach from a q tile
(S full, ~S/2 causal, ~w for a window); O(T + S) memory forward and backward.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from attention import decode_xla, flash_xla
from attention import masks as masks_lib
from attention import scores as scores_lib
from attention.block_sizes import BlockSizes
from attention.common import DECODE_MAX_Q_LEN, Implementations
from attention.masks import Mask
from attention.reference import check_qkv, default_scale

IMPLEMENTATIONS = Implementations(
    "flash_attention",
    xla=flash_xla.attend,
    pallas="attention.kernels.flash_pallas:attend",
    xla_decode=decode_xla.attend,
    pallas_decode="attention.kernels.decode_pallas:attend",
    short_queries={"xla": "xla_decode", "pallas": "pallas_decode"},
    short_max_q_len=DECODE_MAX_Q_LEN,
)


def flash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: Float[Array, "N"] | None = None,
    return_lse: bool = False,
    sink_logits: Float[Array, "N"] | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """Exact attention, blockwise; equals `reference_attention` with the same arguments.

  Args:
    q: `[B, T, N, H]` queries. k: `[B, S, K, H]`, v: `[B, S, K, Hv]` with `N % K == 0`
      (GQA/MQA); the value head dim Hv may differ from H (MLA: 192 / 128).
    mask: visibility (`attention.Mask`); None = every query sees every key.
    scale: logit scale, default `H ** -0.5`.
    logits_soft_cap: `cap * tanh(s / cap)` on the scaled scores, inside the tiles (forward
      and backward); None = no cap.
    alibi_slopes: `[N]` ALiBi slopes: `-slope_n * |i - j|` added to the (capped) scores, computed
      per tile from positions (memory O(L)); `attention.scores` states the convention.
    return_lse: also return `lse [B, N, T]`, the float32 natural-log log-sum-exp of the scaled,
      capped, biased, masked scores (-inf for a row with no visible key, whose out is 0);
      gradients flow through both outputs. Two results over disjoint keys merge as
      `lse = logaddexp(lse_a, lse_b)`, `out = sum_x out_x * exp(lse_x - lse)` (use 0 for lse
      where it is -inf in both, so the weights are 0, not NaN).
    sink_logits: `[N]` learned per-head sink logits (GPT-OSS): an extra softmax term with a zero
      value, merged exactly after the backend (`attention.scores.apply_sink_logits`), so every
      implementation has it, forward and backward; the lse includes it; differentiable.
    implementation: a name in `IMPLEMENTATIONS`: "xla" (pure JAX, any backend), "pallas" (GPU
      Triton kernels, or CPU with `interpret=True`), or None: Pallas on GPU, XLA elsewhere.
      With `T <= DECODE_MAX_Q_LEN` the family's decode entry runs ("xla_decode",
      "pallas_decode"; module docstring); naming one of those runs it at any T.
    block_sizes: tile sizes (`BlockSizes`); defaults depend on the implementation (the decode
      entries take `block_kv` as their key chunk).
    interpret: run the Pallas kernels in interpret mode (CPU tests); only with "pallas".

  Returns:
    `[B, T, N, Hv]` in q's dtype (rows with no visible key are 0), or `(out, lse)`.

  Cost: O(T * S_visible * H) compute with S_visible the keys the mask can reach from each q tile
  (S for full, ~S/2 causal, ~w for a window); O(T + S) memory in forward and backward.
  """
  _, _, _, n, _, h = check_qkv(q, k, v, value_dim=True)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  mods = scores_lib.make(logits_soft_cap, alibi_slopes, n)
  sinks = scores_lib.check_sink_logits(sink_logits, n)
  implementation = IMPLEMENTATIONS.resolve(implementation, interpret, q.shape[1])
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be an attention.BlockSizes, got {block_sizes!r}.")
  attend = IMPLEMENTATIONS.get(implementation)
  out, lse = attend(q, k, v, mask, scale, block_sizes, bool(interpret), mods)
  out, lse = scores_lib.apply_sink_logits(out, lse, sinks)
  return (out, lse) if return_lse else out


def local_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    **options,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """Sliding-window attention: `flash_attention` with a window. O(T * w) compute and memory.

  `window` is an int `w` (causal masks: the last `w` keys including the query itself; otherwise
  `w // 2` keys each side plus the query) or an explicit `(left, right)`. Combined with any
  window already in `mask` by intersection; None uses the mask's window (one is required).
  Causality, segments and sinks (`Mask.sinks`) come from `mask`.
  """
  check_qkv(q, k, v, value_dim=True)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  if window is None:
    if mask.window is None:
      raise ValueError("local attention needs a window: pass window=w (or (left, right)) or a "
                       "Mask with a window.")
    window = mask.window
  if isinstance(window, int):
    window = masks_lib.local_mask(window, causal=mask.causal).window
  if mask.window is not None:
    window = (min(window[0], mask.window[0]), min(window[1], mask.window[1]))
  mask = Mask(causal=mask.causal, window=tuple(window), q_segment_ids=mask.q_segment_ids,
              kv_segment_ids=mask.kv_segment_ids, q_offset=mask.q_offset, sinks=mask.sinks)
  return flash_attention(q, k, v, mask=mask, scale=scale, **options)
