"""Qwen2ForCausalLM and Qwen3ForCausalLM: Llama-style decoders.

Qwen 2: q/k/v biases (no o bias), no `attention_bias` key. Qwen 3: per-head RMSNorm of q and k
over head_dim before RoPE (`q_norm`, `k_norm`), `attention_bias` for q/k/v/o. Both may window
layers: `layer_types`, or with `use_sliding_window` every layer `i >= max_window_layers` is a
causal `sliding_window` (as transformers' configs derive it).
"""

from __future__ import annotations

from models.config import ModelConfig
from models.hf import decoder, family
from models.hf.hf_config import HfConfig
from models.hf.llama import FULL

_COMMON = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
    use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None)
QWEN2_DEFAULTS = dict(_COMMON, head_dim=None)
QWEN3_DEFAULTS = dict(_COMMON, head_dim=128, attention_bias=False)


def _layer_types(cfg: HfConfig, num_layers: int) -> tuple[list[str], int | None]:
  window = cfg.get("sliding_window")
  window = window if cfg.get("use_sliding_window") else None  # as transformers' config
  first = cfg.get("max_window_layers")
  types = cfg.get("layer_types") or [
      "sliding_attention" if window is not None and i >= first else "full_attention"
      for i in range(num_layers)]
  return list(types), window


def _from_hf(raw, defaults: dict, **extra) -> ModelConfig:
  cfg = HfConfig(raw, defaults)
  fields = decoder.sizes(cfg)
  types, window = _layer_types(cfg, fields["num_layers"])
  if "attention_bias" in defaults:  # Qwen 3
    bias = bool(cfg.get("attention_bias"))
    extra = dict(extra, qkv_bias=bias, o_bias=bias)
  config = ModelConfig(**fields, mlp=decoder.mlp_of(cfg, "hidden_act"), norm="rms", **extra,
                       **family.attention_layout(types, window, decoder.ropes(cfg, types, FULL)))
  cfg.finish()
  return config


def _to_hf(config: ModelConfig, architecture: str, model_type: str, **fields) -> dict:
  family.require(config, architecture, causal=True, norm="rms", post_norms=False,
                 first_attn_norm=True, embed_norm=False, embed_scale=1.0, attention_scale=None,
                 final_logit_soft_cap=None, output_bias=False, mlm_head=False, mlp_bias=False,
                 mlp="swiglu")
  if family.kind_options(config):
    raise ValueError(f"{architecture} cannot express attention options.")
  types = family.layer_types(config)
  window = family.window(config)
  return dict(decoder.hf_sizes(config, "hidden_act"), architectures=[architecture],
              model_type=model_type, layer_types=types, use_sliding_window=window is not None,
              sliding_window=window, max_window_layers=config.num_layers, **fields,
              **decoder.hf_ropes(config, types, nested=False))


def qwen2_to_hf(config: ModelConfig) -> dict:
  family.require(config, "Qwen2ForCausalLM", qkv_bias=True, o_bias=False, qk_norm=None)
  return _to_hf(config, "Qwen2ForCausalLM", "qwen2")


def qwen3_to_hf(config: ModelConfig) -> dict:
  family.require(config, "Qwen3ForCausalLM", qk_norm="rms", o_bias=config.qkv_bias)
  return _to_hf(config, "Qwen3ForCausalLM", "qwen3", attention_bias=config.qkv_bias)


family.register(family.Family(
    "Qwen2ForCausalLM", lambda raw: _from_hf(raw, QWEN2_DEFAULTS, qkv_bias=True),
    qwen2_to_hf, decoder.params, decoder.IGNORED_WEIGHTS))
family.register(family.Family(
    "Qwen3ForCausalLM", lambda raw: _from_hf(raw, QWEN3_DEFAULTS, qk_norm="rms"),
    qwen3_to_hf, decoder.params, decoder.IGNORED_WEIGHTS))
