"""The Transformer: a decoder LM or a ModernBERT-style encoder, with KV-cache decoding.

    model = Transformer(ModelConfig(...), rngs=nnx.Rngs(0))
    logits, aux = model(tokens)                                  # [B, T, V] float32
    x, aux = model.hidden(tokens)                                # [B, T, D] before the head
    losses, argmax = model.token_losses(x, targets, chunk=512)   # [B, T]: no [B, T, V] logits
    logits, aux = model(tokens, segment_ids=ids)                 # packed documents
    cache = model.init_cache(batch, max_len)
    logits, aux = model(prompt, cache=cache); cache = aux["cache"]   # prefill (any chunk)
    logits, cache = decode_step(model, next_tokens, cache)           # one token
    tokens = generate(model, prompt, max_new_tokens=32)

Layout: embed [x embed_scale, embed norm] -> blocks (pre-norm attention + pre-norm gated MLP,
residual; with `post_norms` each output is normalised before its residual add) -> final norm ->
[MLM head: dense, activation, norm] -> vocabulary projection (tied to the embedding or not;
[+ bias]) -> [final logit soft-cap]. Layer `i`'s attention is built by its kind
(`config.layer_kinds[i]`, models/kinds.py). Without a cache the blocks run under a `lax.scan`
over repeats of the layer pattern with the `config.remat` policy on its body
(models/layer_scan.py, models/remat.py); with a cache, one by one.

`aux` holds `"cache"` (the updated `Cache`, or None without one) and `"layers"` (each layer's
attention aux dict: where kinds such as DSA report their losses and statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from models import cache as cache_lib
from models import chunked_loss, layer_scan
from models import layers
from models.choices import ACTIVATIONS
from models.config import ModelConfig
from models.kinds import get_layer_kind

# The parameters `Transformer.logits` uses (the head's submodules); the chunked loss sums their
# gradients over chunks in float32.
HEAD = nnx.Any(*map(nnx.PathContains, ("final_norm", "mlm_head", "embed", "lm_head",
                                       "output_bias")))


def _maybe(norm, x):
  return x if norm is None else norm(x)


class Block(nnx.Module):
  """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`; with
  `config.post_norms` (Gemma) `x + post_norm(attn(norm(x)))` and the same for the MLP.
  `attn_norm=False` makes the attention pre-norm the identity (ModernBERT's layer 0)."""

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs, attn_norm: bool = True):
    attention_module = get_layer_kind(kind).module or layers.Attention
    norm = lambda on: layers.make_norm(config, rngs=rngs) if on else None
    self.attn_norm = norm(attn_norm)
    self.attn = attention_module(config, kind, rngs=rngs)
    self.attn_post_norm = norm(config.post_norms)
    self.mlp_norm = norm(True)
    self.mlp = layers.MLP(config, rngs=rngs)
    self.mlp_post_norm = norm(config.post_norms)

  def __call__(self, x: Float[Array, "B T D"], positions, segment_ids, cache, cache_index):
    h, cache, aux = self.attn(_maybe(self.attn_norm, x), positions=positions,
                              segment_ids=segment_ids, cache=cache, cache_index=cache_index)
    x = x + _maybe(self.attn_post_norm, h)
    return x + _maybe(self.mlp_post_norm, self.mlp(self.mlp_norm(x))), cache, aux


class MLMHead(nnx.Module):
  """ModernBERT's prediction head before the vocabulary projection: dense (+ bias if
  `config.mlm_head_bias`), activation (`config.mlm_activation`), norm."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(config.d_model, config.d_model, use_bias=config.mlm_head_bias,
                            dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.activation = config.mlm_activation
    self.norm = layers.make_norm(config, rngs=rngs)

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    return self.norm(ACTIVATIONS[self.activation](self.dense(x)))


class Transformer(nnx.Module):
  """Decoder LM (`config.causal`) or bidirectional encoder; see the module docstring."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise ValueError(f"Transformer needs a ModelConfig, got {type(config).__name__}.")
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                           param_dtype=config.param_dtype,
                           embedding_init=nnx.initializers.normal(config.init_std), rngs=rngs)
    self.embed_norm = layers.make_norm(config, rngs=rngs) if config.embed_norm else None
    self.blocks = nnx.List([Block(config, kind, rngs=rngs,
                                  attn_norm=i > 0 or config.first_attn_norm)
                            for i, kind in enumerate(config.layer_kinds)])
    self.final_norm = layers.make_norm(config, rngs=rngs)
    self.mlm_head = MLMHead(config, rngs=rngs) if config.mlm_head else None
    self.lm_head = None if config.tie_embeddings else nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, dtype=config.dtype,
        param_dtype=config.param_dtype, rngs=rngs)
    self.output_bias = nnx.Param(jnp.zeros((config.vocab_size,), config.param_dtype)
                                 ) if config.output_bias else None

  def __call__(
      self,
      tokens: Int[Array, "B T"],
      *,
      segment_ids: Int[Array, "B T"] | None = None,
      positions: Int[Array, "B T"] | None = None,
      cache: cache_lib.Cache | None = None,
  ) -> tuple[Float[Array, "B T V"], dict]:
    """Logits `[B, T, V]` (float32) and `aux` (`"cache"`, `"layers"`): `self.hidden(...)`
    followed by the head (final norm, [MLM head], vocabulary projection, [soft-cap]).

    Args:
      tokens: `[B, T]` ints.
      segment_ids: `[B, T]` document ids of packed sequences (`< 0` = padding); a token attends
        only within its document. Default: one document per row.
      positions: `[B, T]` RoPE positions. Default: restart at 0 in each document; with a cache,
        `cache.index + t` (pass positions explicitly to decode packed documents).
      cache: from `init_cache`: `tokens` continue the cached stream; the updated cache is
        `aux["cache"]`.
    """
    x, aux = self.hidden(tokens, segment_ids=segment_ids, positions=positions, cache=cache)
    return self.logits(x), aux

  def hidden(
      self,
      tokens: Int[Array, "B T"],
      *,
      segment_ids: Int[Array, "B T"] | None = None,
      positions: Int[Array, "B T"] | None = None,
      cache: cache_lib.Cache | None = None,
  ) -> tuple[Float[Array, "B T D"], dict]:
    """The last block's output `[B, T, D]` (before the final norm) and `aux`; arguments as
    `__call__`. `self.logits(x)` or `self.token_losses(x, targets, chunk)` finish the pass."""
    b, t = self._check_inputs(tokens, segment_ids, positions, cache)
    index = None if cache is None else cache.index
    if positions is None:
      positions = _default_positions(b, t, segment_ids, index)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
    x = self._embed(tokens)  # B T D
    if cache is None:
      x, layer_aux = layer_scan.run_blocks(
          self.blocks, period=len(self.config.layer_pattern), x=x, positions=positions,
          segment_ids=segment_ids, remat=self.config.remat, scan=self.config.scan_layers)
      return x, {"cache": None, "layers": layer_aux}
    new_caches, layer_aux = [], []  # decoding: layer by layer, each with its cache
    for i, block in enumerate(self.blocks):
      x, layer_cache, aux = block(x, positions, segment_ids, cache.layers[i], index)
      new_caches.append(layer_cache)
      layer_aux.append(aux)
    new_cache = cache_lib.Cache(index + t, tuple(new_caches), cache.max_len)
    return x, {"cache": new_cache, "layers": tuple(layer_aux)}

  def _embed(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    x = self.embed(tokens)
    if self.config.embed_scale != 1.0:  # Gemma: sqrt(d_model) rounded to the compute dtype
      x = x * jnp.asarray(self.config.embed_scale, x.dtype)
    return _maybe(self.embed_norm, x)

  def logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Final norm, [MLM head], vocabulary projection [+ bias], float32 [soft-capped] logits of
    `hidden`'s output (position-wise: any slice of positions gives the same rows)."""
    x = self.final_norm(x)
    if self.mlm_head is not None:
      x = self.mlm_head(x)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)  # B T V
    if self.output_bias is not None:
      logits = logits + self.output_bias[...].astype(logits.dtype)
    logits = logits.astype(jnp.float32)
    cap = self.config.final_logit_soft_cap
    return logits if cap is None else cap * jnp.tanh(logits / cap)

  def token_losses(self, x: Float[Array, "B T D"], targets: Int[Array, "B T"], chunk: int = 0
                   ) -> tuple[Float[Array, "B T"], Int[Array, "B T"]]:
    """Cross-entropy `[B, T]` (float32) of `self.logits(x)` against `targets`, and its argmax,
    computed `chunk` positions at a time (`models.chunked_loss`: the `[B, T, V]` logits never
    exist; 0 = plain logits). Equal to the plain loss in value and gradient."""
    return chunked_loss.token_losses(Transformer.logits, x, targets, chunk, module=self,
                                     wrt=HEAD)

  def init_cache(self, batch: int, max_len: int) -> cache_lib.Cache:
    """An empty cache for `batch` streams of up to `max_len` tokens (decoders only).

    Unbounded (global) layers hold `max_len` positions; windowed (local) layers a ring of
    `min(window, max_len)`, so their memory does not grow with `max_len`. Feeding more than
    `max_len` tokens in total is an error (a ValueError when decoding eagerly).
    """
    if not self.config.causal:
      raise ValueError("init_cache: KV-cache decoding needs a decoder (causal=True).")
    if batch < 1 or max_len < 1:
      raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}.")
    return cache_lib.Cache(jnp.zeros((), jnp.int32),
                           tuple(block.attn.init_cache(batch, max_len) for block in self.blocks),
                           max_len)

  def _check_inputs(self, tokens, segment_ids, positions, cache) -> tuple[int, int]:
    if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
      raise ValueError(f"tokens must be [batch, seq] ints, got shape {jnp.shape(tokens)} "
                       f"dtype {jnp.result_type(tokens)}.")
    b, t = jnp.shape(tokens)
    if segment_ids is not None and jnp.shape(segment_ids) != (b, t):
      raise ValueError(f"segment_ids must have the tokens' shape {(b, t)}, got "
                       f"{jnp.shape(segment_ids)}.")
    if positions is not None and jnp.shape(positions) not in ((b, t), (t,)):
      raise ValueError(f"positions must have shape {(b, t)} or {(t,)}, got "
                       f"{jnp.shape(positions)}.")
    if cache is not None:
      if not isinstance(cache, cache_lib.Cache) or len(cache.layers) != len(self.blocks):
        raise ValueError("cache must come from this model's init_cache.")
      # Checked when the index is concrete (eager decoding); under jit it is the caller's job.
      if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + t > cache.max_len:
        raise ValueError(f"cache holds {cache.max_len} tokens: {int(cache.index)} cached + {t} "
                         f"new do not fit; make it with a larger init_cache(batch, max_len).")
      if segment_ids is not None and positions is None:
        raise ValueError("with a cache, pass positions together with segment_ids (positions "
                         "cannot restart per document across decode calls).")
    return b, t


def positions_from_segments(segment_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
  """Position of each token within its (contiguous) document: restarts at 0 when the id changes."""
  b, t = segment_ids.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)
  return idx - lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _default_positions(b: int, t: int, segment_ids, index) -> Int[Array, "B T"]:
  if index is not None:
    return jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is not None:
    return positions_from_segments(segment_ids)
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


# --- decoding -------------------------------------------------------------------------------------


def decode_step(model: Transformer, tokens: Int[Array, "B T"],
                cache: cache_lib.Cache) -> tuple[Float[Array, "B V"], cache_lib.Cache]:
  """Feeds `tokens` (usually `T = 1`) after the cached stream: `(last logits [B, V], cache)`."""
  logits, aux = model(tokens, cache=cache)
  return logits[:, -1], aux["cache"]


def generate(model: Transformer, prompt: Int[Array, "B P"], max_new_tokens: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None) -> Int[Array, "B P+N"]:
  """Prompt followed by `max_new_tokens` sampled tokens (greedy when `temperature == 0`).

  Prefills the cache with the whole prompt, then decodes one token per step in a `lax.scan`;
  the whole loop is one jitted computation.
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if jnp.ndim(prompt) != 2 or jnp.shape(prompt)[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] ints, got shape {jnp.shape(prompt)}.")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt, jnp.int32), rng, max_new_tokens,
                   float(temperature))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, prompt, rng, steps: int, temperature: float):
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape

  def sample(logits, key):  # [B, V] -> [B]
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  keys = jax.random.split(rng, steps)
  logits, cache = decode_step(model, prompt, model.init_cache(b, p + steps))
  first = sample(logits, keys[0])

  def step(carry, key):
    token, cache = carry
    logits, cache = decode_step(model, token[:, None], cache)
    return (sample(logits, key), cache), token

  (last, _), emitted = lax.scan(step, (first, cache), keys[1:])  # emitted: [steps - 1, B]
  return jnp.concatenate([prompt, emitted.T, last[:, None]], axis=1)
