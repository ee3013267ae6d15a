"""KV-cache decoding equals the full forward pass; local layers keep O(window) cache memory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from attention.decode_xla import SCOPE
from models import cache as cache_lib
from models.config import ModelConfig
from models.kinds import KindSettings
from models.transformer import Transformer, generate

VOCAB, T, WINDOW = 64, 16, 4
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)


def tiny(pattern, **fields) -> ModelConfig:
  return ModelConfig(layer_pattern=pattern, num_layers=len(pattern),
                     kinds={"local": KindSettings(window=WINDOW)}, **TINY, **fields)


@nnx.jit
def forward(model, tokens):
  return model(tokens)[0]


@nnx.jit(static_argnums=2)
def cached_logits(model, tokens, chunk: int):
  """Feeds `tokens` `chunk` at a time through the KV cache, from empty: logits `[B, T, V]`."""
  b, t = tokens.shape
  chunks = tokens.reshape(b, t // chunk, chunk).transpose(1, 0, 2)  # steps B chunk

  def step(cache, chunk_tokens):
    logits, aux = model(chunk_tokens, cache=cache)
    return aux["cache"], logits

  cache, logits = jax.lax.scan(step, model.init_cache(b, t), chunks)  # steps B chunk V
  return logits.transpose(1, 0, 2, 3).reshape(b, t, -1), cache.index


@pytest.mark.parametrize("pattern", [("global",), ("local",), ("global", "local", "local"),
                                     ("alibi", "local")])
def test_token_by_token_decode_equals_full_forward(pattern):
  model = Transformer(tiny(pattern), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB, jnp.int32)
  decoded, index = cached_logits(model, tokens, 1)
  assert int(index) == T
  np.testing.assert_allclose(decoded, forward(model, tokens), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_with_mqa_equals_full_forward():
  """Chunks of 8 > window: the ring wraps inside a chunk, and the second chunk reads the ring."""
  config = dataclasses.replace(tiny(("global", "local")), num_kv_heads=1)
  model = Transformer(config, rngs=nnx.Rngs(2))
  tokens = jax.random.randint(jax.random.key(3), (1, T), 0, VOCAB, jnp.int32)
  decoded, _ = cached_logits(model, tokens, 8)
  np.testing.assert_allclose(decoded, forward(model, tokens), atol=1e-4, rtol=1e-4)


def test_greedy_generate_agrees_with_forward():
  """Prefill + decode steps in `generate` pick the argmax of the full forward, teacher-forced."""
  model = Transformer(tiny(("local",)), rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, VOCAB, jnp.int32)
  out = generate(model, prompt, max_new_tokens=T + 1 - 5)
  assert out.shape == (2, T + 1)
  np.testing.assert_array_equal(out[:, :5], prompt)
  greedy = jnp.argmax(forward(model, out[:, :T]), axis=-1)
  np.testing.assert_array_equal(out[:, 5:], greedy[:, 4:])


def test_local_cache_memory_does_not_grow_with_max_len():
  model = Transformer(tiny(("global", "local", "local")), rngs=nnx.Rngs(0))
  short, long = model.init_cache(2, 2 * WINDOW), model.init_cache(2, 4096)
  for layer, (a, b) in enumerate(zip(short.layers, long.layers)):
    if layer == 0:  # global: every position
      assert isinstance(b, cache_lib.FullCache) and b.k.shape[1] == 4096
    else:  # local: a ring of `window` slots
      assert isinstance(b, cache_lib.RingCache) and b.k.shape[1] == WINDOW
      assert cache_lib.nbytes(a) == cache_lib.nbytes(b)
  assert cache_lib.nbytes(long.layers[0]) > 100 * cache_lib.nbytes(long.layers[1])
  # A cache shorter than the window just holds max_len slots.
  assert model.init_cache(1, 2).layers[1].k.shape[1] == 2


def test_ring_cache_keeps_the_newest_positions_in_order():
  ring = cache_lib.RingCache.create(1, 3, 1, 1, jnp.float32)
  update = jax.jit(lambda ring, index, new: ring.update(index, new, new, jnp.zeros(new.shape[:2],
                                                                                   jnp.int32)))
  index = 0
  for chunk in ([0, 1], [2, 3, 4, 5], [6]):  # a chunk longer than the ring, then one token
    new = jnp.asarray(chunk, jnp.float32).reshape(1, -1, 1, 1)
    (k, _, seg, offset), ring = update(ring, index, new)
    index += len(chunk)
  np.testing.assert_array_equal(k[0, :, 0, 0], [3, 4, 5, 6])  # 3 cached + the new token
  assert offset == 3 and (seg >= 0).all()
  np.testing.assert_array_equal(sorted(ring.k[0, :, 0, 0]), [4, 5, 6])


def test_alibi_kind_uses_slopes_and_no_rope():
  """An "alibi" layer: reference attention of the raw (un-rotated) projections with the
  geometric slopes; positions (RoPE's input) do not change it."""
  layer = Transformer(tiny(("alibi",)), rngs=nnx.Rngs(4)).blocks[0].attn
  x = jax.random.normal(jax.random.key(5), (2, T, 32))

  @nnx.jit
  def outputs(layer, x):
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    want = attention.reference_attention(
        layer.q_proj(x), layer.k_proj(x), layer.v_proj(x), mask=attention.Mask(causal=True),
        alibi_slopes=jnp.asarray(attention.geometric_alibi_slopes(4)))
    return (layer(x, positions=positions)[0], layer(x, positions=positions + 100)[0],
            layer.o_proj(want))

  y, y_shifted, want = outputs(layer, x)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-6)
  np.testing.assert_allclose(y_shifted, y, atol=1e-5, rtol=1e-6)


def test_decode_steps_run_the_decode_path():
  """Global and local (ring cache) layers of a one-token step, and a 16-token prefill chunk,
  read their caches through flash_attention's decode path; a 17-token chunk does not."""
  model = Transformer(tiny(("global", "local")), rngs=nnx.Rngs(0))
  cache = model.init_cache(2, 64)

  def lowered(t):
    step = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache)[0])
    tokens = jnp.zeros((2, t), jnp.int32)
    return step.lower(model, tokens, cache).as_text(debug_info=True)

  assert lowered(1).count(SCOPE) >= 2 and SCOPE in lowered(16)
  assert SCOPE not in lowered(17)


def _sink_model(sink: bool = True) -> Transformer:
  """One global and one local layer with 2 attention sinks (and learned sink logits, set to
  random values so that they matter)."""
  config = ModelConfig(layer_pattern=("global", "local"), num_layers=2, **TINY,
                       kinds={"local": KindSettings(window=WINDOW, sinks=2, sink=sink),
                              "global": KindSettings(sink=sink)})
  model = Transformer(config, rngs=nnx.Rngs(5))
  if sink:
    for i, block in enumerate(model.blocks):
      block.attn.sink_logits[...] = jax.random.normal(jax.random.key(10 + i), (4,))
  return model


@pytest.mark.parametrize("chunk", [1, 8])
def test_sink_layers_decode_equals_full_forward(chunk):
  """Token by token and in chunks of 8 > window (sinks written inside a chunk, and read back
  for queries beyond the window): the sink ring cache equals the forward's Mask(sinks=2)."""
  model = _sink_model()
  tokens = jax.random.randint(jax.random.key(6), (2, T), 0, VOCAB, jnp.int32)
  decoded, _ = cached_logits(model, tokens, chunk)
  np.testing.assert_allclose(decoded, forward(model, tokens), atol=1e-4, rtol=1e-4)


def test_sink_cache_is_constant_size():
  model = _sink_model(sink=False)
  short, long = model.init_cache(1, 2 * WINDOW), model.init_cache(1, 4096)
  cache = long.layers[1]
  assert isinstance(cache, cache_lib.SinkRingCache)
  assert cache.k.shape[1] == 2 and cache.ring.k.shape[1] == WINDOW
  assert cache_lib.nbytes(short.layers[1]) == cache_lib.nbytes(cache)
