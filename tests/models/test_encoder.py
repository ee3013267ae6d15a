"""The ModernBERT encoder (`ModelConfig.modernbert`): bidirectional, windowed, document-masked.

Each test changes one input token and checks which output positions' logits move: an encoder
sees the future, a local layer sees `window // 2` tokens each side, and nothing crosses a
document boundary. The logits of the flash/local kinds equal those of the dense reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ModelConfig
from models.kinds import KindSettings
from models.transformer import Transformer
from tests.helpers import assert_close

VOCAB, T, WINDOW = 257, 32, 8  # WINDOW 8 = 4 keys each side (ModernBERT: 128 = 64 + 64)
PATTERNS = {"alternating": ("global", "local", "local"), "global": ("global",),
            "local": ("local",)}


@functools.lru_cache(maxsize=None)  # one model (and one compiled forward) per pattern
def encoder(pattern, num_layers=3, attention=None):
  kinds = {"global": KindSettings(attention=attention or "flash", rope_theta=160_000.0),
           "local": KindSettings(attention=attention or "local", window=WINDOW,
                                 rope_theta=10_000.0)}
  config = ModelConfig.modernbert(vocab_size=VOCAB, d_model=32, num_heads=2, mlp_dim=64,
                                  num_layers=num_layers, layer_pattern=pattern, kinds=kinds)
  return Transformer(config, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, tokens, segment_ids):
  return model(tokens, segment_ids=segment_ids)[0]


def moved(model, tokens, segment_ids, at):
  """Per position: do its logits change when token `at` changes? `[T]` bool."""
  before = forward(model, tokens, segment_ids)
  after = forward(model, tokens.at[:, at].set((tokens[:, at] + 1) % VOCAB), segment_ids)
  return np.asarray(jnp.abs(after - before).max(axis=(0, 2)) > 1e-6)


@pytest.fixture(scope="module")
def inputs():
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB, jnp.int32)
  return tokens, jnp.zeros((2, T), jnp.int32)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_encoder_sees_the_future_within_its_reach(name, inputs):
  """Changing token 20 changes earlier logits: all of them through a global layer, only those
  within the stacked windows (3 layers x 4 each side = 12) with local layers alone."""
  tokens, segments = inputs
  changed = moved(encoder(PATTERNS[name]), tokens, segments, at=20)
  reach = np.abs(np.arange(T) - 20) <= 3 * WINDOW // 2
  assert changed[20 - 3] and changed[20 + 3]  # both directions
  if name == "local":
    np.testing.assert_array_equal(changed, reach)
  else:
    assert changed.all()


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_encoder_never_crosses_a_document_boundary(name, inputs):
  """Rows of two packed documents and padding: changing a token of one document (or of the
  padding) leaves every logit of the other document unchanged, exactly."""
  tokens, _ = inputs
  segments = jnp.asarray([[0] * 12 + [1] * 16 + [-1] * 4] * 2, jnp.int32)
  model = encoder(PATTERNS[name])
  first, second = np.arange(T) < 12, (np.arange(T) >= 12) & (np.arange(T) < 28)
  changed = moved(model, tokens, segments, at=13)  # 1 token past the boundary
  assert not changed[first].any() and changed[12:16].all()
  changed = moved(model, tokens, segments, at=11)
  assert not changed[second].any() and changed[8:12].all()
  assert not moved(model, tokens, segments, at=30)[:28].any()  # padding reaches nothing


def test_modernbert_layers_and_thetas():
  config = ModelConfig.modernbert()
  assert [i for i, kind in enumerate(config.layer_kinds) if kind == "global"] == [
      i for i in range(22) if i % 3 == 0]
  assert config.kind_settings("local").window == 128 and not config.causal
  assert config.rope("global").theta == 160_000.0 and config.rope("local").theta == 10_000.0


@pytest.mark.parametrize("name", ["alternating"])
def test_encoder_logits_equal_the_dense_reference(name, inputs):
  """Flash (global) and local kinds == the "dense" reference attention, packed documents."""
  tokens, _ = inputs
  segments = jnp.asarray([[0] * 20 + [1] * 12, [0] * 5 + [1] * 25 + [-1] * 2], jnp.int32)
  fast = forward(encoder(PATTERNS[name]), tokens, segments)
  dense = forward(encoder(PATTERNS[name], attention="dense"), tokens, segments)
  valid = np.asarray(segments >= 0)
  assert_close(np.asarray(fast)[valid], np.asarray(dense)[valid])
