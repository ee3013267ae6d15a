"""What the Llama-style decoder families share: config fields, RoPE reading, weight names.

Llama, Mistral, Qwen 2 / 3 and Gemma 2 / 3 all name their weights the same way
(`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`model.norm`, `lm_head`); their norms around the blocks differ:

    NNX (models.transformer.Block)   Llama-style                 Gemma 2 / 3 (post_norms)
    attn_norm                        input_layernorm             input_layernorm
    attn_post_norm                   -                           post_attention_layernorm
    mlp_norm                         post_attention_layernorm    pre_feedforward_layernorm
    mlp_post_norm                    -                           post_feedforward_layernorm

Projections: q `[N*H, D]` -> kernel `[D, N, H]`; o `[D, N*H]` -> `[N, H, D]`; gate and up
`[F, D]` -> the fused `[D, 2F]` kernel `[gate | up]`; down `[D, F]` -> `[F, D]`.
"""

from __future__ import annotations

from typing import Any, Iterable

from models.config import ModelConfig
from models.hf import hf_config
from models.hf.weights import Param, Part, linear, plain

# transformers activation name -> gated MLP of models.choices (and back).
MLP_OF_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu",
              "gelu_new": "geglu", "gelu": "geglu_exact"}
ACT_OF_MLP = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh", "geglu_exact": "gelu"}
IGNORED_WEIGHTS = (r"lm_head\.weight", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def mlp_of(cfg: hf_config.HfConfig, key: str) -> str:
  act = cfg.get(key)
  if act not in MLP_OF_ACT:
    raise ValueError(f"config {key}={act!r} is not supported; supported: {sorted(MLP_OF_ACT)}.")
  return MLP_OF_ACT[act]


def sizes(cfg: hf_config.HfConfig, head_dim_key: str | None = "head_dim") -> dict[str, Any]:
  """The ModelConfig sizes every decoder family has (transformers' keys and defaults)."""
  d, n = cfg.get("hidden_size"), cfg.get("num_attention_heads")
  kv = cfg.get("num_key_value_heads")
  head_dim = cfg.get(head_dim_key) if head_dim_key else None
  return dict(vocab_size=cfg.get("vocab_size"), d_model=d, num_layers=cfg.get("num_hidden_layers"),
              num_heads=n, num_kv_heads=kv if kv is not None else n,
              head_dim=head_dim if head_dim is not None else d // n,
              mlp_dim=cfg.get("intermediate_size"), norm_eps=float(cfg.get("rms_norm_eps")),
              tie_embeddings=bool(cfg.get("tie_word_embeddings")), causal=True)


def hf_sizes(config: ModelConfig, act_key: str) -> dict[str, Any]:
  """Inverse of `sizes` (+ the activation under `act_key`)."""
  if config.mlp not in ACT_OF_MLP:
    raise ValueError(f"mlp {config.mlp!r} has no transformers activation.")
  return dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
              num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
              num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
              intermediate_size=config.mlp_dim, rms_norm_eps=config.norm_eps,
              tie_word_embeddings=config.tie_embeddings, dtype=config.param_dtype.name,
              **{act_key: ACT_OF_MLP[config.mlp]})


def ropes(cfg: hf_config.HfConfig, layer_types: Iterable[str], default_theta: dict[str, float],
          legacy_theta: dict[str, str] | None = None, scaled: Iterable[str] | None = None
          ) -> dict[str, tuple[float, dict]]:
  """`{layer_type: (theta, Rope fields)}` from `rope_parameters` (transformers 5, flat or per
  layer type) or the older `rope_theta` / `rope_scaling` (+ per-type theta keys
  `legacy_theta`, and `rope_scaling` applying to the `scaled` types only: Gemma 3)."""
  max_pos = cfg.get("max_position_embeddings")
  types = sorted(set(layer_types))
  thetas = {}
  for t in types:  # older per-type theta keys, the defaults of a rope_parameters without theta
    key = (legacy_theta or {}).get(t, "rope_theta")
    thetas[t] = cfg.get(key) if key in cfg else default_theta[t]
  scaling = dict(cfg.get("rope_scaling") or {}) if "rope_scaling" in cfg else {}
  params = cfg.get("rope_parameters") if "rope_parameters" in cfg else None
  if params:
    nested = [t for t in params if t in ("full_attention", "sliding_attention")]
    per_type = {t: dict(params[t] if nested else params) for t in types}
  else:
    per_type = {t: dict(scaling if scaled is None or t in scaled else {}, rope_theta=thetas[t])
                for t in types}
  return {t: hf_config.rope_fields(per_type[t], max_pos, thetas[t]) for t in types}


def hf_ropes(config: ModelConfig, layer_types: list[str], nested: bool) -> dict[str, Any]:
  """`rope_parameters` (and max_position_embeddings) of `config` for config.json."""
  kinds = sorted(set(config.layer_kinds))
  by_kind = {kind: config.rope(kind) for kind in kinds}
  out = {t: hf_config.hf_rope(by_kind[k]) for t, k in zip(layer_types, config.layer_kinds)}
  if not nested and len({repr(sorted(v.items())) for v in out.values()}) > 1:
    raise ValueError("this architecture has one RoPE for all layers; the layer kinds differ.")
  lengths = [r.original_length for r in by_kind.values() if r.original_length]
  return dict(rope_parameters=out if nested else next(iter(out.values())),
              max_position_embeddings=hf_config.max_positions(
                  by_kind, max(lengths) if lengths else 4096))


def params(config: ModelConfig) -> list[Param]:
  """Every NNX parameter of a decoder `config` and its transformers tensors."""
  out = [plain("embed.embedding", "model.embed_tokens.weight", (1, 1)),
         plain("final_norm.scale", "model.norm.weight")]
  if not config.tie_embeddings:
    out.append(linear("lm_head.kernel", "lm_head.weight"))
  for i in range(config.num_layers):
    out += _layer(config, f"blocks.{i}", f"model.layers.{i}")
  return out


def _layer(config: ModelConfig, ours: str, hf: str) -> list[Param]:
  attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
  out = [plain(f"{ours}.attn_norm.scale", f"{hf}.input_layernorm.weight"),
         linear(f"{ours}.attn.o_proj.kernel", f"{attn}.o_proj.weight", (2, 1)),
         linear(f"{ours}.mlp.wo.kernel", f"{mlp}.down_proj.weight"),
         Param(f"{ours}.mlp.wi.kernel", (Part(f"{mlp}.gate_proj.weight", transpose=True),
                                         Part(f"{mlp}.up_proj.weight", transpose=True)), (1, 1))]
  for p in "qkv":
    out.append(linear(f"{ours}.attn.{p}_proj.kernel", f"{attn}.{p}_proj.weight", (1, 2)))
    if config.qkv_bias:
      out.append(plain(f"{ours}.attn.{p}_proj.bias", f"{attn}.{p}_proj.bias", (2,)))
  if config.o_bias:
    out.append(plain(f"{ours}.attn.o_proj.bias", f"{attn}.o_proj.bias"))
  if config.qk_norm:
    out += [plain(f"{ours}.attn.{p}_norm.scale", f"{attn}.{p}_norm.weight") for p in "qk"]
  if config.mlp_bias:
    out += [Param(f"{ours}.mlp.wi.bias", (Part(f"{mlp}.gate_proj.bias"),
                                          Part(f"{mlp}.up_proj.bias")), (1,)),
            plain(f"{ours}.mlp.wo.bias", f"{mlp}.down_proj.bias")]
  if config.post_norms:
    out += [plain(f"{ours}.attn_post_norm.scale", f"{hf}.post_attention_layernorm.weight"),
            plain(f"{ours}.mlp_norm.scale", f"{hf}.pre_feedforward_layernorm.weight"),
            plain(f"{ours}.mlp_post_norm.scale", f"{hf}.post_feedforward_layernorm.weight")]
  else:
    out.append(plain(f"{ours}.mlp_norm.scale", f"{hf}.post_attention_layernorm.weight"))
  return out
