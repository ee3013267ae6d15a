"""Parameter and FLOP counts of a `ModelConfig` (parameters from the abstract model's state).

Conventions: a multiply-add is 2 FLOPs; forward pass only (training ~ 3x); norms, RoPE, softmax
and activations are not counted (they are O(D) or O(S) per token against O(D^2) or O(S * D)).

* Matmul FLOPs per token: `2 * (projection parameters)`, the vocabulary projection included
  (tied or not), the embedding lookup, the DSA indexer and NSA's compressors excluded.
* Attention FLOPs per token: per layer `4 * num_heads * head_dim * visible_keys`
  (`q k^T` and `p v`), where `visible_keys` is what the layer kind's mask lets one token see.
  A DSA layer in its sparse stage attends to `min(top_k, visible_keys)` keys and its lightning
  indexer scores every visible key: `+ 2 * index_heads * index_dim * visible_keys` (the ReLU,
  head weights and top-k selection not counted). In the dense stage (warm-up) it is dense
  attention: the indexer then only trains (its KL target), which inference does not need.
* A gdn layer (models/gdn.py) attends to nothing: its "attention" is the recurrence,
  `6 * value_heads * key_dim * value_dim` per token whatever the context; its projections and
  the depthwise conv (`2 * width` FLOPs per channel and token) count as matmul parameters, and
  so do its `A_log` and `dt_bias` (2 per value head: 4 FLOPs a token counted for elementwise
  work, negligible). Each layer module holds its kind's formula (`layer_module`).
* Decode memory: `cache_bytes(config, max_len)`, the bytes of `init_cache` by arithmetic.
* MoBA (`models/moba.py`) and NSA (`models/nsa.py`, its compression MLPs included) count
  their selected keys and their gates' scores in their modules' `attention_flops`.
"""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

import attention
from models.config import ModelConfig
from models import layers
from models.kinds import get_layer_kind
from models.transformer import Transformer


GROUPS = ("embedding", "attention", "indexer", "compressor", "mlp", "norms", "head")


def _group(path: tuple) -> str:
  """The `param_counts` group of a parameter from its nnx path."""
  names = [str(p) for p in path]
  if names[0] == "embed":
    return "embedding"
  if "indexer" in names:
    return "indexer"
  if any(n.startswith("compress_") for n in names):
    return "compressor"
  if any(n.endswith("norm") for n in names):
    return "norms"
  if "attn" in names:
    return "attention"
  if "mlp" in names:
    return "mlp"
  return "head"


@functools.lru_cache(maxsize=None)
def param_counts(config: ModelConfig) -> dict[str, int]:
  """Parameters by group, counted from the model's nnx state (shapes only: nothing allocated).

  Groups: embedding, attention (q/k/v/o, NSA's gates), indexer (DSA), compressor (NSA's
  block compression MLPs), mlp, norms, head; plus total and non_embedding.
  """
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  counts = dict.fromkeys(GROUPS, 0)
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    counts[_group(path)] += int(np.prod(param.shape))
  counts["total"] = sum(counts.values())
  counts["non_embedding"] = counts["total"] - counts["embedding"]
  return counts


def kind_mask(config: ModelConfig, kind: str) -> attention.Mask:
  """The causal/window/sinks `Mask` of layers of `kind` (no segments), as `layers.Attention`
  builds."""
  settings = config.kind_settings(kind)
  window = settings.window
  window = attention.local_mask(window, causal=config.causal).window if window else None
  return attention.Mask(causal=config.causal, window=window, sinks=settings.sinks or 0)


def visible_keys(config: ModelConfig, kind: str, seq_len: int) -> np.ndarray:
  """`[seq_len]` number of keys each position sees in a `kind` layer (no segments)."""
  return attention.visible_keys(kind_mask(config, kind), seq_len, seq_len)


def layer_module(kind: str):
  """The module class of layers of `kind` (as `transformer.Block` builds it): it holds the
  kind's counts, `attention_flops(config, kind, keys)` and `cache_bytes(config, kind, ...)`."""
  return get_layer_kind(kind).module or layers.Attention


def _layer_flops(config: ModelConfig, kind: str, keys):
  """Attention FLOPs of queries that see `keys` keys each (int or array) in a `kind` layer."""
  return layer_module(kind).attention_flops(config, kind, keys)


def attention_flops_per_token(config: ModelConfig, context: int) -> int:
  """Attention FLOPs of one token with `context` tokens in its sequence (itself included).

  Decoder: the newest token (a decode step at length `context`). Encoder: a token far from
  both ends (window clipped to `context`). DSA layers as the module docstring says.
  """
  total = 0
  for kind in config.layer_kinds:
    mask = kind_mask(config, kind)
    left, right = mask.bounds
    keys = min(context, left + right + 1)
    keys = min(context, keys + mask.sinks) if keys < context else keys  # sinks outside it
    total += int(_layer_flops(config, kind, int(keys)))
  return total


def matmul_flops_per_token(config: ModelConfig) -> int:
  """Projection FLOPs per token: 2 x (non-embedding matmul parameters + vocab projection)."""
  counts = param_counts(config)
  head = counts["head"] + (config.d_model * config.vocab_size if config.tie_embeddings else 0)
  return 2 * (counts["attention"] + counts["mlp"] + head)


def forward_flops(config: ModelConfig, seq_len: int, batch: int = 1) -> int:
  """Exact forward FLOPs of `batch` sequences of `seq_len` tokens (no segments)."""
  attn = sum(int(np.sum(_layer_flops(config, kind, visible_keys(config, kind, seq_len))))
             for kind in config.layer_kinds)
  return batch * (seq_len * matmul_flops_per_token(config) + attn)


# --- decode memory -----------------------------------------------------------------------------


def cache_bytes(config: ModelConfig, max_len: int, batch: int = 1) -> int:
  """Bytes of `Transformer(config).init_cache(batch, max_len)`, by arithmetic (nothing built).

  Each layer's module counts its own cache (`cache_bytes`): global layers `max_len` K/V
  positions, local ones a ring of `min(window, max_len)`, DSA layers every position plus the
  indexer keys, gdn layers a fixed conv tail and state; plus the 4-byte int32 `Cache.index`.
  """
  if not config.causal:
    raise ValueError("cache_bytes: only decoders (causal=True) have a KV cache.")
  return 4 + sum(layer_module(kind).cache_bytes(config, kind, batch, max_len)
                 for kind in config.layer_kinds)
