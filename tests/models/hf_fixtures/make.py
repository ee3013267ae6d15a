"""Builds the Hugging Face parity fixtures: tiny random transformers models + golden outputs.

    pip install torch transformers safetensors   # a CPU torch is enough
    PYTHONPATH=. python tests/models/hf_fixtures/make.py [CASE ...]

Not run by CI (which has no torch): the fixtures it writes are committed. For each case in
`CASES` it builds a transformers model of that architecture with odd sizes (GQA / MQA, head dims
that are not powers of two, windows shorter than the sequence), perturbs every parameter
(norm weights and biases included) so nothing is trivially 0 or 1, saves it with
`save_pretrained` (safetensors; some cases sharded with an index), and writes `golden.npz`:

* `tokens [2, T]`, `mask [2, T]` (row 1 right-padded), `logits [2, T, V]` float32 from the
  transformers forward with that attention mask (eager attention);
* decoders: `prompt [2, P]` and `greedy [2, P + 16]`, transformers' greedy `generate` (KV
  cache) from a freshly loaded copy (dynamic RoPE remembers lengths across calls).

`tests/models/test_hf_live.py` reuses `build` and `golden` against freshly built models.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
T, P, NEW, V = 12, 6, 16, 61

_DEC = dict(vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
_GEMMA = dict(_DEC, head_dim=12, num_hidden_layers=2, query_pre_attn_scalar=20,
              sliding_window=4, layer_types=["sliding_attention", "full_attention"])

# name -> (architecture, config kwargs, save kwargs)
CASES = {
    "llama": ("LlamaForCausalLM", dict(_DEC), dict(max_shard_size="20KB")),
    "llama_mqa_bias_tied_linear": ("LlamaForCausalLM", dict(
        _DEC, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, hidden_size=40, head_dim=10,
        rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0)), {}),
    "llama_dynamic": ("LlamaForCausalLM", dict(
        _DEC, max_position_embeddings=8,
        rope_parameters=dict(rope_type="dynamic", factor=3.0, rope_theta=10000.0)), {}),
    "llama_llama3": ("LlamaForCausalLM", dict(
        _DEC, max_position_embeddings=256, rope_parameters=dict(
            rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64, rope_theta=10000.0)), {}),
    "llama_yarn": ("LlamaForCausalLM", dict(
        _DEC, max_position_embeddings=128, rope_parameters=dict(
            rope_type="yarn", factor=8.0, original_max_position_embeddings=16, beta_fast=8.0,
            beta_slow=0.5, mscale=1.0, mscale_all_dim=0.5, truncate=False,
            rope_theta=10000.0)), {}),
    "mistral": ("MistralForCausalLM", dict(_DEC, sliding_window=5, num_key_value_heads=1), {}),
    "qwen2": ("Qwen2ForCausalLM", dict(_DEC, hidden_size=60, num_attention_heads=6,
                                       num_key_value_heads=2), {}),
    "qwen3": ("Qwen3ForCausalLM", dict(
        _DEC, head_dim=10, use_sliding_window=True, sliding_window=6, max_window_layers=0),
        dict(max_shard_size="30KB")),
    "gemma3": ("Gemma3ForCausalLM", dict(_GEMMA, rope_parameters={
        "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
        "sliding_attention": dict(rope_type="default", rope_theta=1e4)}), {}),
    "gemma2": ("Gemma2ForCausalLM", dict(_GEMMA, attn_logit_softcapping=3.0,
                                         final_logit_softcapping=4.0), {}),
    "modernbert": ("ModernBertForMaskedLM", dict(
        vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, local_attention=6, initializer_range=0.2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), {}),
    "modernbert_bias": ("ModernBertForMaskedLM", dict(
        vocab_size=V, hidden_size=36, intermediate_size=28, num_hidden_layers=2,
        num_attention_heads=3, local_attention=5, initializer_range=0.2, norm_bias=True,
        attention_bias=True, mlp_bias=True, classifier_bias=True, decoder_bias=True,
        classifier_activation="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2), {}),
}


def config_of(name: str):
  architecture, kwargs, _ = CASES[name]
  cls = transformers.AutoConfig.for_model(_MODEL_TYPE[architecture]).__class__
  return cls(**kwargs)


_MODEL_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "Gemma3ForCausalLM": "gemma3_text", "Gemma2ForCausalLM": "gemma2",
               "ModernBertForMaskedLM": "modernbert"}


def build(name: str, seed: int = 0):
  """A float32 transformers model of case `name`, every parameter perturbed."""
  torch.manual_seed(seed)
  architecture = CASES[name][0]
  model = getattr(transformers, architecture)(config_of(name))
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  return model.float().eval()


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, size=(2, T))
  mask = np.ones((2, T), np.int64)
  mask[1, T - 4:] = 0
  return dict(tokens=tokens, mask=mask, prompt=rng.integers(3, V, size=(2, P)))


def golden(model, data: dict[str, np.ndarray], fresh=None) -> dict[str, np.ndarray]:
  """Logits of `data` and (decoders) the greedy continuation, from `fresh` (a newly loaded
  copy; default `model`)."""
  out = dict(data)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(data["tokens"]),
                   attention_mask=torch.tensor(data["mask"])).logits
    out["logits"] = logits.float().numpy()
    if "ForCausalLM" in type(model).__name__:
      fresh = model if fresh is None else fresh
      prompt = torch.tensor(data["prompt"])
      fresh.generation_config.eos_token_id = None
      out["greedy"] = fresh.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0).numpy()
  return out


def make(name: str, root: str = HERE) -> str:
  path = os.path.join(root, name)
  shutil.rmtree(path, ignore_errors=True)
  model = build(name)
  model.save_pretrained(path, safe_serialization=True, **CASES[name][2])
  fresh = type(model).from_pretrained(path, attn_implementation="eager").float().eval()
  np.savez_compressed(os.path.join(path, "golden.npz"), **golden(model, inputs(), fresh))
  return path


if __name__ == "__main__":
  for case in sys.argv[1:] or list(CASES):
    print(make(case))
