"""Transformer forward: causality per layer kind, packed documents, user attention, bf16, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attention
from models.config import ModelConfig
from models.kinds import KindSettings
from models.transformer import Transformer, positions_from_segments
from tests.helpers import assert_close

VOCAB, T = 64, 16
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
LOCAL4 = {"local": KindSettings(window=4)}


def tiny(pattern=("global",), num_layers=None, **fields) -> ModelConfig:
  fields = {**TINY, "kinds": LOCAL4, **fields}
  return ModelConfig(layer_pattern=pattern, num_layers=num_layers or len(pattern), **fields)


@nnx.jit
def forward(model, tokens, segment_ids=None):
  return model(tokens, segment_ids=segment_ids)[0]


def random_tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


@pytest.mark.parametrize("pattern", [("global",), ("local",), ("global", "local", "local")])
def test_decoder_is_causal(pattern):
  model = Transformer(tiny(pattern), rngs=nnx.Rngs(0))
  tokens = random_tokens(1, (2, T))
  changed = tokens.at[:, 9:].set(random_tokens(2, (2, T - 9)))
  before, after = forward(model, tokens), forward(model, changed)
  np.testing.assert_array_equal(before[:, :9], after[:, :9])
  assert not np.allclose(before[:, 9:], after[:, 9:])


def test_positions_restart_per_document():
  seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
def test_packed_documents_equal_running_each_alone(causal):
  """Two 7-token documents and 2 padding tokens packed in one row == a batch of the two alone."""
  model = Transformer(tiny(("global", "local"), causal=causal, mlm_head=not causal),
                      rngs=nnx.Rngs(0))
  docs = random_tokens(3, (2, 7))
  tokens = jnp.concatenate([docs[0], docs[1], jnp.zeros(2, jnp.int32)])[None]  # 1 T
  segment_ids = jnp.asarray([[0] * 7 + [1] * 7 + [-1] * 2], jnp.int32)
  packed = forward(model, tokens, segment_ids)[0, :14].reshape(2, 7, VOCAB)
  alone = forward(model, docs)
  assert_close(packed, alone)
  # The encoder sees the future, the decoder does not.
  changed = forward(model, docs.at[:, -1].set(docs[:, -1] + 1))
  assert np.allclose(changed[:, 0], alone[:, 0]) == causal


def test_user_registered_attention_needs_no_model_change(monkeypatch):
  # Registrations made here are undone after the test (the registry dict is restored).
  monkeypatch.setattr(attention.registry, "_REGISTRY", dict(attention.registry._REGISTRY))
  calls = []

  @attention.register("test_counting_dense", overwrite=True)
  def counting_dense(q, k, v, *, mask=None, scale=None):
    calls.append(mask.window)
    return attention.reference_attention(q, k, v, mask=mask, scale=scale)

  config = tiny(("global", "local"))
  custom = tiny(("global", "local"),
                kinds={"global": KindSettings(attention="test_counting_dense"),
                       "local": KindSettings(attention="test_counting_dense", window=4)})
  tokens = random_tokens(4, (2, 7))
  expected = forward(Transformer(config, rngs=nnx.Rngs(0)), tokens)
  actual = forward(Transformer(custom, rngs=nnx.Rngs(0)), tokens)
  assert calls == [None, (3, 0)]  # traced once: the window reaches it through the Mask
  assert_close(actual, expected)


def test_bf16_compute_with_f32_params_is_finite():
  config = tiny(("global", "local", "local"), dtype="bfloat16", param_dtype="float32")
  model = Transformer(config, rngs=nnx.Rngs(0))
  params = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  logits = forward(model, random_tokens(5, (2, T)))
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def next_token_loss(model, tokens):
  logits, _ = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_adamw_reduces_loss_on_a_fixed_batch():
  model = Transformer(tiny(("global", "local"), remat=True), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  tokens = random_tokens(6, (4, T + 1))

  @nnx.jit
  def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, tokens)) for _ in range(20)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0], losses


def test_remat_policy_goes_on_the_scan_body():
  """4 layers of a 2-kind pattern: one lax.scan over 2 repeats, its body under jax.checkpoint
  with a policy; no per-layer checkpoint outside it (traced only: no compile needed)."""
  tokens = random_tokens(7, (2, T + 1))
  for remat in ("none", "block"):
    model = Transformer(tiny(("global", "local"), num_layers=4, remat=remat), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: next_token_loss(nnx.merge(graphdef, s), tokens))(state)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    top = [e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("remat")]
    assert len(scans) == 1 and scans[0].params["length"] == 2 and not top
    inner = [e for e in scans[0].params["jaxpr"].jaxpr.eqns if e.primitive.name.startswith("remat")]
    assert len(inner) == (1 if remat == "block" else 0)


def test_bad_inputs_raise():
  model = Transformer(tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens must be"):
    model(jnp.zeros((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must have"):
    model(jnp.zeros((2, 8), jnp.int32), segment_ids=jnp.zeros((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="decoder"):
    Transformer(tiny(causal=False), rngs=nnx.Rngs(0)).init_cache(1, 8)
  with pytest.raises(ValueError, match="cache holds 4 tokens"):
    model(jnp.zeros((1, 5), jnp.int32), cache=model.init_cache(1, 4))
  with pytest.raises(ValueError, match="positions together with segment_ids"):
    model(jnp.zeros((1, 2), jnp.int32), segment_ids=jnp.zeros((1, 2), jnp.int32),
          cache=model.init_cache(1, 4))
