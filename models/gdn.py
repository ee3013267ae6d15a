"""Gated DeltaNet layer kind ("gdn"), as in Qwen3-Next: linear attention with a fixed-size state.

    ModelConfig(layer_pattern=("gdn", "gdn", "gdn", "global"), ...)           # Qwen3-Next's 3:1
    ModelConfig(layer_pattern=("gdn",), kinds={"gdn": gdn_kind(key_heads=2, conv_width=4)})

`GatedDeltaNet` replaces a layer's softmax attention (same protocol as `layers.Attention`:
`__call__(x, *, positions, segment_ids, cache, cache_index) -> (y, cache, aux)`, `init_cache`):

    q, k   = SiLU(conv(x W_q)), SiLU(conv(x W_k))   [B, T, K, dk]   K = key_heads
    v      = SiLU(conv(x W_v))                      [B, T, H, dv]   H = value_heads
    beta   = sigmoid(x W_b)                         [B, T, H]       write strength
    g      = -exp(A_log) * softplus(x W_a + dt_bias)   [B, T, H]    log decay (Mamba-2)
    o      = gated_delta_rule(q, k, v, g, beta)     [B, T, H, dv]   q, k L2-normalised inside
    y      = (RMSNorm(o) * w * SiLU(x W_z)) W_o     [B, T, D]       gated RMSNorm per head

`conv` is a causal depthwise convolution of width `conv_width` (4) over the q, k, v channels
together (Qwen3-Next's `conv1d`): output t reads inputs t - W + 1 .. t of the same document
(`segment_ids`); the recurrence also restarts its state at every document start. The layer has
no position encoding: the recurrence's order is its sense of position, so `positions` is unused.
Initialisation as fla / Mamba-2: `A` uniform in [1, 16], `dt_bias` the inverse softplus of a
log-uniform `dt` in [1e-3, 1e-1], so a fresh layer decays slowly (`g` about -0.002 .. -1.6).

Decoders only: the recurrence is causal, and a `gdn` layer in an encoder (`causal=False`) is a
ValueError (a bidirectional variant would need a second, reversed scan; not defined here).

Decoding keeps `GdnCache`, a fixed size whatever the length: the last `conv_width - 1` conv
inputs (and their segment ids) and the float32 state `[B, H, dk, dv]`; a chunk continues from
it (the state is zeroed when the chunk's first token starts a new document), so decoding token
by token equals the full forward. One token goes through `attention.gated_delta_step`.
Cost per token: O(H dk dv) for the recurrence (`attention_flops`), O(1) in the context length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

import attention
from models import layers
from models.kinds import KindSettings, LayerKind, register_layer_kind, settings_from_options
from models.norms import GatedRMSNorm


@dataclasses.dataclass(frozen=True)
class GdnSettings:
  """Options of a gdn kind (`KindSettings.options`); None = from the model's config.

  Attributes:
    key_heads: K, q/k heads; None = `config.num_kv_heads`. `value_heads % key_heads == 0`.
    value_heads: H, value heads (each with its own state); None = `config.num_heads`.
    key_dim, value_dim: dk, dv per head; None = `config.head_dim`.
    conv_width: taps of the causal depthwise convolution (Qwen3-Next: 4), >= 1.
    chunk_size: chunk of the chunkwise gated delta rule (a power of two).
    implementation: of `attention.gated_delta_rule` ("xla", "pallas"; None = Pallas on GPU).
  """

  key_heads: int | None = None
  value_heads: int | None = None
  key_dim: int | None = None
  value_dim: int | None = None
  conv_width: int = 4
  chunk_size: int = 64
  implementation: str | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name == "implementation" or (value is None and f.name != "conv_width"):
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"gdn option {f.name} must be a positive int"
                         f"{'' if f.name in ('conv_width', 'chunk_size') else ' or None'}, got "
                         f"{value!r}.")
    attention.GatedDeltaBlockSizes(chunk_size=self.chunk_size)  # power of two, or ValueError

  @classmethod
  def from_options(cls, options: Mapping[str, Any] | tuple | None) -> "GdnSettings":
    """From a kind's `options` (mapping or pairs); unknown names raise a ValueError."""
    return settings_from_options(cls, options, "gdn")

  def resolved(self, config) -> "GdnSettings":
    """These settings with every None filled from `config`; checks the head grouping."""
    fill = dict(key_heads=config.num_kv_heads, value_heads=config.num_heads,
                key_dim=config.head_dim, value_dim=config.head_dim)
    s = dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})
    if s.value_heads % s.key_heads:
      raise ValueError(f"gdn: value_heads ({s.value_heads}) must be a multiple of key_heads "
                       f"({s.key_heads}).")
    return s

  @property
  def conv_channels(self) -> int:
    """C: the convolved channels, q and k (`K dk` each) then v (`H dv`)."""
    return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GdnCache:
  """Fixed-size decoding state of a gdn layer: `conv [B, W-1, C]` (the last conv inputs, in the
  compute dtype), `conv_segment_ids [B, W-1]` (-1 = empty) and `state [B, H, dk, dv]` float32."""

  conv: Float[Array, "B W C"]
  conv_segment_ids: Int[Array, "B W"]
  state: Float[Array, "B H Dk Dv"]

  @classmethod
  def create(cls, batch: int, s: GdnSettings, dtype) -> "GdnCache":
    w = s.conv_width - 1
    return cls(jnp.zeros((batch, w, s.conv_channels), dtype), jnp.full((batch, w), -1, jnp.int32),
               jnp.zeros((batch, s.value_heads, s.key_dim, s.value_dim), jnp.float32))

  @staticmethod
  def nbytes(batch: int, s: GdnSettings, dtype) -> int:
    """Bytes of `create(batch, s, dtype)`, by arithmetic."""
    w = s.conv_width - 1
    return batch * (w * (s.conv_channels * jnp.dtype(dtype).itemsize + 4)
                    + 4 * s.value_heads * s.key_dim * s.value_dim)


def causal_conv(x: Float[Array, "B T C"], segment_ids: Int[Array, "B T"],
                tail: Float[Array, "B W C"], tail_ids: Int[Array, "B W"],
                weight: Float[Array, "W+1 C"]):
  """Depthwise causal convolution: `y_t = sum_i weight[i] x_{t - W + i}` over inputs of token
  t's document (`tail`: the `W` inputs before `x`, from a cache or zeros). Float32 sums.

  Returns `(y [B, T, C]` in x's dtype, the new tail `[B, W, C]`, its ids `[B, W])`. O(T W C).
  """
  w, t = tail.shape[1], x.shape[1]
  xs = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # B W+T C
  ids = jnp.concatenate([tail_ids, segment_ids], axis=1)  # B W+T
  y = jnp.zeros(x.shape, jnp.float32)
  for i in range(w + 1):  # tap i reads token t - w + i
    same = (ids[:, i:i + t] == segment_ids)[..., None]
    y = y + jnp.where(same, xs[:, i:i + t], 0).astype(jnp.float32) * weight[i].astype(jnp.float32)
  return y.astype(x.dtype), xs[:, t:], ids[:, t:]


def _dt_bias_init(key, shape, dtype):
  """Inverse softplus of `dt` log-uniform in [1e-3, 1e-1] (Mamba-2 / fla)."""
  dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key, shape, dtype):
  return jnp.log(jax.random.uniform(key, shape, minval=1.0, maxval=16.0)).astype(dtype)


class GatedDeltaNet(nnx.Module):
  """The gdn layer (module docstring): projections, short conv, gated delta rule, gated norm."""

  def __init__(self, config, kind: str, *, rngs: nnx.Rngs):
    if not config.causal:
      raise ValueError(f"layer kind {kind!r} (gated delta rule) is causal: it cannot be used "
                       f"in an encoder (causal=False); use attention kinds there.")
    s = self.settings = GdnSettings.from_options(config.kind_settings(kind).options
                                                 ).resolved(config)
    self.kind, self.dtype = kind, config.dtype
    d, kh, h, dk, dv = config.d_model, s.key_heads, s.value_heads, s.key_dim, s.value_dim
    proj = functools.partial(nnx.Einsum, dtype=config.dtype, param_dtype=config.param_dtype,
                             rngs=rngs)
    self.q_proj = proj("BTD,DKE->BTKE", (d, kh, dk), kernel_init=layers.fan_in_init(0, (1, 2)))
    self.k_proj = proj("BTD,DKE->BTKE", (d, kh, dk), kernel_init=layers.fan_in_init(0, (1, 2)))
    self.v_proj = proj("BTD,DHV->BTHV", (d, h, dv), kernel_init=layers.fan_in_init(0, (1, 2)))
    self.z_proj = proj("BTD,DHV->BTHV", (d, h, dv), kernel_init=layers.fan_in_init(0, (1, 2)))
    self.b_proj = proj("BTD,DH->BTH", (d, h), kernel_init=layers.fan_in_init(0, 1))
    self.a_proj = proj("BTD,DH->BTH", (d, h), kernel_init=layers.fan_in_init(0, 1))
    bound = s.conv_width ** -0.5  # PyTorch's Conv1d default: fan_in = width (depthwise)
    self.conv = nnx.Param(jax.random.uniform(rngs.params(), (s.conv_width, s.conv_channels),
                                             minval=-bound, maxval=bound
                                             ).astype(config.param_dtype))
    self.A_log = nnx.Param(_a_log_init(rngs.params(), (h,), config.param_dtype))
    self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), (h,), config.param_dtype))
    self.o_norm = GatedRMSNorm(dv, epsilon=config.norm_eps, dtype=config.dtype,
                               param_dtype=config.param_dtype)
    self.o_proj = proj("BTHV,HVD->BTD", (h, dv, d), kernel_init=layers.fan_in_init((0, 1), 2))

  def __call__(self, x: Float[Array, "B T D"], *, positions: Int[Array, "B T"] | None = None,
               segment_ids: Int[Array, "B T"] | None = None, cache: GdnCache | None = None,
               cache_index=None) -> tuple[Float[Array, "B T D"], GdnCache | None, dict]:
    """Returns `(y [B, T, D], updated cache or None, aux {})`; `positions`, `cache_index` unused
    (no position encoding; the cache is a state, not indexed by position)."""
    del positions, cache_index
    s, (b, t) = self.settings, x.shape[:2]
    ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    empty = GdnCache.create(b, s, self.dtype) if cache is None else cache
    q, k, v, new_tail, new_ids = self._conv_qkv(x, ids, empty)
    beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))  # B T H
    g = (-jnp.exp(self.A_log[...].astype(jnp.float32))
         * jax.nn.softplus(self.a_proj(x).astype(jnp.float32)
                           + self.dt_bias[...].astype(jnp.float32)))  # B T H
    if cache is None:
      o = attention.gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids, **self._options())
    else:
      continues = (cache.conv_segment_ids[:, -1] == ids[:, 0]) if s.conv_width > 1 else True
      state = jnp.where(jnp.reshape(continues, (-1, 1, 1, 1)), cache.state, 0.0)
      o, state = self._continue(q, k, v, g, beta, ids, state)
      cache = GdnCache(new_tail, new_ids, state)
    y = self.o_norm(o, self.z_proj(x))  # B T H dv
    return self.o_proj(y), cache, {}

  def _options(self) -> dict:
    return dict(implementation=self.settings.implementation,
                block_sizes=attention.GatedDeltaBlockSizes(chunk_size=self.settings.chunk_size))

  def _conv_qkv(self, x, ids, cache: GdnCache):
    """Projections, the causal conv over q|k|v channels and SiLU; returns q, k, v and the tail."""
    b, t = x.shape[:2]
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    flat = jnp.concatenate([a.reshape(b, t, -1) for a in (q, k, v)], axis=-1)  # B T C
    mixed, tail, tail_ids = causal_conv(flat, ids, cache.conv, cache.conv_segment_ids,
                                        self.conv[...])
    mixed = jax.nn.silu(mixed)
    qk = q.shape[2] * q.shape[3]
    q = mixed[..., :qk].reshape(q.shape)
    k = mixed[..., qk:2 * qk].reshape(k.shape)
    return q, k, mixed[..., 2 * qk:].reshape(v.shape), tail, tail_ids

  def _continue(self, q, k, v, g, beta, ids, state):
    """The recurrence from a carried state: one step for one token, else the chunkwise form."""
    if q.shape[1] == 1:
      o, state = attention.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
      return o[:, None], state
    return attention.gated_delta_rule(q, k, v, g, beta, initial_state=state, segment_ids=ids,
                                      return_final_state=True, **self._options())

  def init_cache(self, batch: int, max_len: int) -> GdnCache:
    """The fixed-size state (conv tail + S): `max_len` does not change its size."""
    del max_len
    return GdnCache.create(batch, self.settings, self.dtype)

  # --- counts (models.flops) --------------------------------------------------------------------

  @staticmethod
  def attention_flops(config, kind: str, keys):
    """Recurrence FLOPs per token whatever `keys` (the context): `6 H dk dv`, the three
    `dk x dv` multiply-adds of a step (recall `S^T k`, write `k r^T`, read `S^T q`)."""
    s = GdnSettings.from_options(config.kind_settings(kind).options).resolved(config)
    return 6 * s.value_heads * s.key_dim * s.value_dim * np.ones_like(keys)

  @staticmethod
  def cache_bytes(config, kind: str, batch: int, max_len: int) -> int:
    """Bytes of `init_cache(batch, max_len)`: conv tail + state, independent of `max_len`."""
    del max_len
    s = GdnSettings.from_options(config.kind_settings(kind).options).resolved(config)
    return GdnCache.nbytes(batch, s, config.dtype)


def gdn_kind(**options) -> KindSettings:
  """`KindSettings` overriding the "gdn" kind's options, e.g. `gdn_kind(key_heads=2)`."""
  GdnSettings.from_options(options)  # validate early
  return KindSettings(options=options)


register_layer_kind("gdn", LayerKind(KindSettings(options=()), module=GatedDeltaNet,
                                     attends=False))
