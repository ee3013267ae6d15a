"""DeepSeek Sparse Attention (DSA) at the attention level: the attention and the indexer target.

* `dsa_attention`: lightning-indexer top-k selection (`indexer.indexer_topk`, no gradient)
  followed by top-k gather attention (`sparse.sparse_attention`); registered as "dsa".
* `attention_target`: the KL target of the indexer, the main attention distribution summed
  over heads (dense `[B, T, S]` or on the selected slots `[B, T, k]`).
* `selected_mass`: the share of the dense target on the selected keys (indexer recall).

See shared/specs/dsa.md. The indexer's scores, selection and KL loss live in `indexer.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from attention import fp8 as fp8_lib
from attention import masks as masks_lib
from attention import scores as scores_lib
from attention.indexer import check_indices, indexer_topk
from attention.masks import Mask
from attention.reference import check_qkv, default_scale
from attention.sparse import sparse_attention


def dsa_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    index_q: Float[Array, "B T J D"],
    index_k: Float[Array, "B S D"] | fp8_lib.Quantized,
    index_w: Float[Array, "B T J"],
    top_k: int = 2048,
    fp8: bool | fp8_lib.Fp8Format | None = False,
    block_q: int | None = None,
    indices: Int[Array, "B T k"] | None = None,
    **options,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """DeepSeek Sparse Attention: lightning-indexer top-k selection, then `sparse_attention`.

  The selection (`indexer_topk`, shared by all heads) carries no gradient: the indexer learns
  from `indexer_kl_loss`. With `top_k >= S` and a causal mask every visible key is selected and
  this equals dense causal attention. `options` go to `sparse_attention` (implementation,
  interpret, block_sizes, `sink_logits`); `block_q` sets the indexer's query block.
  `indices`: a selection already made by `indexer_topk` with these settings (the DSA layer
  reuses it for the KL loss), used instead of selecting again. `Mask.sinks` is refused. Cost O(T * S * J * D) for the indexer
  + O(T * top_k * N * H) for the attention; memory O(T * top_k + block_q * S).
  """
  check_qkv(q, k, v, value_dim=True)
  scores_lib.refuse("dsa_attention", alibi_slopes=options.get("alibi_slopes"))  # before top-k
  masks_lib.refuse_sinks(mask, "dsa_attention")  # the indexer reaches only the window
  if indices is None:
    topk_options = {} if block_q is None else dict(block_q=block_q)
    indices = indexer_topk(
        lax.stop_gradient(index_q), lax.stop_gradient(index_k), lax.stop_gradient(index_w),
        top_k=top_k, mask=mask, fp8=fp8, **topk_options)
  return sparse_attention(q, k, v, indices, mask=mask, scale=scale, **options)


def attention_target(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    indices: Int[Array, "B T k"] | None = None,
) -> Float[Array, "B T S"] | Float[Array, "B T k"]:
  """KL target p: main attention probabilities summed over heads, L1-normalised, no gradient.

  Dense (`indices=None`): `[B, T, S]`, O(T * S * N) memory (warm-up stage, short sequences).
  Sparse: `[B, T, k]` over the selected slots (softmax over the slots that are >= 0 and
  visible under `mask`), O(T * k * N * H) compute. Rows with no visible key are all 0.
  """
  b, t, s, n, kh, h = check_qkv(q, k, k)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  scale = default_scale(h, scale)
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  qg = q.reshape(b, t, kh, n // kh, h)
  if indices is None:
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k, preferred_element_type=jnp.float32)
    visible = masks_lib.dense_mask(mask, b, t, s)[:, :, None, None]  # B T 1 1 S
  else:
    check_indices(indices, b, t)
    idx = masks_lib.effective_indices(indices, mask, b, t, s, kh)[:, :, 0]  # B T k, -1 = ignored
    k_sel = jax.vmap(lambda x, i: x[i])(k, jnp.maximum(idx, 0))  # B T k K H
    logits = jnp.einsum("BTKGH,BTkKH->BTKGk", qg, k_sel, preferred_element_type=jnp.float32)
    visible = (idx >= 0)[:, :, None, None]
  logits = jnp.where(visible, logits * scale, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(l > 0, l, 1.0)  # B T K G S|k
  p = jnp.sum(probs, axis=(2, 3))
  total = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def selected_mass(
    target: Float[Array, "B T S"],
    indices: Int[Array, "B T k"],
) -> Float[Array, "B T"]:
  """Indexer recall per query: the share of the dense attention distribution `target`
  (`attention_target(q, k, mask=mask)`, rows summing to 1) that falls on the selected keys
  (-1 slots ignored; `indexer_topk` never selects a key twice). 1.0 = nothing missed."""
  b, t, s = jnp.shape(target)
  check_indices(indices, b, t)
  picked = jnp.take_along_axis(target, jnp.clip(indices, 0, s - 1), axis=-1)
  return jnp.sum(jnp.where(indices >= 0, picked, 0.0), axis=-1)


def selection_recall(
    weights: Float[Array, "B T X"],
    indices: Int[Array, "B T m"],
    top: int,
) -> tuple[Float[Array, "B T"], Bool[Array, "B T"]]:
  """Recall of a selection against the dense choice: per row, the share of the `top` largest
  positive entries of `weights` (keys or blocks, e.g. `attention_target` or its block sums)
  that `indices` holds (-1 slots ignored). Returns `(recall, has_any)`; rows without a
  positive weight have recall 0 and `has_any` False. Ties go to the lower index."""
  value, best = lax.top_k(jnp.asarray(weights, jnp.float32), top)  # B T top
  wanted = value > 0
  hit = jnp.any(best[..., :, None] == jnp.asarray(indices)[..., None, :], axis=-1) & wanted
  count = jnp.sum(wanted, axis=-1)
  return jnp.sum(hit, axis=-1) / jnp.maximum(count, 1), count > 0
