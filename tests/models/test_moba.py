"""The "moba" layer kind: decoding equals the forward pass, the hybrid's last layers, FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import flops
from models.config import ModelConfig
from models.kinds import KindSettings
from models.moba import moba_kind
from models.transformer import Transformer
from tests.models.test_decode import cached_logits, forward

VOCAB, T = 64, 16
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)


def moba_config(**fields) -> ModelConfig:
  fields = dict(dict(layer_pattern=("moba",), num_layers=2), **fields)
  return ModelConfig(kinds={"moba": moba_kind(block_size=4, top_k_blocks=2)}, **TINY, **fields)


def test_decode_equals_forward():
  """Token by token: each new token gates over the whole cache."""
  model = Transformer(moba_config(num_layers=1), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB, jnp.int32)
  decoded, _ = cached_logits(model, tokens, 1)
  np.testing.assert_allclose(decoded, forward(model, tokens), atol=1e-4, rtol=1e-4)


def test_last_layers_replace_the_pattern_at_the_end():
  config = moba_config(num_layers=5, layer_pattern=("moba", "local"),
                       last_layers=("global", "global"))
  assert config.layer_kinds == ("moba", "local", "moba", "global", "global")
  with pytest.raises(ValueError, match="last_layers must be a tuple of at most num_layers"):
    moba_config(last_layers=("global",) * 3)
  with pytest.raises(ValueError, match="unknown layer kind 'nope'"):
    moba_config(last_layers=("nope",))


def test_refuses_windows_and_unknown_options():
  with pytest.raises(ValueError, match=r"\(MoBA\) needs a causal model and window=0"):
    Transformer(ModelConfig(layer_pattern=("moba",), kinds={"moba": KindSettings(window=8)},
                            **TINY), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown MoBA option\(s\) \['top_k'\]"):
    moba_kind(top_k=3)


def test_attention_flops_count_the_selected_keys_and_the_gate():
  """Newest token at context c: its own block's keys, min(top, complete blocks) full blocks, and
  one gate dot product per complete block and kv head."""
  config = moba_config()  # block 4, top 2; 4 heads x 8 dims, 2 kv heads
  per_key, gate = 4 * 4 * 8, 2 * 2 * 8
  for c, attended, blocks in ((1, 1, 0), (4, 4, 0), (5, 5, 1), (11, 11, 2), (13, 9, 3),
                              (100, 12, 24)):
    want = 2 * (per_key * attended + gate * blocks)  # two moba layers
    assert flops.attention_flops_per_token(config, c) == want, c


def test_selection_recall_of_the_dense_top_blocks_matches_numpy():
  """Per kv head and query with a complete past block: the share of the top `top_k_blocks`
  past blocks by dense attention mass (the group's heads summed) that the gate picks."""
  from models.moba import MobaAttention  # pylint: disable=g-import-not-at-top
  module = MobaAttention(moba_config(), "moba", rngs=nnx.Rngs(0))
  b, t, n, kh, h, bs, top = 2, T, 4, 2, 8, 4, 2
  keys = jax.random.split(jax.random.key(3), 2)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, t, kh, h))
  got = float(module.block_recall(q, k, module.mask()))
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  means = kn.reshape(b, t // bs, bs, kh, h).mean(2)  # B nb K H
  hits, rows = 0.0, 0
  for bi, ti, g in np.ndindex(b, t, kh):
    past = ti // bs
    if past == 0:
      continue
    group = qn[bi, ti, g * 2:(g + 1) * 2]  # G H
    logits = group @ kn[bi, :ti + 1, g].T / np.sqrt(h)  # G S
    p = np.exp(logits - logits.max(-1, keepdims=True))
    mass = (p / p.sum(-1, keepdims=True)).sum(0)
    mass = np.pad(mass, (0, t - ti - 1)).reshape(-1, bs).sum(-1)[:past]
    dense_top = set(np.argsort(-mass, kind="stable")[:min(top, past)])
    gate = means[bi, :past, g] @ group.sum(0)
    gated = set(np.argsort(-gate, kind="stable")[:top])
    hits += len(dense_top & gated) / len(dense_top)
    rows += 1
  assert got == pytest.approx(hits / rows, abs=1e-6)
  assert 0 < got < 1
