"""`ModelConfig`: one frozen, hashable dataclass describing a Transformer; validated on creation.

    ModelConfig(vocab_size=256, d_model=64, num_layers=6, num_heads=4, num_kv_heads=2,
                layer_pattern=("global", "local", "local"),
                kinds={"local": KindSettings(window=32)},
                rope_scaling="yarn", rope_factor=4.0, rope_original_length=1024)

Layer `i` is of kind `layer_pattern[i % len(layer_pattern)]`; each kind's settings are the
registered defaults (models/kinds.py) overridden by `kinds[name]`. Every invalid field raises a
`ValueError` that says what is allowed, before any parameter is created or anything is traced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

import attention
from models import choices
from models import remat as remat_lib
from models import rope as rope_lib
from models.kinds import KindSettings, available_layer_kinds, get_layer_kind

# `Rope` fields a layer kind may override (`KindSettings.rope`).
_ROPE_OVERRIDES = ("scaling", "factor", "original_length", "yarn_alpha", "yarn_beta",
                   "low_freq_factor", "high_freq_factor", "mscale", "truncate")
_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder LM (`causal=True`) or a bidirectional encoder (`causal=False`, MLM head).

  Attributes:
    vocab_size, d_model, num_layers, num_heads: sizes (positive ints).
    num_kv_heads: K/V heads (GQA/MQA); `num_heads % num_kv_heads == 0`. None = num_heads.
    head_dim: per-head width, even (RoPE). None = d_model // num_heads.
    mlp_dim: hidden width of the gated MLP. None = 4 * d_model.
    mlp: gated MLP variant, a key of `choices.MLP_ACTIVATIONS` ("geglu", "swiglu").
    norm: a key of `choices.NORMS` ("rms", "layer"); pre-norm everywhere.
    causal: decoder (True) or bidirectional encoder (False).
    layer_pattern: tuple of layer kind names, repeated over depth.
    last_layers: kind names of the last `len(last_layers)` layers, replacing the pattern there
      (MoBA's hybrid, the paper's last layers full attention: `last_layers=("global",) * 3`);
      `()` = the pattern all the way down.
    kinds: per-kind overrides `{kind: KindSettings or dict of its fields}` of the registered
      defaults; stored as a sorted tuple of pairs (hashable).
    rope_scaling: "none", "linear" (PI), "ntk" or "yarn" (applies to every layer kind).
    rope_factor: scale s = L'/L (1 for "none").
    rope_original_length: trained context L (required by "yarn").
    rope_yarn_alpha, rope_yarn_beta: YaRN's ramp bounds on `r = L / wavelength` (pairs with
      r < alpha are interpolated, r > beta kept, ramped between; paper: 1 and 32).
    rope_low_freq_factor, rope_high_freq_factor: llama3's band edges (Llama 3.1: 1 and 4).
    rope_mscale: yarn / yarn_hf factor on q and k; None = `0.1 ln(s) + 1`.
    rope_truncate: yarn_hf rounds its ramp's ends to whole pairs (transformers: True).
    tie_embeddings: the output projection reuses the embedding matrix.
    mlm_head: ModernBERT-style head (dense, GELU, norm) before the vocabulary projection.
    qkv_bias, o_bias, mlp_bias: biases on the q/k/v projections, the output projection, the
      MLP's two linear maps (Qwen 2: q/k/v; ModernBERT `attention_bias`: q/k/v and o).
    qk_norm: a `choices.NORMS` key: q and k normalised over head_dim before RoPE (Qwen 3,
      Gemma 3); None = none.
    post_norms: sandwich norms (Gemma 2 / 3): the attention and MLP outputs are normalised
      before their residual add.
    first_attn_norm: False makes layer 0's attention pre-norm the identity (ModernBERT).
    embed_norm: a norm right after the embedding (ModernBERT).
    embed_scale: multiplies the embeddings (Gemma: sqrt(d_model), in the compute dtype).
    attention_scale: logit scale of attention; None = head_dim ** -0.5.
    final_logit_soft_cap: `cap * tanh(logits / cap)` on the output logits (Gemma 2).
    output_bias: a bias on the vocabulary projection (ModernBERT's decoder).
    mlm_head_bias, mlm_activation: the MLM head's dense bias and activation (a
      `choices.ACTIVATIONS` key; "gelu_tanh" by default, ModernBERT "gelu").
    dtype: compute dtype; param_dtype: parameter dtype (bf16 compute + f32 params works).
    remat: remat policy name (models/remat.py): "none", "block" (keep only each scanned
      repeat's input), "dots" (also matmul outputs); old booleans True/False = "block"/"none".
    mlp_chunk: run the MLP this many positions at a time, recomputed in the backward
      (models/tiling.py; same values, less memory at long context); 0 = all at once.
    scan_layers: run the blocks under a `lax.scan` over repeats of the layer pattern
      (models/layer_scan.py); False = a Python loop (same values; slower to compile).
    init_std: stddev of the embedding initialiser.
    norm_eps: epsilon of the norms.
  """

  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  mlp: str = "geglu"
  norm: str = "rms"
  causal: bool = True
  layer_pattern: tuple[str, ...] = ("global",)
  last_layers: tuple[str, ...] = ()
  kinds: Mapping[str, KindSettings] | tuple[tuple[str, KindSettings], ...] = ()
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_length: int | None = None
  rope_yarn_alpha: float = 1.0
  rope_yarn_beta: float = 32.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_mscale: float | None = None
  rope_truncate: bool = True
  tie_embeddings: bool = True
  mlm_head: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: str | None = None
  post_norms: bool = False
  first_attn_norm: bool = True
  embed_norm: bool = False
  embed_scale: float = 1.0
  attention_scale: float | None = None
  final_logit_soft_cap: float | None = None
  output_bias: bool = False
  mlm_head_bias: bool = False
  mlm_activation: str = "gelu_tanh"
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: str = "none"
  scan_layers: bool = True
  mlp_chunk: int = 0
  init_std: float = 0.02
  norm_eps: float = 1e-6

  def __post_init__(self):
    fill = lambda name, value: object.__setattr__(self, name, value)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
      _check_positive_int(name, getattr(self, name))
    if self.num_kv_heads is None:
      fill("num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"head_dim=None needs d_model ({self.d_model}) divisible by num_heads "
                         f"({self.num_heads}); set head_dim explicitly.")
      fill("head_dim", self.d_model // self.num_heads)
    if self.mlp_dim is None:
      fill("mlp_dim", 4 * self.d_model)
    for name in ("num_kv_heads", "head_dim", "mlp_dim"):
      _check_positive_int(name, getattr(self, name))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads}) for GQA/MQA.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
    _check_choice("mlp", self.mlp, choices.MLP_ACTIVATIONS)
    _check_choice("norm", self.norm, choices.NORMS)
    if self.qk_norm is not None:
      _check_choice("qk_norm", self.qk_norm, choices.NORMS)
    _check_choice("mlm_activation", self.mlm_activation, choices.ACTIVATIONS)
    for name in ("embed_scale", "attention_scale", "final_logit_soft_cap"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a number > 0{'' if name == 'embed_scale' else ' or None'}"
                         f", got {value!r}.")
    fill("remat", remat_lib.policy_name(self.remat))
    chunk = self.mlp_chunk
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
      raise ValueError(f"mlp_chunk must be an int >= 0 (0 = no chunking), got {chunk!r}.")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"scan_layers must be True or False, got {self.scan_layers!r}.")
    self._normalise_pattern_and_kinds()
    for name in ("dtype", "param_dtype"):
      fill(name, _check_dtype(name, getattr(self, name)))
    for kind in set(self.layer_kinds):
      if get_layer_kind(kind).attends:
        self.rope(kind)  # validates the rope fields for every kind's theta
    if not self.init_std > 0 or not self.norm_eps > 0:
      raise ValueError(f"init_std and norm_eps must be > 0, got {self.init_std}, {self.norm_eps}.")

  def _normalise_pattern_and_kinds(self):
    pattern = self.layer_pattern
    if isinstance(pattern, str) or not isinstance(pattern, (tuple, list)) or not pattern:
      raise ValueError(f"layer_pattern must be a non-empty tuple of layer kinds, got {pattern!r}.")
    for kind in pattern:
      get_layer_kind(kind)  # ValueError listing the known kinds
    object.__setattr__(self, "layer_pattern", tuple(pattern))
    last = self.last_layers
    if isinstance(last, str) or not isinstance(last, (tuple, list)) or len(last) > self.num_layers:
      raise ValueError(f"last_layers must be a tuple of at most num_layers ({self.num_layers}) "
                       f"layer kinds, got {last!r}.")
    for kind in last:
      get_layer_kind(kind)
    object.__setattr__(self, "last_layers", tuple(last))
    overrides = self.kinds.items() if isinstance(self.kinds, Mapping) else self.kinds
    overrides = tuple(sorted(
        ((name, KindSettings(**settings) if isinstance(settings, Mapping) else settings)
         for name, settings in dict(overrides).items()), key=lambda pair: pair[0]))
    object.__setattr__(self, "kinds", overrides)
    for name, settings in overrides:
      if name not in available_layer_kinds():
        raise ValueError(f"kinds has settings for unknown layer kind {name!r}; known kinds: "
                         f"{available_layer_kinds()}.")
      if not isinstance(settings, KindSettings):
        raise ValueError(f"kinds[{name!r}] must be a KindSettings, got {settings!r}.")
    for name in sorted(set(pattern) | set(self.last_layers) | {name for name, _ in overrides}):
      settings = self.kind_settings(name)
      if not get_layer_kind(name).attends:
        _check_non_attending(name, settings)
        continue
      window = settings.window
      if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"layer kind {name!r}: window must be an int >= 0 (0 = unbounded), got "
                         f"{window!r}.")
      attention.get(settings.attention)  # ValueError listing the registered functions
      sinks = settings.sinks or 0
      if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f"layer kind {name!r}: sinks must be an int >= 0, got {sinks!r}.")
      if sinks and settings.alibi:
        raise ValueError(f"layer kind {name!r}: sinks with alibi=True is not supported (the "
                         f"decoding cache's sink keys carry no distances); use RoPE.")
      if settings.sink is not None and not isinstance(settings.sink, bool):
        raise ValueError(f"layer kind {name!r}: sink must be True, False or None, got "
                         f"{settings.sink!r}.")

  # --- derived ------------------------------------------------------------------------------

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """The kind of every layer: `layer_pattern` repeated over `num_layers`, the last ones
    replaced by `last_layers`."""
    body = self.num_layers - len(self.last_layers)
    return tuple(self.layer_pattern[i % len(self.layer_pattern)] for i in range(body)
                 ) + self.last_layers

  def kind_settings(self, kind: str) -> KindSettings:
    """Registered defaults of `kind` with this config's overrides applied (all fields set)."""
    settings = get_layer_kind(kind).defaults
    override = dict(self.kinds).get(kind)
    return override.merged_into(settings) if override is not None else settings

  def rope(self, kind: str) -> rope_lib.Rope:
    """The RoPE of layers of `kind`: its theta, the model's scaling with the kind's `rope`
    overrides (e.g. `{"scaling": "none"}`) applied."""
    settings = self.kind_settings(kind)
    if not get_layer_kind(kind).attends:
      raise ValueError(f"layer kind {kind!r} has no attention and no RoPE.")
    overrides = dict(settings.rope or ())
    unknown = sorted(set(overrides) - set(_ROPE_OVERRIDES))
    if unknown:
      raise ValueError(f"layer kind {kind!r}: unknown rope overrides {unknown}; known: "
                       f"{list(_ROPE_OVERRIDES)}.")
    fields = dict(scaling=self.rope_scaling, factor=float(self.rope_factor),
                  original_length=self.rope_original_length,
                  yarn_alpha=float(self.rope_yarn_alpha), yarn_beta=float(self.rope_yarn_beta),
                  low_freq_factor=float(self.rope_low_freq_factor),
                  high_freq_factor=float(self.rope_high_freq_factor),
                  mscale=self.rope_mscale, truncate=bool(self.rope_truncate))
    fields.update(overrides)
    return rope_lib.Rope(self.head_dim, float(settings.rope_theta), **fields)

  @classmethod
  def modernbert(cls, **overrides) -> "ModelConfig":
    """A ModernBERT-style encoder: global every third layer (theta 160k), local (64, 64) windows
    (theta 10k), pre-LayerNorm without biases, GeGLU, MLM head. `overrides` set any field."""
    fields = dict(causal=False, layer_pattern=("global", "local", "local"), norm="layer",
                  mlp="geglu", mlm_head=True, num_layers=22,
                  kinds={"global": KindSettings(rope_theta=160_000.0),
                         "local": KindSettings(window=128, rope_theta=10_000.0)})
    fields.update(overrides)
    return cls(**fields)


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_non_attending(kind: str, settings: KindSettings) -> None:
  """A kind without softmax attention (e.g. "gdn") reads only `options`: refuse the rest."""
  unused = [f for f in ("attention", "window", "rope_theta", "alibi", "rope")
            if getattr(settings, f) not in (None, False, ())]
  if unused:
    raise ValueError(f"layer kind {kind!r} has no softmax attention: it reads only `options`, "
                     f"so it cannot take {unused}.")


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; known: {sorted(choices)}.")


def _check_dtype(name: str, value) -> jnp.dtype:
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype not in _FLOAT_DTYPES:
    raise ValueError(f"{name} must be one of {[d.name for d in _FLOAT_DTYPES]}, got {value!r}.")
  return dtype
