"""Transformer layers: norms, the gated MLP, and `Attention` (GQA projections + a registered fn).

`Attention` knows attention only through the public API: it builds an `attention.Mask` from its
layer kind's settings (causality, sliding window, segment ids, decode offset) and calls
`attention.get(name)` with it, so a user-registered function works with no change here.

Shapes: B batch, T query length, S key length, D d_model, N q heads, K kv heads, H head dim,
F mlp hidden width.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import attention
from models import cache as cache_lib
from models import tiling
from models.choices import MLP_ACTIVATIONS, NORMS
from models.config import ModelConfig


def fan_in_init(in_axis, out_axis):
  """LeCun-normal over the given axes (Einsum kernels with several in/out axes)."""
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                           in_axis=in_axis, out_axis=out_axis)


def make_norm(config: ModelConfig, *, rngs: nnx.Rngs, features: int | None = None,
              norm: str | None = None) -> nnx.Module:
  """A `norm` (default: the config's) over `features` (default `d_model`), output in
  `config.dtype`."""
  return NORMS[norm or config.norm](features or config.d_model, epsilon=config.norm_eps,
                                    dtype=config.dtype, param_dtype=config.param_dtype,
                                    rngs=rngs)


class MLP(nnx.Module):
  """Gated MLP (GeGLU / SwiGLU): `out = (act(x W_gate) * (x W_up)) W_out` (+ biases if
  `config.mlp_bias`). With `config.mlp_chunk = C > 0` it runs C positions at a time, recomputed
  in the backward (`tiling.map_positions`: the `[B, T, 2F]` activations never exist; same
  values)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dense = functools.partial(nnx.Linear, use_bias=config.mlp_bias, dtype=config.dtype,
                              param_dtype=config.param_dtype, rngs=rngs)
    self.activation = config.mlp
    self.chunk = config.mlp_chunk
    self.wi = dense(config.d_model, 2 * config.mlp_dim)  # gate and up, fused
    self.wo = dense(config.mlp_dim, config.d_model)

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    if self.chunk:
      return tiling.map_positions(MLP.apply_all, (x,), self.chunk, module=self)
    return self.apply_all(x)

  def apply_all(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    """The MLP on every position of `x` at once."""
    gate, up = jnp.split(self.wi(x), 2, axis=-1)  # B T F each
    return self.wo(MLP_ACTIVATIONS[self.activation](gate) * up)


class Attention(nnx.Module):
  """Multi-head attention with GQA projections, RoPE and the layer kind's attention function.

  The kind's settings (`config.kind_settings(kind)`) give the attention function name, the
  sliding window (0 = unbounded) and the RoPE theta, or ALiBi instead of RoPE (`alibi=True`:
  per-head slopes `2^(-8 n / N)`, distances from the mask's positions, so a KV cache works
  unchanged). The window travels in the `Mask` (as
  every other visibility rule), so "local", "flash" and "dense" compute the same thing.
  Optional (config): q/k/v and output biases, a norm of q and k over head_dim before RoPE
  (`qk_norm`), and the logit scale (`attention_scale`, default head_dim ** -0.5).
  Sinks (kind settings): `sinks=n` puts `Mask(sinks=n)` in the mask (a windowed kind decodes
  from a `SinkRingCache`: the window's ring plus the n sink keys, merged exactly); `sink=True`
  learns `sink_logits [N]` (float32, zeros at init), the attention function's `sink_logits`.
  """

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    settings = config.kind_settings(kind)
    self.kind = kind
    self.attention_name = settings.attention
    self.options = tuple(settings.options)
    self.window = settings.window
    self.sinks = settings.sinks or 0
    self.causal = config.causal
    self.sink_logits = (nnx.Param(jnp.zeros((config.num_heads,), jnp.float32))
                        if settings.sink else None)
    # ALiBi kinds: no RoPE; static per-head slopes (Python floats, not parameters).
    self.alibi_slopes = (tuple(float(x) for x in attention.geometric_alibi_slopes(
        config.num_heads)) if settings.alibi else None)
    self.rope = None if settings.alibi else config.rope(kind)
    self.dtype = config.dtype
    d, n, kh, h = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    self.num_kv_heads, self.head_dim = kh, h
    self.scale = config.attention_scale
    proj = functools.partial(nnx.Einsum, dtype=config.dtype, param_dtype=config.param_dtype,
                             rngs=rngs)
    qkv_bias = lambda *shape: dict(bias_shape=shape) if config.qkv_bias else {}
    self.q_proj = proj("BTD,DNH->BTNH", (d, n, h), kernel_init=fan_in_init(0, (1, 2)),
                       **qkv_bias(n, h))
    self.k_proj = proj("BTD,DKH->BTKH", (d, kh, h), kernel_init=fan_in_init(0, (1, 2)),
                       **qkv_bias(kh, h))
    self.v_proj = proj("BTD,DKH->BTKH", (d, kh, h), kernel_init=fan_in_init(0, (1, 2)),
                       **qkv_bias(kh, h))
    self.o_proj = proj("BTNH,NHD->BTD", (n, h, d), kernel_init=fan_in_init((0, 1), 2),
                       **(dict(bias_shape=(d,)) if config.o_bias else {}))
    head_norm = lambda: (None if config.qk_norm is None else
                         make_norm(config, rngs=rngs, features=h, norm=config.qk_norm))
    self.q_norm, self.k_norm = head_norm(), head_norm()

  def require_plain_causal(self, label: str, *, scale: bool, window_note: str = "",
                           reason: str = "it uses RoPE") -> None:
    """For kinds that select among all earlier keys themselves (DSA, MoBA, NSA): a ValueError
    naming `label` unless the model is causal with window=0 and no ALiBi (and, with `scale`,
    no `attention_scale`)."""
    if not self.causal or self.window:
      raise ValueError(f"layer kind {self.kind!r} ({label}) needs a causal model and "
                       f"window=0{window_note}, got causal={self.causal}, window={self.window}.")
    if self.alibi_slopes is not None or (scale and self.scale is not None):
      raise ValueError(f"layer kind {self.kind!r} ({label}) supports neither alibi=True"
                       f"{' nor attention_scale' if scale else ''} ({reason}).")

  @classmethod
  def attention_flops(cls, config: ModelConfig, kind: str, keys):
    """Forward attention FLOPs of one query that sees `keys` keys (int or array) in a layer of
    `kind`: `q k^T` and `p v`, 2 FLOPs per multiply-add (`models.flops`). Kinds that attend
    to fewer keys, or score them first, override this."""
    del kind
    return 4 * config.num_heads * config.head_dim * keys

  # --- masks and the attention function ----------------------------------------------------

  def mask(self, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
           sinks: bool = True) -> attention.Mask:
    """This kind's visibility: causality, sliding window, segments, decode offset, and (with
    `sinks`) the kind's attention sinks."""
    window = attention.local_mask(self.window, causal=self.causal).window if self.window else None
    return attention.Mask(causal=self.causal, window=window, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, q_offset=q_offset,
                          sinks=self.sinks if sinks else 0)

  def _options(self) -> dict:
    options = dict(self.options)
    if self.scale is not None:
      options["scale"] = self.scale
    if self.alibi_slopes is not None:
      options["alibi_slopes"] = jnp.asarray(self.alibi_slopes, jnp.float32)
    if self.sink_logits is not None:
      options["sink_logits"] = self.sink_logits[...]
    return options

  def attend(self, q: Float[Array, "B T N H"], k: Float[Array, "B S K H"],
             v: Float[Array, "B S K H"], mask: attention.Mask, **extra) -> Float[Array, "B T N H"]:
    """Calls the registered attention function of this kind (with its ALiBi slopes and sink
    logits, if any; `extra` options such as `return_lse=True` on top)."""
    return attention.get(self.attention_name)(q, k, v, mask=mask, **self._options(), **extra)

  def attend_cached(self, q, k_view, v_view, q_segment_ids, kv_segment_ids, q_offset, cache,
                    index) -> Float[Array, "B T N H"]:
    """Attention of a chunk against the cache's view; with a `SinkRingCache`, merged exactly
    with the sink keys the window does not reach (keys `j <= i - window`, flash attention)."""
    mask = self.mask(q_segment_ids, kv_segment_ids, q_offset, sinks=False)
    sink_keys = cache.sinks()  # None but for a SinkRingCache
    if sink_keys is None:
      return self.attend(q, k_view, v_view, mask)
    out, lse = self.attend(q, k_view, v_view, mask, return_lse=True)
    k_s, v_s, seg_s = sink_keys
    sink_mask = attention.Mask(causal=True, q_segment_ids=q_segment_ids, kv_segment_ids=seg_s,
                               q_offset=index - self.window)
    options = {name: value for name, value in self._options().items() if name != "sink_logits"}
    out_s, lse_s = attention.flash_attention(q, k_s, v_s, mask=sink_mask, return_lse=True,
                                             **options)
    return attention.merge_attention(out, lse, out_s, lse_s)[0]

  # --- forward and decoding ------------------------------------------------------------------

  def __call__(self, x: Float[Array, "B T D"], *, positions: Int[Array, "B T"],
               segment_ids: Int[Array, "B T"] | None = None, cache=None,
               cache_index=None) -> tuple[Float[Array, "B T D"], Any, dict]:
    """Returns `(y [B, T, D], updated cache or None, aux {})`.

    Without a cache, queries and keys are `x` itself (segment ids: packed documents). With a
    cache (from `init_cache`), `x` is the chunk at stream positions `cache_index + t`.
    """
    q, k, v = self.project(x, positions)
    if cache is None:
      out = self.attend(q, k, v, self.mask(segment_ids, segment_ids))
    else:
      if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
      (k, v, kv_segment_ids, q_offset), cache = cache.update(cache_index, k, v, segment_ids)
      out = self.attend_cached(q, k, v, segment_ids, kv_segment_ids, q_offset, cache,
                               cache_index)
    return self.o_proj(out), cache, {}

  def project(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"]
              ) -> tuple[Float[Array, "B T N H"], Float[Array, "B T K H"], Float[Array, "B T K H"]]:
    """`q, k, v` of `x`: projections, then the q/k norm (if any), then RoPE (if any)."""
    q, k = self.q_proj(x), self.k_proj(x)  # B T N H, B T K H
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope is not None:
      q, k = self.rope(q, positions), self.rope(k, positions)
    return q, k, self.v_proj(x)

  def init_cache(self, batch: int, max_len: int):
    """Empty cache: a ring of `cache_slots(window, max_len)` slots if windowed (plus `sinks`
    slots with sinks: `SinkRingCache`), else `max_len` slots."""
    if not self.causal:
      raise ValueError("KV-cache decoding needs a causal (decoder) model; this layer is "
                       "bidirectional.")
    kh, h = self.num_kv_heads, self.head_dim
    if self.window and self.sinks:
      return cache_lib.SinkRingCache.create(batch, min(self.sinks, max_len),
                                            min(self.window, max_len), kh, h, self.dtype)
    if self.window:
      return cache_lib.RingCache.create(batch, cache_slots(self.window, max_len), kh, h,
                                        self.dtype)
    return cache_lib.FullCache.create(batch, max_len, kh, h, self.dtype)

  # --- counts (models.flops): one formula per layer module, so each kind counts itself ------

  @staticmethod
  def cache_bytes(config: ModelConfig, kind: str, batch: int, max_len: int) -> int:
    """Bytes of `init_cache(batch, max_len)` by arithmetic (`cache.kv_nbytes`)."""
    settings = config.kind_settings(kind)
    slots = cache_slots(settings.window, max_len)
    if settings.window and settings.sinks:  # SinkRingCache: the sink slots besides the ring
      slots += min(settings.sinks, max_len)
    return cache_lib.kv_nbytes(batch, slots, config.num_kv_heads, config.head_dim, config.dtype)


def cache_slots(window: int, max_len: int) -> int:
  """Positions a layer's KV cache holds: `min(window, max_len)` if windowed, else `max_len`."""
  return min(window, max_len) if window else max_len
