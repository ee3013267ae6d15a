"""Parameter and FLOP counts from a `ModelConfig`, without building the model.

Conventions: a multiply-add is 2 FLOPs; forward pass only (training ~ 3x); norms, RoPE, softmax
and activations are not counted (they are O(D) or O(S) per token against O(D^2) or O(S * D)).

* Matmul FLOPs per token: `2 * (projection parameters)`, the vocabulary projection included
  (tied or not), the embedding lookup excluded.
* Attention FLOPs per token: per layer `4 * num_heads * head_dim * visible_keys`
  (`q k^T` and `p v`), where `visible_keys` is what the layer kind's mask lets one token see.
"""

from __future__ import annotations

import numpy as np

import attention
from models.config import ModelConfig


def param_counts(config: ModelConfig) -> dict[str, int]:
  """Parameters by group: embedding, attention, mlp, norms, head, and total / non_embedding."""
  d, n, kh, h, f = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                    config.mlp_dim)
  layers = config.num_layers
  counts = {
      "embedding": config.vocab_size * d,
      "attention": layers * (2 * d * n * h + 2 * d * kh * h),  # q, o and k, v
      "mlp": layers * 3 * d * f,  # fused gate+up (D x 2F) and down (F x D)
      "norms": (2 * layers + 1 + config.mlm_head) * d,  # scales only (no biases)
      "head": (config.mlm_head * d * d
               + (0 if config.tie_embeddings else d * config.vocab_size)),
  }
  counts["total"] = sum(counts.values())
  counts["non_embedding"] = counts["total"] - counts["embedding"]
  return counts


def _bounds(config: ModelConfig, kind: str) -> tuple[float, float]:
  """(left, right) reach of a query in layers of `kind` (inf = unbounded)."""
  window = config.kind_settings(kind).window
  left, right = (attention.local_mask(window, causal=config.causal).window if window
                 else (np.inf, np.inf))
  return left, (0 if config.causal else right)


def visible_keys(config: ModelConfig, kind: str, seq_len: int) -> np.ndarray:
  """`[seq_len]` number of keys each position sees in a `kind` layer (no segments)."""
  left, right = _bounds(config, kind)
  t = np.arange(seq_len, dtype=np.float64)
  first = np.maximum(t - left, 0)
  last = np.minimum(t + right, seq_len - 1)
  return (last - first + 1).astype(np.int64)


def attention_flops_per_token(config: ModelConfig, context: int) -> int:
  """Attention FLOPs of one token with `context` tokens in its sequence (itself included).

  Decoder: the newest token (a decode step at length `context`). Encoder: a token far from
  both ends (window clipped to `context`).
  """
  per_key = 4 * config.num_heads * config.head_dim
  total = 0
  for kind in config.layer_kinds:
    left, right = _bounds(config, kind)
    total += per_key * int(min(context, left + right + 1))
  return total


def matmul_flops_per_token(config: ModelConfig) -> int:
  """Projection FLOPs per token: 2 x (non-embedding matmul parameters + vocab projection)."""
  counts = param_counts(config)
  head = counts["head"] + (config.d_model * config.vocab_size if config.tie_embeddings else 0)
  return 2 * (counts["attention"] + counts["mlp"] + head)


def forward_flops(config: ModelConfig, seq_len: int, batch: int = 1) -> int:
  """Exact forward FLOPs of `batch` sequences of `seq_len` tokens (no segments)."""
  per_key = 4 * config.num_heads * config.head_dim
  attn = sum(per_key * int(visible_keys(config, kind, seq_len).sum())
             for kind in config.layer_kinds)
  return batch * (seq_len * matmul_flops_per_token(config) + attn)
