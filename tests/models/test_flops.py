"""Parameter and FLOP counts: against the built model and hand-computed cases."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from models import dsa_kind, flops
from models.config import ModelConfig
from models.kinds import KindSettings
from models.transformer import Transformer

TINY = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)


@pytest.mark.parametrize("fields", [
    dict(layer_pattern=("global", "local"), num_layers=3),
    dict(causal=False, mlm_head=True, norm="layer", tie_embeddings=False),
    dict(layer_pattern=("dsa", "global"), num_layers=2, kinds={"dsa": dsa_kind(top_k=4)}),
])
def test_param_counts_match_the_model(fields):
  config = ModelConfig(**{**TINY, **fields})
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))  # shapes only
  actual = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  counts = flops.param_counts(config)
  assert counts["total"] == actual
  assert counts["non_embedding"] == actual - 64 * 32


def test_attention_flops_per_token():
  config = ModelConfig(**TINY, num_layers=3, layer_pattern=("global", "local", "local"),
                       kinds={"local": KindSettings(window=16)})
  per_key = 4 * 4 * 8  # 4 heads x head_dim 8, q.k and p.v
  assert flops.attention_flops_per_token(config, 1000) == per_key * (1000 + 16 + 16)
  assert flops.attention_flops_per_token(config, 10) == per_key * 30
  encoder = ModelConfig(**TINY, causal=False, layer_pattern=("local",),
                        kinds={"local": KindSettings(window=16)}, num_layers=1)
  assert flops.attention_flops_per_token(encoder, 1000) == per_key * 17  # 8 each side + self
  sinks = ModelConfig(**TINY, num_layers=1, layer_pattern=("local",),
                      kinds={"local": KindSettings(window=16, sinks=4)})
  assert flops.attention_flops_per_token(sinks, 1000) == per_key * 20  # window + 4 sinks
  assert flops.attention_flops_per_token(sinks, 18) == per_key * 18
  np.testing.assert_array_equal(flops.visible_keys(sinks, "local", 22)[15:],
                                [16, 17, 18, 19, 20, 20, 20])


def test_forward_flops_sums_visible_keys_exactly():
  config = ModelConfig(**TINY, num_layers=2, layer_pattern=("global", "local"),
                       kinds={"local": KindSettings(window=3)})
  np.testing.assert_array_equal(flops.visible_keys(config, "local", 5), [1, 2, 3, 3, 3])
  np.testing.assert_array_equal(flops.visible_keys(config, "global", 5), [1, 2, 3, 4, 5])
  per_key, matmul = 4 * 4 * 8, flops.matmul_flops_per_token(config)
  assert matmul == 2 * (2 * (2 * 32 * 32 + 2 * 32 * 16) + 2 * 3 * 32 * 64 + 32 * 64)
  assert flops.forward_flops(config, 5, batch=2) == 2 * (5 * matmul + per_key * (12 + 15))


def test_sparse_dsa_layers_count_top_k_keys_and_the_indexer():
  dsa = dsa_kind(top_k=4, index_heads=2, index_dim=8, stage="sparse")
  config = ModelConfig(**TINY, num_layers=2, layer_pattern=("dsa", "global"), kinds={"dsa": dsa})
  per_key, index_per_key = 4 * 4 * 8, 2 * 2 * 8
  assert flops.attention_flops_per_token(config, 100) == (
      per_key * 4 + index_per_key * 100) + per_key * 100
  matmul = flops.matmul_flops_per_token(config)
  keys = np.arange(1, 7)  # causal: query i sees i + 1 keys
  sparse = per_key * np.minimum(keys, 4).sum() + index_per_key * keys.sum()
  assert flops.forward_flops(config, 6) == 6 * matmul + sparse + per_key * keys.sum()
  warmup = ModelConfig(**{**TINY, "num_layers": 1, "layer_pattern": ("dsa",),
                          "kinds": {"dsa": dsa_kind(top_k=4, stage="dense")}})
  assert flops.attention_flops_per_token(warmup, 100) == per_key * 100  # dense attention
