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

import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention

from models import layers
from models.kinds import KindSettings, LayerKind, check_option_names, register_layer_kind

OPTION_NAMES = ("block_size", "top_k_blocks", "implementation", "block_sizes", "interpret",
                "logits_soft_cap")


class MobaAttention(layers.Attention):
  """`layers.Attention` of a MoBA kind; refuses what would break its block alignment."""

  def __init__(self, config, kind: str, *, rngs: nnx.Rngs):
    super().__init__(config, kind, rngs=rngs)
    self.require_plain_causal("MoBA", scale=False, reason="block-sparse attention refuses "
                              "ALiBi; it uses RoPE")
    check_option_names(self.options, OPTION_NAMES, "MoBA")
    self.gate_settings = gate_settings(config, kind)
    self.recall = False  # `set_recall`: report `aux["selection_recall"]` (evaluation)

  def __call__(self, x, *, positions, segment_ids=None, cache=None, cache_index=None):
    """`layers.Attention`'s call; with `recall` on, `aux["selection_recall"]`: over the queries
    with a complete past block and the kv heads, the share of the dense attention's top
    `top_k_blocks` past blocks (by attention mass, the group's heads summed) that the gate
    picks. Costs the dense O(T * S) distribution: evaluation only."""
    y, cache, aux = super().__call__(x, positions=positions, segment_ids=segment_ids,
                                     cache=cache, cache_index=cache_index)
    if self.recall:
      if cache is not None:
        raise ValueError("MoBA's selection recall is measured on a full forward pass, not while "
                         "decoding.")
      q, k, _ = self.project(x, positions)
      aux = dict(aux, selection_recall=self.block_recall(q, k, self.mask(segment_ids,
                                                                        segment_ids)))
    return y, cache, aux

  def block_recall(self, q, k, mask):
    """The `selection_recall` of `__call__` for `q [B, T, N, H]`, `k [B, S, K, H]`."""
    block_size, top = self.gate_settings
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    if top == 0:
      return jnp.ones((), jnp.float32)
    gated = attention.moba_gate(q, k, block_size=block_size, top_k_blocks=top, mask=mask)
    nbk = -(-s // block_size)
    past = jnp.arange(nbk) < (jnp.arange(t) // block_size)[:, None]  # T nbk (offset 0)
    total, rows = 0.0, 0
    for g in range(kh):
      group = q[:, :, g * (n // kh):(g + 1) * (n // kh)]
      target = attention.attention_target(group, k[:, :, g:g + 1], mask=mask)  # B T S
      target = jnp.pad(target, ((0, 0), (0, 0), (0, nbk * block_size - s)))
      mass = jnp.where(past, target.reshape(b, t, nbk, block_size).sum(-1), 0.0)
      recall, has = attention.selection_recall(mass, gated[:, :, g, :top], min(top, nbk))
      total, rows = total + jnp.sum(jnp.where(has, recall, 0.0)), rows + jnp.sum(has)
    return total / jnp.maximum(rows, 1)


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


def set_recall(model: nnx.Module, on: bool = True) -> int:
  """Turns the `selection_recall` report of every MoBA layer in `model` on (or off); returns
  how many (static: jitted calls retrace once)."""
  found = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MobaAttention):
      module.recall = on
      found += 1
  return found


def moba_kind(**options) -> KindSettings:
  """`KindSettings` overriding the "moba" kind's options, e.g. `moba_kind(block_size=16)`."""
  check_option_names(options, OPTION_NAMES, "MoBA")
  return KindSettings(options=options)


register_layer_kind("moba", LayerKind(KindSettings("moba", 0, 10_000.0), module=MobaAttention))
