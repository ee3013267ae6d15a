"""The gated delta rule (Gated DeltaNet linear attention): the front door of the operation.

`gated_delta_rule(q, k, v, g, beta, ...)` computes exactly what the per-token reference
`attention.gated_delta_reference` computes (the recurrence, layouts and segment resets are
stated there), with the backend picked from the table `IMPLEMENTATIONS`:

    "xla"     attention/gated_delta_chunk.py           chunkwise WY form, pure JAX, autodiff
    "pallas"  attention/kernels/gated_delta_pallas.py  Triton kernels, forward and backward
                                                       (GPU; CPU with interpret=True)

Every entry is `run(q, k, v, g, beta, initial_state, reset, block_sizes, interpret) -> (o,
final_state)` on validated inputs, q scaled and q, k normalised in float32 by this module, both
results float32 and differentiable in every input. Backends never import this module; a new
one registers with `IMPLEMENTATIONS.register(name, run)`.

Not a softmax attention: it keeps a fixed-size state `[B, H, dk, dv]` per sequence instead of
attending over keys, so it is not in `attention.registry` (whose functions are
`fn(q, k, v, *, mask, scale)`). Decoding continues from a state with
`attention.gated_delta_step`.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from attention import gated_delta_chunk
from attention.block_sizes import GatedDeltaBlockSizes
from attention.common import Implementations
from attention.gated_delta_reference import check_inputs, prepare_qk, resets

IMPLEMENTATIONS = Implementations(
    "gated_delta_rule",
    xla=gated_delta_chunk.chunk_gated_delta,
    pallas="attention.kernels.gated_delta_pallas:chunk_gated_delta",
)


def gated_delta_rule(
    q: Float[Array, "B T K Dk"],
    k: Float[Array, "B T K Dk"],
    v: Float[Array, "B T H Dv"],
    g: Float[Array, "B T H"],
    beta: Float[Array, "B T H"],
    *,
    scale: float | None = None,
    initial_state: Float[Array, "B H Dk Dv"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    return_final_state: bool = False,
    l2_normalize: bool = True,
    implementation: str | None = None,
    block_sizes: GatedDeltaBlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B H Dk Dv"]]:
  """Gated delta rule over a sequence, chunkwise; equals `gated_delta_reference`.

  Per token (state `S [dk, dv]` per batch row and v head, float32):
  `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = S_t^T (scale q_t)`.

  Args:
    q, k: `[B, T, K, dk]`; L2-normalised over dk here unless `l2_normalize=False` (then the
      caller's q, k should be unit vectors). float32, bfloat16 or float16.
    v: `[B, T, H, dv]` with `H % K == 0`: v head h uses q/k head `h // (H // K)` (GQA-style
      sharing, as Qwen3-Next's extra value heads; q/k are never repeated).
    g: `[B, T, H]` log decay, `g <= 0` (the decay `exp(g)` is in (0, 1]).
    beta: `[B, T, H]` write strength in (0, 1).
    scale: multiplies q (after normalisation); default `dk ** -0.5` (as fla).
    initial_state: `[B, H, dk, dv]` float32 state before token 0; None = zeros.
    segment_ids: `[B, T]` ints; the state is reset to zero before each token whose id differs
      from the previous token's (packed documents).
    return_final_state: also return the float32 state after token T-1.
    implementation: "xla", "pallas", or None (Pallas on GPU, XLA elsewhere).
    block_sizes: `GatedDeltaBlockSizes` (chunk size 64 by default; Pallas: `block_v`, launch).
    interpret: run the Pallas kernels in interpret mode (CPU tests); only with "pallas".

  Returns:
    `o [B, T, H, dv]` in v's dtype, or `(o, final_state [B, H, dk, dv] float32)`.

  Cost: O(T C (dk + dv) + T dk dv) FLOPs per head with chunk size C; memory O(T C + (T / C)
  dk dv) per head forward and backward (one state per chunk), against the reference's O(T dk
  dv) states stored for its backward. Float32 state and accumulation throughout.
  """
  dims = check_inputs(q, k, v, g, beta, initial_state, segment_ids)
  if block_sizes is not None and not isinstance(block_sizes, GatedDeltaBlockSizes):
    raise ValueError(f"block_sizes must be an attention.GatedDeltaBlockSizes, got "
                     f"{block_sizes!r}.")
  implementation = IMPLEMENTATIONS.resolve(implementation, interpret)
  run = IMPLEMENTATIONS.get(implementation)
  q32, k32 = prepare_qk(q, k, scale, l2_normalize)
  o, final = run(q32, k32, v, g, beta, initial_state, resets(segment_ids, dims.length),
                 block_sizes, bool(interpret))
  o = o.astype(v.dtype)
  return (o, final) if return_final_state else o
