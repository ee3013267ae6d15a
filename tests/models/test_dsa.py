"""The "dsa" layer kind: decode equals forward, dense equivalence at top_k >= T, KL, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attention
from models import KindSettings, ModelConfig, Transformer, dsa
from models import cache as cache_lib
from tests.models.test_decode import cached_logits, forward

VOCAB, T = 64, 16
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)


def dsa_config(pattern=("dsa", "global"), **options) -> ModelConfig:
  options = dict(dict(top_k=5, index_heads=2, index_dim=8), **options)
  return ModelConfig(layer_pattern=pattern, num_layers=len(pattern),
                     kinds={"dsa": KindSettings(options=options)}, **TINY)


def tokens(seed=1, batch=2, length=T):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


@pytest.mark.parametrize("stage,fp8", [("sparse", False), ("dense", False), ("sparse", True)])
def test_token_by_token_decode_equals_full_forward(stage, fp8):
  """top_k=5 < T: later tokens really choose; each decode step selects over the whole cache.
  With fp8 (Hadamard on) the cache holds float8 indexer keys; the forward quantises the same."""
  model = Transformer(dsa_config(stage=stage, fp8=fp8), rngs=nnx.Rngs(0))
  x = tokens()
  decoded, index = cached_logits(model, x, 1)
  assert int(index) == T
  np.testing.assert_allclose(decoded, forward(model, x), atol=1e-4, rtol=1e-4)


def test_fp8_cache_holds_indexer_keys_in_a_quarter_of_the_bytes():
  """Allocated decode cache: float8 keys + one float32 scale per 32 dims vs float32 keys."""
  def index_key_bytes(fp8):
    config = dsa_config(pattern=("dsa",), fp8=fp8, index_dim=32, fp8_pow2=fp8)
    model = Transformer(config, rngs=nnx.Rngs(0))
    cache = model.init_cache(2, 1024)
    index_k = cache.layers[0].index_k
    if fp8:
      assert index_k.values.dtype == jnp.float8_e4m3fn and index_k.scale.shape == (2, 1024, 1)
    return cache_lib.nbytes(index_k)
  ratio = index_key_bytes(True) / index_key_bytes(False)
  assert ratio == (32 + 4) / (32 * 4), ratio


def test_top_k_at_least_length_equals_dense_causal():
  """Same parameters (same seed and structure); sparse with top_k >= T vs the dense stage."""
  sparse = Transformer(dsa_config(top_k=T, stage="sparse"), rngs=nnx.Rngs(3))
  dense = Transformer(dsa_config(top_k=T, stage="dense"), rngs=nnx.Rngs(3))
  x = tokens(4)
  np.testing.assert_allclose(forward(sparse, x), forward(dense, x), atol=1e-5, rtol=1e-5)


def test_top_k_below_length_differs_from_dense():
  sparse = Transformer(dsa_config(top_k=3, stage="sparse"), rngs=nnx.Rngs(3))
  dense = Transformer(dsa_config(top_k=3, stage="dense"), rngs=nnx.Rngs(3))
  x = tokens(4)
  assert not np.allclose(forward(sparse, x), forward(dense, x), atol=1e-3)


@nnx.jit
def layer_kls(model, x):
  return [layer.get("indexer_kl") for layer in model(x)[1]["layers"]]


def test_kl_in_aux_and_zero_when_indexer_matches_target():
  """top_k=1: the selected-set distributions of indexer and target are both one-hot -> KL 0."""
  kls = layer_kls(Transformer(dsa_config(top_k=1), rngs=nnx.Rngs(0)), tokens())
  assert kls[1] is None  # the global layer reports nothing
  np.testing.assert_allclose(kls[0], 0.0, atol=1e-6)
  for stage in ("dense", "sparse"):
    kl = layer_kls(Transformer(dsa_config(stage=stage), rngs=nnx.Rngs(0)), tokens())[0]
    assert np.isfinite(kl) and kl > 1e-4


def _loss_grads(model, x, which):
  def loss(model):
    logits, aux = model(x)
    lm = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()
    return lm if which == "lm" else dsa.indexer_kl(aux)
  return nnx.grad(loss)(model)


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_lm_loss_never_reaches_indexer_and_kl_never_reaches_main(stage):
  model = Transformer(dsa_config(stage=stage), rngs=nnx.Rngs(0))
  x = tokens()
  grads = nnx.jit(_loss_grads, static_argnums=2)
  norm = lambda g, f: optax.tree.norm(nnx.state(g, f))
  lm, kl = grads(model, x, "lm"), grads(model, x, "kl")
  assert float(norm(lm, dsa.INDEXER_PARAMS)) == 0.0
  assert float(norm(kl, dsa.MAIN_PARAMS)) == 0.0
  assert float(norm(lm, dsa.MAIN_PARAMS)) > 0.0
  assert float(norm(kl, dsa.INDEXER_PARAMS)) > 0.0


def test_indexer_scores_match_numpy_formula_from_raw_projections():
  """I[t, s] = sum_j w[t, j] ReLU(q_I[t, j] . k_I[s]), w = (x W_w) H_I^-0.5 d_I^-0.5 (spec),
  q_I = x W_q, k_I = LayerNorm(x W_k); rope_dims=0, so no RoPE enters the NumPy side."""
  model = Transformer(dsa_config(rope_dims=0, index_heads=3, index_dim=16), rngs=nnx.Rngs(5))
  ix = model.blocks[0].attn.indexer
  ix.k_norm.scale[...] = 1.0 + jax.random.normal(jax.random.key(8), ix.k_norm.scale.shape)
  ix.k_norm.bias[...] = jax.random.normal(jax.random.key(9), ix.k_norm.bias.shape)
  x = jax.random.normal(jax.random.key(7), (2, T, TINY["d_model"]))
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  got = attention.indexer_scores(*ix(x, positions))
  xn = np.asarray(x, np.float64)
  p = lambda a: np.asarray(a[...], np.float64)
  q = np.einsum("btd,dje->btje", xn, p(ix.wq.kernel))
  kk = xn @ p(ix.wk.kernel)
  mean, var = kk.mean(-1, keepdims=True), kk.var(-1, keepdims=True)
  k_i = (kk - mean) / np.sqrt(var + model.config.norm_eps) * p(ix.k_norm.scale) + p(ix.k_norm.bias)
  w = (xn @ p(ix.ww.kernel)) * 3 ** -0.5 * 16 ** -0.5
  want = np.einsum("btj,btjs->bts", w, np.maximum(np.einsum("btje,bse->btjs", q, k_i), 0))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_partial_rope_and_settings_validation():
  settings = dsa.DsaSettings(index_dim=8)
  assert settings.rope_dims == 4
  with pytest.raises(ValueError, match="unknown DSA option"):
    Transformer(dsa_config(topk=4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="power-of-two index_dim, got 24"):
    dsa.DsaSettings(index_dim=24, fp8=True)
  assert not dsa.DsaSettings(index_dim=24, fp8=True, hadamard=False).hadamard
  with pytest.raises(ValueError, match="block 16 must divide the last axis .d_I = 24"):
    dsa.DsaSettings(index_dim=24, fp8=True, hadamard=False, fp8_block=16)
  with pytest.raises(ValueError, match="stage"):
    dsa.DsaSettings(stage="warmup")
  with pytest.raises(ValueError, match="rope_dims"):
    dsa.DsaSettings(index_dim=8, rope_dims=3)
  windowed = ModelConfig(layer_pattern=("dsa",), num_layers=1,
                         kinds={"dsa": KindSettings(window=4)}, **TINY)
  with pytest.raises(ValueError, match="window=0"):
    Transformer(windowed, rngs=nnx.Rngs(0))


@nnx.jit
def layer_recalls(model, x):
  return [layer.get("indexer_recall") for layer in model(x)[1]["layers"]]


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_recall_report(stage):
  """`recall`: share of dense attention mass on the selected keys; 1 once top_k >= T."""
  def recalls(top_k):
    model = Transformer(dsa_config(top_k=top_k, stage=stage), rngs=nnx.Rngs(0))
    assert dsa.set_recall(model) == 1
    values = layer_recalls(model, tokens())
    dsa.set_recall(model, False)
    assert layer_recalls(model, tokens())[0] is None
    return values
  partial, full = recalls(3), recalls(T)
  assert partial[1] is None and 0.0 < float(partial[0]) < 1.0
  np.testing.assert_allclose(full[0], 1.0, atol=1e-5)
  # Recall grows with the budget: top-3 < top-8 (the top-3 set is inside the top-8 set).
  assert float(partial[0]) < float(recalls(8)[0])
