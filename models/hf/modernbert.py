"""ModernBertForMaskedLM: the bidirectional encoder with its MLM head.

    HF                                         NNX
    model.embeddings.tok_embeddings            embed.embedding
    model.embeddings.norm                      embed_norm            (embed_norm=True)
    model.layers.{i}.attn_norm (i > 0)         blocks.{i}.attn_norm  (layer 0: Identity)
    model.layers.{i}.attn.Wqkv [3D, D]         blocks.{i}.attn.{q,k,v}_proj (rows 0:D, D:2D, 2D:3D)
    model.layers.{i}.attn.Wo                   blocks.{i}.attn.o_proj
    model.layers.{i}.mlp_norm, mlp.Wi, mlp.Wo  blocks.{i}.mlp_norm, mlp.wi ([input | gate]), mlp.wo
    model.final_norm                           final_norm
    head.dense, head.norm                      mlm_head.dense, mlm_head.norm
    decoder.bias (weight tied)                 output_bias

Layer `i` is global every `global_attn_every_n_layers` (i % n == 0, theta `global_rope_theta`)
and local otherwise: a bidirectional window, `|q - k| <= local_attention // 2` as transformers'
mask (`KindSettings(window=local_attention)` gives `(w // 2, w // 2)`), theta
`local_rope_theta`; transformers 5 writes `layer_types` and per-type `rope_parameters`.
LayerNorms have a bias only with `norm_bias`; `attention_bias` (Wqkv, Wo), `mlp_bias` (Wi, Wo),
`classifier_bias` (head.dense), `decoder_bias` are honoured; activations `hidden_activation`
(GeGLU with exact GELU for "gelu") and `classifier_activation`.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.hf import decoder, family
from models.hf.hf_config import HfConfig
from models.hf.weights import Param, linear, plain

DEFAULTS = dict(
    vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
    num_attention_heads=12, hidden_activation="gelu", max_position_embeddings=8192,
    norm_eps=1e-5, norm_bias=False, attention_bias=False, local_attention=128, mlp_bias=False,
    decoder_bias=True, classifier_bias=False, classifier_activation="gelu",
    tie_word_embeddings=True, layer_types=None, global_attn_every_n_layers=3)
# Training-only or unused by transformers' ModernBertForMaskedLM forward (layer_norm_eps and
# position_embedding_type are leftovers of its hub configs; norm_eps is the one it reads).
IGNORED = ("embedding_dropout", "mlp_dropout", "classifier_dropout", "classifier_pooling",
           "initializer_cutoff_factor", "deterministic_flash_attn", "sparse_prediction",
           "sparse_pred_ignore_index", "cls_token_id", "sep_token_id", "reference_compile",
           "repad_logits_with_grad", "gradient_checkpointing", "layer_norm_eps",
           "position_embedding_type")
ACTIVATION = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
              "silu": "silu"}
HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def from_hf(raw) -> ModelConfig:
  cfg = HfConfig(raw, DEFAULTS, ignored=IGNORED)
  d, n = cfg.get("hidden_size"), cfg.get("num_attention_heads")
  layers = cfg.get("num_hidden_layers")
  every = cfg.get("global_attn_every_n_layers")
  types = cfg.get("layer_types") or [
      "sliding_attention" if i % every else "full_attention" for i in range(layers)]
  ropes = decoder.ropes(cfg, types, {"full_attention": 160_000.0, "sliding_attention": 10_000.0},
                        {"full_attention": "global_rope_theta",
                         "sliding_attention": "local_rope_theta"})
  activation = cfg.get("classifier_activation")
  if activation not in ACTIVATION:
    raise ValueError(f"classifier_activation {activation!r} is not supported; supported: "
                     f"{sorted(ACTIVATION)}.")
  attention_bias = bool(cfg.get("attention_bias"))
  config = ModelConfig(
      vocab_size=cfg.get("vocab_size"), d_model=d, num_layers=layers, num_heads=n,
      head_dim=d // n, mlp_dim=cfg.get("intermediate_size"),
      mlp=decoder.mlp_of(cfg, "hidden_activation"), causal=False,
      norm="layer_bias" if cfg.get("norm_bias") else "layer", norm_eps=float(cfg.get("norm_eps")),
      qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(cfg.get("mlp_bias")),
      embed_norm=True, first_attn_norm=False, mlm_head=True,
      mlm_head_bias=bool(cfg.get("classifier_bias")), mlm_activation=ACTIVATION[activation],
      output_bias=bool(cfg.get("decoder_bias")),
      tie_embeddings=bool(cfg.get("tie_word_embeddings")),
      **family.attention_layout(types, cfg.get("local_attention"), ropes))
  cfg.finish()
  return config


def to_hf(config: ModelConfig) -> dict:
  arch = "ModernBertForMaskedLM"
  family.require(config, arch, causal=False, mlm_head=True, embed_norm=True,
                 first_attn_norm=False, post_norms=False, qk_norm=None, embed_scale=1.0,
                 attention_scale=None, final_logit_soft_cap=None, o_bias=config.qkv_bias,
                 num_kv_heads=config.num_heads, head_dim=config.d_model // config.num_heads)
  if config.norm not in ("layer", "layer_bias") or family.kind_options(config):
    raise ValueError(f"{arch} needs LayerNorms and no attention options.")
  types = family.layer_types(config)
  out = dict(decoder.hf_sizes(config, "hidden_activation"), architectures=[arch],
             model_type="modernbert", layer_types=types,
             local_attention=family.window(config) or 128,
             norm_eps=config.norm_eps, norm_bias=config.norm == "layer_bias",
             attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias,
             decoder_bias=config.output_bias, classifier_bias=config.mlm_head_bias,
             classifier_activation=HF_ACTIVATION[config.mlm_activation],
             **decoder.hf_ropes(config, types, nested=True))
  for key in ("rms_norm_eps", "num_key_value_heads", "head_dim"):
    out.pop(key)
  return dict(out, cls_token_id=None, sep_token_id=None)  # not kept: tokenizer business


def _norm(config: ModelConfig, ours: str, hf: str) -> list[Param]:
  out = [plain(f"{ours}.scale", f"{hf}.weight")]
  return out + [plain(f"{ours}.bias", f"{hf}.bias")] if config.norm == "layer_bias" else out


def _linear(config_bias: bool, ours: str, hf: str, split=(1, 1), rows=None, bias_split=(1,)):
  out = [linear(f"{ours}.kernel", f"{hf}.weight", split, rows)]
  return out + [plain(f"{ours}.bias", f"{hf}.bias", bias_split, rows)] if config_bias else out


def params(config: ModelConfig) -> list[Param]:
  out = [plain("embed.embedding", "model.embeddings.tok_embeddings.weight", (1, 1))]
  out += _norm(config, "embed_norm", "model.embeddings.norm")
  out += _norm(config, "final_norm", "model.final_norm")
  out += _linear(config.mlm_head_bias, "mlm_head.dense", "head.dense")
  out += _norm(config, "mlm_head.norm", "head.norm")
  if config.output_bias:
    out.append(plain("output_bias", "decoder.bias"))
  if not config.tie_embeddings:
    out.append(linear("lm_head.kernel", "decoder.weight"))
  d = config.d_model
  for i in range(config.num_layers):
    ours, hf = f"blocks.{i}", f"model.layers.{i}"
    if i > 0:
      out += _norm(config, f"{ours}.attn_norm", f"{hf}.attn_norm")
    for j, p in enumerate("qkv"):
      out += _linear(config.qkv_bias, f"{ours}.attn.{p}_proj", f"{hf}.attn.Wqkv", (1, 2),
                     (j * d, (j + 1) * d), (2,))
    out += _linear(config.o_bias, f"{ours}.attn.o_proj", f"{hf}.attn.Wo", (2, 1))
    out += _norm(config, f"{ours}.mlp_norm", f"{hf}.mlp_norm")
    out += _linear(config.mlp_bias, f"{ours}.mlp.wi", f"{hf}.mlp.Wi")
    out += _linear(config.mlp_bias, f"{ours}.mlp.wo", f"{hf}.mlp.Wo")
  return out


family.register(family.Family("ModernBertForMaskedLM", from_hf, to_hf, params,
                              (r"decoder\.weight",)))
