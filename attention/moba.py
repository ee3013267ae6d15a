"""MoBA: Mixture of Block Attention (Lu et al. 2025, Moonshot AI; deployed for Kimi).

Keys are cut into blocks of `block_size` (block j: keys `[j * bs, (j + 1) * bs)`). A
parameter-free gate picks, for each query at position i, the blocks it attends to:

    score(i, j) = q_i . mean(k over block j)            for the causally complete blocks
                                                        j < i // bs (all their keys before the
                                                        query's own block)
    sel(i)      = top-`top_k_blocks` blocks by score  +  the query's own block i // bs

and the query then attends, with one exact softmax, to the keys of its selected blocks under
the causal mask (inside its own block: the keys up to itself) -- `block_sparse_attention`.
The selection carries no gradient (it is a choice, as in the paper's top-k); the attention
over the selected keys is differentiated as usual.

Conventions here (the paper / MoonshotAI's reference leaves them open or differs):

* `top_k_blocks` counts the gated past blocks only; the own block comes on top. MoonshotAI's
  `moba_topk` counts the own block, so their `moba_topk = m` is `top_k_blocks = m - 1` here
  (the paper's "block 512, top-k 3" is `block_size=512, top_k_blocks=2`).
* GQA: a kv head's `G` query heads share one block list (the kernels load each block once for
  the group): the group's score is the sum of its heads' scores, `(sum_g q_g) . mean(k)` (NSA's
  rule for sharing a selection across a group). With G = 1 this is the paper's per-head gate.
* Blocks are aligned to absolute key positions (as `block_sparse_attention`'s ids), not to
  each packed document's start as in the reference's varlen code. With segment ids a block
  enters the gate only if its id range holds the query's segment (exact for packed, sorted
  ids); with a window only if it reaches into the window. The mean runs over all keys of a
  block (the last one may be short). Ties in the top-k go to the lower block id.
* The mask must be causal (MoBA is a decoder attention); a non-causal mask is refused.

Gate cost O(T * (S / bs) * K * H), memory O(GATE_BLOCK_Q * S / bs) per step of 256 queries;
then O(T * (top_k_blocks + 1) * bs * N * H) for the attention.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from attention import masks as masks_lib
from attention import scores as scores_lib
from attention.block_sparse import block_sparse_attention, check_block_size
from attention.common import pad_to_multiple
from attention.masks import UNBOUNDED, Mask
from attention.reference import check_qkv

GATE_BLOCK_Q = 256  # queries per step of the gate


def _check_top_k(top_k_blocks) -> int:
  if isinstance(top_k_blocks, bool) or not isinstance(top_k_blocks, int) or top_k_blocks < 0:
    raise ValueError(f"top_k_blocks must be an int >= 0 (gated past blocks per query, the own "
                     f"block comes on top), got {top_k_blocks!r}.")
  return int(top_k_blocks)


def block_means(k: Float[Array, "B S K H"], block_size: int) -> Float[Array, "B nbk K H"]:
  """float32 mean of the keys of each block (a short last block: over its own keys)."""
  b, s, kh, h = k.shape
  blocks = pad_to_multiple(k.astype(jnp.float32), 1, block_size).reshape(b, -1, block_size, kh, h)
  counts = jnp.clip(s - block_size * jnp.arange(blocks.shape[1]), 1, block_size)
  return jnp.sum(blocks, axis=2) / counts[None, :, None, None].astype(jnp.float32)


def _eligible(pos, seg, mask: Mask, seg_range, block_size: int, nbk: int):
  """`[B, nbk]`: the blocks the gate may pick for one query per batch row at `pos [B]`
  (segment ids `seg [B]`): causally complete, reaching into the window, holding the segment."""
  j = jnp.arange(nbk, dtype=jnp.int32)
  ok = j < (pos // block_size)[:, None]
  left = mask.bounds[0]
  if left < UNBOUNDED:
    ok &= (j + 1) * block_size - 1 >= (pos - left)[:, None]
  if seg_range is not None:
    seg_min, seg_max = seg_range  # B nbk
    ok &= (seg_min <= seg[:, None]) & (seg[:, None] <= seg_max)
  return ok


def moba_gate(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    *,
    block_size: int,
    top_k_blocks: int,
    mask: Mask,
) -> Int[Array, "B T K m"]:
  """MoBA's block selection: `[B, T, K, top_k_blocks + 1]` int32 block ids per kv head (the
  gated blocks by decreasing score, -1 where fewer are eligible, then the own block, -1 if it
  holds no key). No gradient. See the module docstring for the rule."""
  b, t, s, n, kh, h = check_qkv(q, k, k)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  nbk = -(-s // block_size)
  k_mean = block_means(lax.stop_gradient(k), block_size)  # B nbk K H
  q_sum = jnp.sum(lax.stop_gradient(q).astype(jnp.float32).reshape(b, t, kh, n // kh, h), 3)
  pos = masks_lib.q_offsets(mask, b)[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # B T
  seg, seg_range = None, None
  if mask.has_segments:
    seg = jnp.asarray(mask.q_segment_ids, jnp.int32).T  # T B
    kv_seg = pad_to_multiple(jnp.asarray(mask.kv_segment_ids, jnp.int32), 1, block_size, -1)
    seg_range = masks_lib.segment_ranges(kv_seg, block_size)
  top = min(top_k_blocks, nbk)

  def select(args):  # one query per batch row
    q_t, pos_t, seg_t = args  # B K H, B, B
    own = pos_t // block_size
    own = jnp.where((own >= 0) & (own < nbk), own, -1)
    own = jnp.broadcast_to(own[:, None, None], (b, kh, 1))
    if top == 0:
      return own
    score = jnp.einsum("BKH,BjKH->BKj", q_t, k_mean, precision=lax.Precision.HIGHEST)
    ok = _eligible(pos_t, seg_t, mask, seg_range, block_size, nbk)[:, None, :]
    value, ids = lax.top_k(jnp.where(ok, score, -jnp.inf), top)
    return jnp.concatenate([jnp.where(value > -jnp.inf, ids, -1), own], axis=-1)

  ids = lax.map(select, (q_sum.swapaxes(0, 1), pos.T, seg), batch_size=min(GATE_BLOCK_Q, t))
  return ids.swapaxes(0, 1)  # B T K m


def moba_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    block_size: int = 64,
    top_k_blocks: int = 2,
    **options,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], Float[Array, "B N T"]]:
  """MoBA: the parameter-free block gate (`moba_gate`), then `block_sparse_attention`.

  `mask` must be causal (windows, segments and `q_offset` are honoured, module docstring).
  `block_size`: keys per block (the Pallas kernels need a power of two >= 16); `top_k_blocks`:
  gated past blocks per query, the own block on top (defaults: 64 and 2, i.e. three blocks
  attended, the paper's "top-k 3"). With `top_k_blocks >= S / block_size` every causally
  visible key is selected and this equals dense causal attention. `options` go to
  `block_sparse_attention` (`logits_soft_cap`, `return_lse`, `sink_logits`, `implementation`,
  `block_sizes`, `interpret`; `alibi_slopes` is refused). Cost: see the module docstring.
  """
  check_qkv(q, k, v, value_dim=True)
  mask = masks_lib.validate(mask, q.shape, k.shape)
  if not mask.causal:
    raise ValueError(f"moba_attention needs a causal mask (MoBA gates the causally complete "
                     f"blocks before each query), got causal={mask.causal}; pass "
                     f"Mask(causal=True, ...).")
  masks_lib.refuse_sinks(mask, "moba_attention")
  block_size = check_block_size(block_size)
  top_k_blocks = _check_top_k(top_k_blocks)
  scores_lib.refuse("moba_attention", alibi_slopes=options.get("alibi_slopes"))  # before the gate
  indices = moba_gate(q, k, block_size=block_size, top_k_blocks=top_k_blocks, mask=mask)
  return block_sparse_attention(q, k, v, indices, block_size=block_size, mask=mask, scale=scale,
                                **options)
