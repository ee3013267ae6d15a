"""The gdn layer kind: its formula, packed documents, decode == forward, fixed-size cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from models import cache as cache_lib
from models import flops, gdn_kind
from models.config import ModelConfig
from models.gdn import GatedDeltaNet, GdnCache
from models.kinds import KindSettings
from models.transformer import Transformer

VOCAB, T = 64, 16
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
HYBRID = ("gdn", "gdn", "gdn", "global")


def tiny(pattern=HYBRID, **options) -> ModelConfig:
  return ModelConfig(layer_pattern=pattern, num_layers=len(pattern), **TINY,
                     kinds={"gdn": gdn_kind(chunk_size=4, **options)})


def layer_by_hand(layer: GatedDeltaNet, x, segment_ids):
  """The module docstring's formula with a numpy convolution and the per-token reference."""
  s = layer.settings
  b, t, _ = x.shape
  proj = [np.asarray(p(x)).reshape(b, t, -1) for p in (layer.q_proj, layer.k_proj, layer.v_proj)]
  flat, w = np.concatenate(proj, axis=-1), np.asarray(layer.conv[...])
  ids = np.asarray(segment_ids)
  conv = np.zeros_like(flat)
  for i in range(t):
    for j in range(s.conv_width):  # weight[W - 1 - j] reads token i - j
      if i - j >= 0 and ids[:, i - j].tolist() == ids[:, i].tolist():
        conv[:, i] += flat[:, i - j] * w[s.conv_width - 1 - j]
  mixed = jax.nn.silu(jnp.asarray(conv))
  qk = s.key_heads * s.key_dim
  q = mixed[..., :qk].reshape(b, t, s.key_heads, s.key_dim)
  k = mixed[..., qk:2 * qk].reshape(b, t, s.key_heads, s.key_dim)
  v = mixed[..., 2 * qk:].reshape(b, t, s.value_heads, s.value_dim)
  beta = jax.nn.sigmoid(layer.b_proj(x))
  g = -jnp.exp(layer.A_log[...]) * jax.nn.softplus(layer.a_proj(x) + layer.dt_bias[...])
  o = attention.gated_delta_reference(q, k, v, g, beta, segment_ids=segment_ids)
  z = layer.z_proj(x)
  normed = o * jax.lax.rsqrt(jnp.mean(o * o, -1, keepdims=True) + 1e-6)
  return layer.o_proj(normed * layer.o_norm.scale[...] * jax.nn.silu(z))


def test_layer_is_the_formula_and_documents_do_not_leak():
  """Three documents packed in a row: equals the formula (conv and state per document), and
  changing the first document's inputs changes none of the later documents' outputs."""
  config = tiny(("gdn",), key_heads=1, value_heads=2, key_dim=8, value_dim=4)
  layer = GatedDeltaNet(config, "gdn", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 11, 32))
  ids = jnp.asarray([[0] * 5 + [1] * 2 + [2] * 4], jnp.int32)
  apply = nnx.jit(lambda layer, x, ids: layer(x, segment_ids=ids))
  y, cache, aux = apply(layer, x, ids)
  assert cache is None and aux == {} and y.shape == x.shape
  np.testing.assert_allclose(y, layer_by_hand(layer, x, ids), atol=1e-5, rtol=1e-5)
  other = apply(layer, x.at[:, :5].set(jax.random.normal(jax.random.key(2), (1, 5, 32))), ids)[0]
  assert np.abs(other[:, :5] - y[:, :5]).max() > 1e-3
  np.testing.assert_allclose(other[:, 5:], y[:, 5:], atol=1e-6, rtol=0)


@nnx.jit
def forward(model, tokens, segment_ids, positions):
  return model(tokens, segment_ids=segment_ids, positions=positions)[0]


@nnx.jit(static_argnums=4)
def cached_logits(model, tokens, segment_ids, positions, chunk: int):
  """Feeds `tokens` `chunk` at a time through the cache, from empty: logits `[B, T, V]`."""
  b, t = tokens.shape
  split = lambda a: a.reshape(b, t // chunk, chunk).transpose(1, 0, 2)  # steps B chunk

  def step(cache, xs):
    logits, aux = model(xs[0], segment_ids=xs[1], positions=xs[2], cache=cache)
    return aux["cache"], logits

  cache, logits = jax.lax.scan(step, model.init_cache(b, t),
                               (split(tokens), split(segment_ids), split(positions)))
  return logits.transpose(1, 0, 2, 3).reshape(b, t, -1), cache


@pytest.mark.parametrize("chunk", [1, 8])
def test_decode_equals_full_forward_with_packed_documents(chunk):
  """Token by token (`gated_delta_step`) and in chunks of 8 (chunkwise form from the carried
  state, chunk_size 4): the logits of the full forward, documents restarting mid-stream."""
  model = Transformer(tiny(("gdn", "global")), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB, jnp.int32)
  ids = jnp.asarray([[0] * T, [0] * 6 + [1] * 10], jnp.int32)  # row 1: a new document at 6
  positions = jnp.asarray([np.arange(T), np.r_[np.arange(6), np.arange(10)]], jnp.int32)
  decoded, cache = cached_logits(model, tokens, ids, positions, chunk)
  np.testing.assert_allclose(decoded, forward(model, tokens, ids, positions), atol=1e-4,
                             rtol=1e-4)
  assert isinstance(cache.layers[0], GdnCache) and int(cache.index) == T


def test_cache_is_fixed_size_and_cache_bytes_is_exact():
  model = Transformer(tiny(), rngs=nnx.Rngs(0))
  short, long = model.init_cache(2, 8), model.init_cache(2, 4096)
  assert cache_lib.nbytes(short.layers[0]) == cache_lib.nbytes(long.layers[0])
  conv, state = long.layers[0].conv, long.layers[0].state
  assert conv.shape == (2, 3, 2 * 2 * 8 + 4 * 8) and state.shape == (2, 4, 8, 8)  # W - 1 = 3
  configs = [tiny(), tiny(("global", "local")), tiny(("gdn",), conv_width=1),
             ModelConfig(layer_pattern=("dsa", "local"), num_layers=2, dtype="bfloat16", **TINY,
                         kinds={"dsa": KindSettings(options=dict(top_k=4, fp8=True))}),
             ModelConfig(layer_pattern=("dsa",), num_layers=1, **TINY,
                         kinds={"dsa": KindSettings(options=dict(index_dim=16))}),
             ModelConfig(layer_pattern=("local",), num_layers=1, **TINY,
                         kinds={"local": KindSettings(window=6, sinks=4)})]
  for config in configs:
    built = nnx.eval_shape(lambda c=config: Transformer(c, rngs=nnx.Rngs(0)))
    for max_len in (8, 1000):
      assert flops.cache_bytes(config, max_len, batch=3) == cache_lib.nbytes(
          built.init_cache(3, max_len)), (config.layer_pattern, max_len)


def test_flops_count_the_recurrence_and_the_parameters():
  config = tiny(("gdn", "global"), value_heads=4, key_dim=8, value_dim=8)
  recurrence, per_key = 6 * 4 * 8 * 8, 4 * 4 * 8
  assert flops.attention_flops_per_token(config, 1000) == recurrence + per_key * 1000
  assert flops.forward_flops(config, 5) == (5 * flops.matmul_flops_per_token(config)
                                            + 5 * recurrence + per_key * 15)
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  total = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  assert flops.param_counts(config)["total"] == total
  # q, k (2 x 32 x 2 x 8), v, z (2 x 32 x 4 x 8), beta, a (2 x 32 x 4), conv (4 x 64 channels),
  # A_log, dt_bias (2 x 4), output (32 x 32): the gdn layer's "attention" group; then the
  # global layer's q, o (32 x 32) and k, v (32 x 2 x 8).
  gdn = 2 * 32 * 16 + 2 * 32 * 32 + 2 * 32 * 4 + 4 * 64 + 2 * 4 + 32 * 32
  assert flops.param_counts(config)["attention"] == gdn + 2 * 32 * 32 + 2 * 32 * 16


def test_gradients_reach_every_gdn_parameter():
  model = Transformer(tiny(("gdn",)), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (1, 8), 0, VOCAB, jnp.int32)
  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens)[0] ** 2)))(model)
  layer = grads.blocks[0].attn
  for name in ("q_proj", "k_proj", "v_proj", "z_proj", "b_proj", "a_proj", "conv", "A_log",
               "dt_bias", "o_norm", "o_proj"):
    leaves = jax.tree_util.tree_leaves(getattr(layer, name))
    assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves), name


def test_refusals():
  one = dict(**TINY, layer_pattern=("gdn",), num_layers=1)
  with pytest.raises(ValueError, match="encoder"):
    Transformer(ModelConfig(**one, causal=False), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cannot take"):
    ModelConfig(**one, kinds={"gdn": KindSettings(window=8)})
  with pytest.raises(ValueError, match="multiple of key_heads"):
    Transformer(ModelConfig(**one, kinds={"gdn": gdn_kind(value_heads=3)}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown gdn option\(s\)"):
    gdn_kind(width=4)
  with pytest.raises(ValueError, match="chunk_size"):
    gdn_kind(chunk_size=6)


def test_training_step_with_the_pallas_kernels_lowers_for_cuda():
  """A bf16 gdn model's gradient with implementation="pallas" lowers for CUDA without a GPU:
  the forward and backward Triton kernels of the chunkwise rule are in it."""
  config = ModelConfig(**{**TINY, "num_layers": 1}, layer_pattern=("gdn",), dtype="bfloat16",
                       kinds={"gdn": gdn_kind(implementation="pallas", chunk_size=16)})
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  loss = lambda state, tokens: jnp.mean(nnx.merge(graphdef, state)(tokens)[0])
  tokens = jax.ShapeDtypeStruct((1, 40), jnp.int32)  # 40: not a multiple of the chunk
  text = jax.jit(jax.grad(loss)).trace(state, tokens).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") == 2
