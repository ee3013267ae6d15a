"""LlamaForCausalLM and MistralForCausalLM.

Llama: RMSNorm pre-norms, SwiGLU, GQA, untied or tied output, `attention_bias` (q/k/v/o
biases), `mlp_bias`, RoPE with rope_scaling none / linear / dynamic / llama3 / yarn
(`models.hf.hf_config.rope_fields`). Mistral: Llama without biases, every layer a causal
sliding window of `sliding_window` keys including the query itself (transformers' mask:
`q - sliding_window < k <= q`); `sliding_window: null` is full attention.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.hf import decoder, family
from models.hf.hf_config import HfConfig

FULL = {"full_attention": 10_000.0, "sliding_attention": 10_000.0}
LLAMA_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
    max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    attention_bias=False, mlp_bias=False)
MISTRAL_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
    sliding_window=4096)


def llama_from_hf(raw) -> ModelConfig:
  cfg = HfConfig(raw, LLAMA_DEFAULTS)
  fields = decoder.sizes(cfg)
  types = ["full_attention"] * fields["num_layers"]
  bias = bool(cfg.get("attention_bias"))
  config = ModelConfig(**fields, mlp=decoder.mlp_of(cfg, "hidden_act"), norm="rms",
                       qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias")),
                       **family.attention_layout(types, None, decoder.ropes(cfg, types, FULL)))
  cfg.finish()
  return config


def _plain_decoder(config: ModelConfig, architecture: str) -> None:
  family.require(config, architecture, causal=True, norm="rms", qk_norm=None, post_norms=False,
                 first_attn_norm=True, embed_norm=False, embed_scale=1.0, attention_scale=None,
                 final_logit_soft_cap=None, output_bias=False, mlm_head=False)
  if family.kind_options(config):
    raise ValueError(f"{architecture} cannot express attention options "
                     f"{family.kind_options(config)}.")


def llama_to_hf(config: ModelConfig) -> dict:
  _plain_decoder(config, "LlamaForCausalLM")
  if config.o_bias != config.qkv_bias:
    raise ValueError("LlamaForCausalLM's attention_bias sets q/k/v and o biases together.")
  types = family.layer_types(config)
  if "sliding_attention" in types:
    raise ValueError("LlamaForCausalLM has no sliding-window layers.")
  return dict(decoder.hf_sizes(config, "hidden_act"), architectures=["LlamaForCausalLM"],
              model_type="llama", attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias,
              **decoder.hf_ropes(config, types, nested=False))


def mistral_from_hf(raw) -> ModelConfig:
  cfg = HfConfig(raw, MISTRAL_DEFAULTS)
  fields = decoder.sizes(cfg)
  window = cfg.get("sliding_window")
  types = ["sliding_attention" if window else "full_attention"] * fields["num_layers"]
  config = ModelConfig(**fields, mlp=decoder.mlp_of(cfg, "hidden_act"), norm="rms",
                       **family.attention_layout(types, window, decoder.ropes(cfg, types, FULL)))
  cfg.finish()
  return config


def mistral_to_hf(config: ModelConfig) -> dict:
  _plain_decoder(config, "MistralForCausalLM")
  family.require(config, "MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False)
  types = family.layer_types(config)
  if len(set(types)) > 1:
    raise ValueError("MistralForCausalLM has all layers windowed or none.")
  return dict(decoder.hf_sizes(config, "hidden_act"), architectures=["MistralForCausalLM"],
              model_type="mistral", sliding_window=family.window(config),
              **decoder.hf_ropes(config, types, nested=False))


family.register(family.Family("LlamaForCausalLM", llama_from_hf, llama_to_hf, decoder.params,
                              decoder.IGNORED_WEIGHTS))
family.register(family.Family("MistralForCausalLM", mistral_from_hf, mistral_to_hf,
                              decoder.params, decoder.IGNORED_WEIGHTS))
