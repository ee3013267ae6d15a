"""Chunked cross-entropy equals the plain loss on full logits: values, argmax and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import chunked_loss
from models.config import ModelConfig
from models.transformer import Transformer
from tests.helpers import assert_close

VOCAB, T = 96, 13  # T = 13: chunks of 4 positions need padding (4 chunks of 4 -> 16)


def weighted_loss(model, tokens, targets, weights, segment_ids, chunk):
  x, _ = model.hidden(tokens, segment_ids=segment_ids)
  losses, predictions = model.token_losses(x, targets, chunk)
  return (losses * weights).sum() / weights.sum(), predictions


def test_chunked_loss_equals_plain_loss_and_gradients():
  """Tied embeddings (the projection's gradient adds to the lookup's), Gemma's final logit
  soft-cap, an output bias, ignored positions and packed documents with padding."""
  config = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, mlp_dim=64, num_layers=1,
                       tie_embeddings=True, final_logit_soft_cap=3.0, output_bias=True)
  model = Transformer(config, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(1), 3)
  tokens = jax.random.randint(keys[0], (2, T), 0, VOCAB)
  targets = jax.random.randint(keys[1], (2, T), 0, VOCAB)
  weights = (jax.random.uniform(keys[2], (2, T)) > 0.3).astype(jnp.float32)  # ignored positions
  segment_ids = jnp.asarray([[0] * 6 + [1] * 7, [0] * 10 + [-1] * 3], jnp.int32)
  graphdef, state = nnx.split(model)

  def run(chunk):
    fn = lambda s: weighted_loss(nnx.merge(graphdef, s), tokens, targets, weights, segment_ids,
                                 chunk)
    (loss, predictions), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(state)
    return loss, predictions, grads

  loss, predictions, grads = run(0)
  c_loss, c_predictions, c_grads = run(4)
  assert_close(c_loss, loss)
  np.testing.assert_array_equal(c_predictions, predictions)
  for (path, g), (_, c_g) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(c_grads)):
    assert_close(c_g, g, grad=True, err_msg=jax.tree_util.keystr(path))


def test_chunked_backward_never_holds_the_full_logits():
  """Compiled temp memory of the loss's gradient: chunked < a quarter of the plain one, and
  below the size of the full float32 logits (compile only)."""
  b, t, d, v = 1, 2048, 16, 4096
  w = jax.random.normal(jax.random.key(0), (d, v))
  x = jax.random.normal(jax.random.key(1), (b, t, d))
  targets = jnp.zeros((b, t), jnp.int32)

  def temp(chunk):
    loss = lambda w, x: chunked_loss.token_losses(lambda h: h @ w, x, targets, chunk)[0].sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain, chunked = temp(0), temp(256)
  assert chunked < plain / 4, (plain, chunked)
  assert chunked < b * t * v * 4, chunked


def test_auto_chunk_and_bad_values():
  assert chunked_loss.auto_loss_chunk(1, 1024, 256) == 0              # 1 MiB of logits: plain
  chunk = chunked_loss.auto_loss_chunk(1, 131072, 128256)             # 64 GiB: chunked
  assert chunk == 512 and 4 * chunk * 128256 <= chunked_loss.CHUNK_LOGITS
  assert chunked_loss.resolve_loss_chunk(64, 1, 131072, 128256) == 64
  with pytest.raises(ValueError, match="loss_chunk must be -1"):
    chunked_loss.resolve_loss_chunk(-2, 1, 8, 8)
  with pytest.raises(ValueError, match="chunk must be 0"):
    chunked_loss.token_losses(lambda h: h, jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), jnp.int32), -1)


def test_bf16_chunked_gradients_are_as_accurate_as_the_unchunked_ones():
  """bf16 parameters, 128 chunks of the loss and of the MLP: each parameter's gradient is as
  close to the float32 computation's (same weights) as the unchunked bf16 gradient is. Summed
  chunk by chunk in bf16 (the scan's own transpose), the gradients of the vocabulary projection
  and the MLP were 1.9-2.5x further off here; the chunks' sums are float32 (models/tiling.py)."""
  t, chunk = 1024, 8
  tokens = jax.random.randint(jax.random.key(1), (2, t + 1), 0, VOCAB)

  def grads(dtype, chunked):
    config = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, mlp_dim=64, num_layers=1,
                         tie_embeddings=False, dtype=dtype, param_dtype=dtype,
                         mlp_chunk=chunk if chunked else 0)
    model = Transformer(config, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(dtype), weights))

    def loss(model):
      x, _ = model.hidden(tokens[:, :-1])
      return model.token_losses(x, tokens[:, 1:], chunk if chunked else 0)[0].mean()

    return {jax.tree_util.keystr(path): np.asarray(g, np.float32) for path, g in
            jax.tree_util.tree_leaves_with_path(nnx.jit(nnx.grad(loss))(model))}

  weights = nnx.state(Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2,
                                              mlp_dim=64, num_layers=1, tie_embeddings=False),
                                  rngs=nnx.Rngs(0)), nnx.Param)
  exact = grads(jnp.float32, False)
  plain, chunked = grads(jnp.bfloat16, False), grads(jnp.bfloat16, True)
  error = lambda g, name: np.linalg.norm(g[name] - exact[name]) / np.linalg.norm(exact[name])
  for name in exact:
    if "lm_head" in name or "mlp" in name:
      assert error(chunked, name) <= 1.25 * error(plain, name), (
          name, error(chunked, name), error(plain, name))
