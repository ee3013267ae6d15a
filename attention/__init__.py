"""longctx attention: pure JAX functions with one contract (see attention/registry.py).

Public names: `Mask`, `BlockSizes`, `SparseBlockSizes`, `BlockSparseBlockSizes`,
`reference_attention`, `flash_attention`, `local_attention`, `sparse_attention`,
`block_sparse_attention` (+ its oracle `block_sparse_reference`), `ring_attention(_sharded)`,
the DSA pieces, MoBA (`moba_attention`, `moba_gate`), NSA's compressed branch and block
selection (`nsa_compressed_attention`, `nsa_compression_windows`; the layer with its learned
compression and gates is `models.nsa`), `geometric_alibi_slopes`, and the registry
(`register`, `get`, `available`, `refusing`). Registered: "dense" (the O(L^2) reference),
"flash" (blockwise, exact), "local" (flash with a sliding window), "dsa" (DeepSeek sparse
attention: lightning-indexer top-k + top-k gather attention; needs index_q/index_k/index_w),
"ring" (context parallel over a mesh axis; refuses logits_soft_cap / alibi_slopes /
return_lse and Hv != H), "moba" (MoBA's parameter-free block gate + block-sparse attention;
options block_size, top_k_blocks; causal masks only; refuses alibi_slopes).

The gated delta rule (`gated_delta_rule`, `gated_delta_step`, `gated_delta_reference`,
`GatedDeltaBlockSizes`) is linear attention with a fixed-size state `[B, H, dk, dv]`, not a
softmax `fn(q, k, v, mask)`, so it is exported but not registered.

Each operation has one front door holding its implementation table (`flash.IMPLEMENTATIONS`,
`sparse.IMPLEMENTATIONS`, `block_sparse.IMPLEMENTATIONS`, `ring.IMPLEMENTATIONS`,
`gated_delta.IMPLEMENTATIONS`); backends (XLA paths, Pallas kernels) share `attention.common`
and never import a front door.
"""

from attention.block_sizes import (BlockSizes, BlockSparseBlockSizes, GatedDeltaBlockSizes,
                                   SparseBlockSizes)
from attention.block_sparse import block_sparse_attention, block_sparse_reference
from attention.dsa import attention_target, dsa_attention, selected_mass, selection_recall
from attention.flash import flash_attention, local_attention
from attention.gated_delta import gated_delta_rule
from attention.gated_delta_reference import gated_delta_reference, gated_delta_step
from attention.indexer import indexer_kl_loss, indexer_scores, indexer_scores_at, indexer_topk
from attention.masks import (UNBOUNDED, Mask, block_map, effective_indices, local_mask,
                             visible_keys, visible_pairs)
from attention.moba import moba_attention, moba_gate
from attention.nsa import compressed_attention as nsa_compressed_attention
from attention.nsa import compression_windows as nsa_compression_windows
from attention.reference import reference_attention
from attention.scores import geometric_alibi_slopes, merge_attention
from attention.registry import available, get, refusing, register
from attention.ring import ring_attention, ring_attention_sharded
from attention.sparse import sparse_attention

register("dense")(reference_attention)
register("flash")(flash_attention)
register("local")(local_attention)
register("dsa")(dsa_attention)
register("moba")(moba_attention)
register("ring")(refusing(ring_attention_sharded, "logits_soft_cap", "alibi_slopes",
                          "return_lse", "sink_logits"))

__all__ = [
    "BlockSizes", "BlockSparseBlockSizes", "GatedDeltaBlockSizes", "Mask", "SparseBlockSizes",
    "UNBOUNDED", "attention_target", "available", "block_map", "block_sparse_attention",
    "block_sparse_reference", "dsa_attention", "effective_indices", "flash_attention",
    "gated_delta_reference", "gated_delta_rule", "gated_delta_step", "geometric_alibi_slopes",
    "get", "indexer_kl_loss", "indexer_scores", "indexer_scores_at", "indexer_topk",
    "local_attention", "local_mask", "merge_attention", "moba_attention", "moba_gate",
    "nsa_compressed_attention", "nsa_compression_windows", "reference_attention", "refusing",
    "register", "ring_attention", "ring_attention_sharded", "selected_mass", "selection_recall",
    "sparse_attention", "visible_keys", "visible_pairs",
]
