"""NSA layer kind (Native Sparse Attention, Yuan et al. 2025): three branches under learned gates.

    ModelConfig(layer_pattern=("nsa",), kinds={"nsa": nsa_kind(block_len=32, stride=16,
                select_block=64, top_n=16, window=512)})   # the paper's sizes

`NsaAttention` reuses `layers.Attention` (q/k/v/o projections, RoPE, `Mask`, KV cache) and
computes, for every query head (`attention/nsa.py` has the exact rules):

    k_cmp = phi_k(k of each block of l keys, stride d)    phi: a two-layer MLP (GELU) over the
    v_cmp = phi_v(v of each block)                         block's keys flattened, after adding a
                                                           learned intra-block position embedding
    o_cmp = attention of q over (k_cmp, v_cmp)  (compressed blocks ending at or before q)
    o_slc = attention of q over the top_n blocks of l' keys by o_cmp's probabilities summed
            over the GQA group (the first and the local blocks always in; block-sparse attention)
    o_win = attention of q over the last `window` keys
    g     = sigmoid(x W_g + b_g)   [B, T, N, 3]   per head and branch
    out   = g_cmp o_cmp + g_slc o_slc + g_win o_win, then the output projection.

The three branches share the layer's q/k/v projections (the paper gives each branch its own
keys and values; shared ones keep the parameter count of the other kinds); phi_k and phi_v are
shared by the kv heads and compress the keys after RoPE. The selection carries no gradient.

Decoding keeps every position (`FullCache`) and recompresses the cache's blocks at each call
(O(max_len / d) compressions per step: exact, not fast; the paper caches the compressed keys),
so token-by-token decoding equals the full forward pass (a test).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

import attention
from models import layers
from models.kinds import KindSettings, LayerKind, register_layer_kind, settings_from_options

BRANCHES = ("compressed", "selected", "window")


@dataclasses.dataclass(frozen=True)
class NsaSettings:
  """NSA options of a layer kind (`KindSettings.options`); the paper's values in brackets.

  Attributes:
    block_len: l, keys per compressed block [32]. stride: d, between compressed blocks [16].
    select_block: l', keys per selection block [64]. top_n: selected blocks per query and kv
      head, the forced ones included [16]. initial_blocks [1], local_blocks [2]: always
      selected (the first blocks; the blocks ending with the query's own, >= 1).
    window: sliding-window branch width in keys, the query itself included [512].
    hidden: width of the compression MLP's hidden layer; None = head_dim.
    block_q: queries per chunk of the compressed branch.
    implementation: block-sparse attention's implementation for the selection branch.
  """

  block_len: int = 32
  stride: int = 16
  select_block: int = 64
  top_n: int = 16
  initial_blocks: int = 1
  local_blocks: int = 2
  window: int = 512
  hidden: int | None = None
  block_q: int = 256
  implementation: str | None = None

  def __post_init__(self):
    for name in ("block_len", "stride", "select_block"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NSA option {name} must be a positive int, got {value!r}.")
    if self.block_len % self.stride or self.select_block % self.stride:
      raise ValueError(f"NSA options block_len ({self.block_len}) and select_block "
                       f"({self.select_block}) must be multiples of stride ({self.stride}).")
    for name, low in (("top_n", 1), ("initial_blocks", 0), ("local_blocks", 1), ("window", 1),
                      ("block_q", 1), ("hidden", 1)):
      value = getattr(self, name)
      if name == "hidden" and value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"NSA option {name} must be an int >= {low}, got {value!r}.")

  @classmethod
  def from_options(cls, options: Mapping[str, Any] | tuple | None) -> "NsaSettings":
    """From a kind's `options` (mapping or pairs); unknown names raise a ValueError."""
    return settings_from_options(cls, options, "NSA")


class Compressor(nnx.Module):
  """phi: `[B, C, l, K, H] -> [B, C, K, Hv]`, MLP(flatten(block + pos_embed)) per kv head."""

  def __init__(self, config, block_len: int, hidden: int, *, rngs: nnx.Rngs):
    h = config.head_dim
    self.pos_embed = nnx.Param(jnp.zeros((block_len, h), config.param_dtype))
    dense = functools.partial(nnx.Einsum, dtype=config.dtype, param_dtype=config.param_dtype,
                              rngs=rngs)
    self.w1 = dense("BCKlH,lHF->BCKF", (block_len, h, hidden), bias_shape=(hidden,),
                    kernel_init=layers.fan_in_init((0, 1), 2))
    self.w2 = dense("BCKF,FH->BCKH", (hidden, h), kernel_init=layers.fan_in_init(0, 1))

  def __call__(self, blocks: Float[Array, "B C l K H"]) -> Float[Array, "B C K H"]:
    x = blocks + self.pos_embed[...][None, None, :, None].astype(blocks.dtype)
    return self.w2(jax.nn.gelu(self.w1(x.swapaxes(2, 3))))  # B C K l H -> B C K F -> B C K H


class NsaAttention(layers.Attention):
  """`layers.Attention` with NSA's three gated branches (module docstring).

  Same protocol as `layers.Attention`; `aux` is `{}`. The kind must be causal and unwindowed
  (its `window` option is the sliding branch's), without ALiBi or `attention_scale`.
  """

  def __init__(self, config, kind: str, *, rngs: nnx.Rngs):
    super().__init__(config, kind, rngs=rngs)
    self.nsa = NsaSettings.from_options(self.options)
    self.require_plain_causal("NSA", scale=True, window_note=" (the sliding branch's width is "
                              "the option `window`)", reason="it uses RoPE and head_dim ** -0.5")
    hidden = self.nsa.hidden or config.head_dim
    self.compress_k = Compressor(config, self.nsa.block_len, hidden, rngs=rngs)
    self.compress_v = Compressor(config, self.nsa.block_len, hidden, rngs=rngs)
    self.gate = nnx.Einsum("BTD,DNG->BTNG", (config.d_model, config.num_heads, len(BRANCHES)),
                           bias_shape=(config.num_heads, len(BRANCHES)), dtype=config.dtype,
                           param_dtype=config.param_dtype,
                           kernel_init=layers.fan_in_init(0, (1, 2)), rngs=rngs)

  @classmethod
  def attention_flops(cls, config, kind: str, keys):
    """The newest of `keys` tokens: `C` visible compressed keys, its selected blocks' keys (the
    own block partly, the others whole), `min(keys, window)` window keys; plus the compression
    MLPs' multiply-adds per token (one block of each kv head every d tokens). The block scores
    (`p_cmp @ W`), softmaxes and gates are not counted."""
    s = NsaSettings.from_options(config.kind_settings(kind).options)
    keys = np.asarray(keys)
    cmp = np.maximum((keys - s.block_len) // s.stride + 1, 0)
    blocks = (keys - 1) // s.select_block + 1  # visible selection blocks, the own one last
    selected = np.where(blocks <= s.top_n, keys,
                        (keys - 1) % s.select_block + 1 + (s.top_n - 1) * s.select_block)
    hidden, h = s.hidden or config.head_dim, config.head_dim
    mlp = 2 * 2 * config.num_kv_heads * (s.block_len * h * hidden + hidden * h) // s.stride
    return super().attention_flops(config, kind, cmp + selected + np.minimum(keys, s.window)) + mlp

  def __call__(self, x: Float[Array, "B T D"], *, positions: Int[Array, "B T"],
               segment_ids: Int[Array, "B T"] | None = None, cache=None,
               cache_index=None) -> tuple[Float[Array, "B T D"], Any, dict]:
    q, k, v = self.project(x, positions)  # B T N H, B T K H, B T K H
    if cache is None:
      mask = self.mask(segment_ids, segment_ids)
    else:
      if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
      (k, v, kv_segment_ids, q_offset), cache = cache.update(cache_index, k, v, segment_ids)
      mask = self.mask(segment_ids, kv_segment_ids, q_offset)
    out = self.branches(x, q, k, v, mask)
    return self.o_proj(out), cache, {}

  def branches(self, x, q, k, v, mask: attention.Mask) -> Float[Array, "B T N H"]:
    """`sum_c g_c o_c` over the compressed, selected and window branches."""
    s = self.nsa
    k_cmp = self.compress_k(attention.nsa_compression_windows(k, s.block_len, s.stride))
    v_cmp = self.compress_v(attention.nsa_compression_windows(v, s.block_len, s.stride))
    o_cmp, block_ids = attention.nsa_compressed_attention(
        q, k_cmp, v_cmp, kv_len=k.shape[1], block_len=s.block_len, stride=s.stride,
        select_block=s.select_block, top_n=s.top_n, initial_blocks=s.initial_blocks,
        local_blocks=s.local_blocks, mask=mask, block_q=s.block_q)
    o_slc = attention.block_sparse_attention(q, k, v, block_ids, block_size=s.select_block,
                                             mask=mask, implementation=s.implementation)
    window = attention.local_mask(s.window, causal=True).window
    o_win = attention.flash_attention(q, k, v, mask=dataclasses.replace(mask, window=window))
    g = jax.nn.sigmoid(self.gate(x).astype(jnp.float32))  # B T N 3
    mixed = sum(g[..., i, None] * o.astype(jnp.float32)
                for i, o in enumerate((o_cmp, o_slc, o_win)))
    return mixed.astype(q.dtype)


def nsa_kind(**options) -> KindSettings:
  """`KindSettings` overriding the "nsa" kind's options, e.g. `nsa_kind(top_n=4)`."""
  NsaSettings.from_options(options)  # validate early
  return KindSettings(options=options)


register_layer_kind("nsa", LayerKind(KindSettings("flash", 0, 10_000.0), module=NsaAttention))
