"""longctx attention: pure JAX functions with one contract (see attention/registry.py).

Public names: `Mask`, `BlockSizes`, `reference_attention`, `flash_attention`, `local_attention`,
and the registry (`register`, `get`, `available`). Registered: "dense" (the O(L^2) reference),
"flash" (blockwise, exact), "local" (flash with a sliding window), "dsa" (DeepSeek sparse
attention: lightning-indexer top-k + top-k gather attention; needs index_q/index_k/index_w).
"""

from attention.block_sizes import BlockSizes
from attention.flash import flash_attention, local_attention
from attention.indexer import indexer_kl_loss, indexer_scores, indexer_topk
from attention.masks import Mask, block_map, local_mask
from attention.reference import reference_attention
from attention.ring import ring_attention, ring_attention_sharded
from attention.registry import available, get, register
from attention.sparse import dsa_attention, sparse_attention

register("dense")(reference_attention)
register("flash")(flash_attention)
register("local")(local_attention)
register("dsa")(dsa_attention)
register("ring")(ring_attention_sharded)

__all__ = [
    "BlockSizes", "Mask", "available", "block_map", "flash_attention", "get", "local_attention",
    "local_mask", "reference_attention", "register",
    "ring_attention", "ring_attention_sharded",
    "dsa_attention", "indexer_kl_loss", "indexer_scores", "indexer_topk", "sparse_attention",
]
