"""Gemma3ForCausalLM (text only) and Gemma2ForCausalLM.

Both: `(1 + w)` RMSNorms computed in float32 (`rms_offset`) as pre-norms and as sandwich
post-norms (`post_attention_layernorm`, `pre_feedforward_layernorm`,
`post_feedforward_layernorm`), embeddings times `sqrt(hidden_size)` rounded to the compute dtype,
attention logit scale `query_pre_attn_scalar ** -0.5`, GeGLU (`gelu_pytorch_tanh`), tied output,
sliding and full layers (`layer_types`; causal windows of `sliding_window` keys including the
query). Gemma 3: q/k `(1 + w)` RMSNorm, full layers use `rope_theta` with `rope_scaling`,
sliding layers `rope_local_base_freq` unscaled (transformers 5: `rope_parameters` per layer
type); default pattern: every 6th layer full. Gemma 2: attention logit soft-cap
(`attn_logit_softcapping`, every layer) and final logit soft-cap; one RoPE; every other layer
(the 2nd, 4th, ...) full. `use_bidirectional_attention` (embedding models) is refused.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.hf import decoder, family
from models.hf.hf_config import HfConfig

_COMMON = dict(
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_size=2304,
    intermediate_size=9216, num_hidden_layers=26, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
    query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
    use_bidirectional_attention=None)
GEMMA3_DEFAULTS = dict(_COMMON, vocab_size=262_208, max_position_embeddings=131_072,
                       final_logit_softcapping=None, attn_logit_softcapping=None)
GEMMA2_DEFAULTS = dict(_COMMON, vocab_size=256000, max_position_embeddings=8192,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
# transformers' Gemma reads hidden_activation; hidden_act is a leftover key it never uses.
_IGNORED = ("hidden_act", "_sliding_window_pattern", "sliding_window_pattern")


def _gemma3_ropes(cfg: HfConfig, types: list[str]) -> dict:
  return decoder.ropes(cfg, types, {"full_attention": 1e6, "sliding_attention": 1e4},
                       {"sliding_attention": "rope_local_base_freq"}, ("full_attention",))


def _gemma2_ropes(cfg: HfConfig, types: list[str]) -> dict:
  return decoder.ropes(cfg, types, {"full_attention": 1e4, "sliding_attention": 1e4})


def _from_hf(raw, defaults: dict, every: int, ropes_of, **extra) -> ModelConfig:
  cfg = HfConfig(raw, defaults, ignored=_IGNORED)
  fields = decoder.sizes(cfg)
  if cfg.get("use_bidirectional_attention"):
    raise ValueError("use_bidirectional_attention=True (Gemma embedding models) is not "
                     "supported.")
  every = int(raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", every)))
  types = cfg.get("layer_types") or [
      "sliding_attention" if (i + 1) % every else "full_attention"
      for i in range(fields["num_layers"])]
  ropes = ropes_of(cfg, types)
  cap = cfg.get("attn_logit_softcapping")
  bias = bool(cfg.get("attention_bias"))
  config = ModelConfig(
      **fields, mlp=decoder.mlp_of(cfg, "hidden_activation"), norm="rms_offset",
      post_norms=True, embed_scale=float(fields["d_model"]) ** 0.5, qkv_bias=bias, o_bias=bias,
      attention_scale=float(cfg.get("query_pre_attn_scalar")) ** -0.5,
      final_logit_soft_cap=cfg.get("final_logit_softcapping"), **extra,
      **family.attention_layout(types, cfg.get("sliding_window"), ropes,
                                {"logits_soft_cap": float(cap)} if cap else None))
  cfg.finish()
  return config


def _to_hf(config: ModelConfig, architecture: str, model_type: str, nested: bool) -> dict:
  family.require(config, architecture, causal=True, norm="rms_offset", post_norms=True,
                 first_attn_norm=True, embed_norm=False, output_bias=False, mlm_head=False,
                 mlp_bias=False, o_bias=config.qkv_bias, tie_embeddings=True,
                 embed_scale=float(config.d_model) ** 0.5)
  options = family.kind_options(config)
  if set(options) - {"logits_soft_cap"}:
    raise ValueError(f"{architecture} cannot express attention options {options}.")
  scalar = (config.attention_scale or config.head_dim ** -0.5) ** -2
  scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
  types = family.layer_types(config)
  return dict(decoder.hf_sizes(config, "hidden_activation"), architectures=[architecture],
              model_type=model_type, layer_types=types, sliding_window=family.window(config),
              attention_bias=config.qkv_bias, query_pre_attn_scalar=scalar,
              attn_logit_softcapping=options.get("logits_soft_cap"),
              final_logit_softcapping=config.final_logit_soft_cap,
              **decoder.hf_ropes(config, types, nested=nested))


def gemma3_to_hf(config: ModelConfig) -> dict:
  family.require(config, "Gemma3ForCausalLM", qk_norm="rms_offset")
  return _to_hf(config, "Gemma3ForCausalLM", "gemma3_text", nested=True)


def gemma2_to_hf(config: ModelConfig) -> dict:
  family.require(config, "Gemma2ForCausalLM", qk_norm=None)
  return _to_hf(config, "Gemma2ForCausalLM", "gemma2", nested=False)


family.register(family.Family(
    "Gemma3ForCausalLM", lambda raw: _from_hf(raw, GEMMA3_DEFAULTS, 6, _gemma3_ropes,
                                              qk_norm="rms_offset"),
    gemma3_to_hf, decoder.params, decoder.IGNORED_WEIGHTS))
family.register(family.Family(
    "Gemma2ForCausalLM", lambda raw: _from_hf(raw, GEMMA2_DEFAULTS, 2, _gemma2_ropes), gemma2_to_hf,
    decoder.params, decoder.IGNORED_WEIGHTS))
