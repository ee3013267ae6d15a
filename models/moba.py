"""MoBA layer kind (Mixture of Block Attention, Lu et al. 2025): the "moba" attention in a layer.

    ModelConfig(layer_pattern=("moba",), num_layers=6, last_layers=("global",) * 2,
                kinds={"moba": KindSettings(options=dict(block_size=64, top_k_blocks=2))})

`MobaAttention` is `layers.Attention` (q/k/v/o projections, RoPE, the KV cache) calling
`attention.moba_attention`: each query attends to the `top_k_blocks` past key blocks whose mean
key best matches it (a parameter-free gate; a GQA group shares its blocks) plus its own block,
causally. The kind's `options` go to `moba_attention` (`block_size`, `top_k_blocks`,
`implementation`, ...). The paper's hybrid (the last layers full attention) is
`ModelConfig.last_layers`.

Blocks are aligned to absolute stream positions, so the kind must be causal and unwindowed
(a ring-buffer cache would shift them): decoding keeps every position (`FullCache`) and a new
token gates over the whole cache, which equals the full forward pass (a test).
"""

from __future__ import annotations

import inspect

import numpy as np
from flax import nnx

import attention

from models import layers
from models.kinds import KindSettings, LayerKind, register_layer_kind

OPTION_NAMES = ("block_size", "top_k_blocks", "implementation", "block_sizes", "interpret",
                "logits_soft_cap")


class MobaAttention(layers.Attention):
  """`layers.Attention` of a MoBA kind; refuses what would break its block alignment."""

  def __init__(self, config, kind: str, *, rngs: nnx.Rngs):
    super().__init__(config, kind, rngs=rngs)
    if not config.causal or self.window:
      raise ValueError(f"layer kind {kind!r} (MoBA) needs a causal model and window=0, got "
                       f"causal={config.causal}, window={self.window}.")
    if self.alibi_slopes is not None:
      raise ValueError(f"layer kind {kind!r} (MoBA) does not support alibi=True (block-sparse "
                       f"attention refuses ALiBi); it uses RoPE.")
    unknown = sorted(set(dict(self.options)) - set(OPTION_NAMES))
    if unknown:
      raise ValueError(f"layer kind {kind!r} (MoBA): unknown option(s) {unknown}; known: "
                       f"{list(OPTION_NAMES)}.")


  @classmethod
  def attention_flops(cls, config, kind: str, keys):
    """The newest of `keys` tokens attends to its own block's keys and up to `top_k_blocks`
    complete past blocks; the gate scores every complete past block (`q . mean(k)` per kv head,
    the group's query heads summed first; the block means, O(H) per key, not counted)."""
    block_size, top = gate_settings(config, kind)
    past = (np.asarray(keys) - 1) // block_size  # complete blocks before the own one
    attended = np.asarray(keys) - past * block_size + np.minimum(past, top) * block_size
    gate = 2 * config.num_kv_heads * config.head_dim * past
    return super().attention_flops(config, kind, attended) + gate


def gate_settings(config, kind: str) -> tuple[int, int]:
  """`(block_size, top_k_blocks)` of a MoBA kind (its options, else `moba_attention`'s
  defaults)."""
  options = dict(config.kind_settings(kind).options)
  defaults = inspect.signature(attention.moba_attention).parameters
  return tuple(options.get(name, defaults[name].default)
               for name in ("block_size", "top_k_blocks"))


def moba_kind(**options) -> KindSettings:
  """`KindSettings` overriding the "moba" kind's options, e.g. `moba_kind(block_size=16)`."""
  unknown = sorted(set(options) - set(OPTION_NAMES))
  if unknown:
    raise ValueError(f"unknown MoBA option(s) {unknown}; known: {list(OPTION_NAMES)}.")
  return KindSettings(options=options)


register_layer_kind("moba", LayerKind(KindSettings("moba", 0, 10_000.0), module=MobaAttention))
