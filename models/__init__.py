"""longctx models: Flax NNX Transformers that know attention only through `attention`'s API.

Public names: `ModelConfig`, `Transformer`, `init_cache` via the model, `decode_step`,
`generate`, the layer-kind registry (`KindSettings`, `LayerKind`, `register_layer_kind`,
`get_layer_kind`, `available_layer_kinds`), the "dsa" kind (`DsaAttention`, `DsaSettings`,
`dsa_kind`), the "gdn" kind (Gated DeltaNet: `GatedDeltaNet`, `GdnSettings`, `gdn_kind`), the
"moba" kind (`MobaAttention`, `moba_kind`), the "nsa" kind (`NsaAttention`, `NsaSettings`,
`nsa_kind`), `Rope`, `Cache`, `flops` (param/FLOP counts, decode cache bytes) and
`chunked_loss` (cross-entropy without [B, T, V] logits).
"""

from models import chunked_loss, flops
from models.cache import Cache, FullCache, RingCache, SinkRingCache
from models.config import ModelConfig
from models.dsa import DsaAttention, DsaSettings, dsa_kind  # registers the "dsa" layer kind
from models.gdn import GatedDeltaNet, GdnSettings, gdn_kind  # registers the "gdn" layer kind
from models.moba import MobaAttention, moba_kind  # registers the "moba" layer kind
from models.nsa import NsaAttention, NsaSettings, nsa_kind  # registers the "nsa" layer kind
from models.kinds import (KindSettings, LayerKind, available_layer_kinds, get_layer_kind,
                          register_layer_kind)
from models.rope import Rope
from models.transformer import Transformer, decode_step, generate, positions_from_segments

__all__ = [
    "Cache", "DsaAttention", "DsaSettings", "FullCache", "GatedDeltaNet", "GdnSettings",
    "KindSettings", "LayerKind", "ModelConfig", "MobaAttention", "NsaAttention", "NsaSettings",
    "RingCache", "Rope", "SinkRingCache", "Transformer", "available_layer_kinds", "chunked_loss",
    "decode_step", "dsa_kind", "flops", "gdn_kind", "generate", "get_layer_kind", "moba_kind",
    "nsa_kind", "positions_from_segments", "register_layer_kind",
]
