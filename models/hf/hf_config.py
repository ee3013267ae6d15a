"""Reading a Hugging Face config.json strictly, and its RoPE parameters both ways.

`HfConfig(raw, defaults, ignored)`: `get(key)` returns the value in config.json or, when the key
is absent, the default transformers' config class would use (`defaults`, per family), and
records that the key was understood. `finish()` raises a ValueError naming every key of
config.json that was neither read nor declared irrelevant (`ignored`: token ids, dropout,
initialiser ranges, ...), so nothing is silently dropped.

RoPE (`rope_fields` / `hf_rope`): transformers' rope types map to `models.rope` scalings:
default -> none, linear -> linear, dynamic -> dynamic (L = max_position_embeddings), llama3 ->
llama3, yarn -> yarn_hf (beta_fast/beta_slow -> yarn_beta/yarn_alpha, attention_factor or
mscale/mscale_all_dim -> mscale). longrope, proportional and partial rotary are refused.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

# Keys no family needs for the forward pass: ids, training-only settings, bookkeeping.
COMMON_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "output_attentions", "output_hidden_states", "return_dict",
    "is_decoder", "pretraining_tp", "cache_implementation", "_attn_implementation_autoset",
    "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "tokenizer_class",
    "max_position_embeddings",
})


class HfConfig:
  """config.json of one family; see the module docstring."""

  def __init__(self, raw: Mapping[str, Any], defaults: Mapping[str, Any],
               ignored: Iterable[str] = ()):
    self.raw = dict(raw)
    self.defaults = dict(defaults)
    self.ignored = COMMON_IGNORED | frozenset(ignored)
    self.used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.raw

  def get(self, key: str) -> Any:
    self.used.add(key)
    if key in self.raw:
      return self.raw[key]
    if key not in self.defaults:
      raise ValueError(f"config.json has no {key!r} and this family has no default for it.")
    return self.defaults[key]

  def expect(self, key: str, *allowed: Any) -> Any:
    """`get(key)`, which must be one of `allowed` (a ValueError says what is supported)."""
    value = self.get(key)
    if value not in allowed:
      raise ValueError(f"config {key}={value!r} is not supported; supported: {list(allowed)}.")
    return value

  def finish(self) -> None:
    unknown = sorted(set(self.raw) - self.used - self.ignored)
    if unknown:
      raise ValueError(f"config.json keys this loader does not understand: {unknown} (they "
                       f"might change the model; nothing is silently dropped).")


def dtype_name(raw: Mapping[str, Any]) -> str | None:
  """"float32" / "bfloat16" / "float16" from config.json's dtype (or torch_dtype), or None."""
  value = raw.get("dtype", raw.get("torch_dtype"))
  if value is None:
    return None
  name = str(value).replace("torch.", "")
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config dtype {value!r} is not supported (float32, bfloat16, float16).")
  return name


# --- RoPE ---------------------------------------------------------------------------------------

_ROPE_KEYS = {  # rope type -> keys it may carry (besides rope_type / type / rope_theta)
    "default": set(), "linear": {"factor"}, "dynamic": {"factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
}
_SCALING = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3",
            "yarn": "yarn_hf"}


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_fields(params: Mapping[str, Any], max_position_embeddings: int,
                default_theta: float) -> tuple[float, dict[str, Any]]:
  """`(theta, Rope fields)` of one transformers rope dict (rope_parameters or rope_scaling)."""
  params = dict(params or {})
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  theta = float(params.pop("rope_theta", default_theta))
  if params.pop("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError("partial_rotary_factor != 1 (RoPE on part of the head) is not supported.")
  if rope_type not in _ROPE_KEYS:
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                     f"{sorted(_ROPE_KEYS)}.")
  unknown = sorted(set(params) - _ROPE_KEYS[rope_type])
  if unknown:
    raise ValueError(f"rope type {rope_type!r}: parameters {unknown} are not understood.")
  fields: dict[str, Any] = dict(scaling=_SCALING[rope_type])
  if rope_type == "default":
    return theta, fields
  original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
  factor = params.get("factor")
  if factor is None and rope_type == "yarn":
    factor = max_position_embeddings / original
  fields.update(factor=float(factor), original_length=original)
  if rope_type == "dynamic":
    fields["original_length"] = int(max_position_embeddings)
  if rope_type == "llama3":
    fields.update(low_freq_factor=float(params["low_freq_factor"]),
                  high_freq_factor=float(params["high_freq_factor"]))
  if rope_type == "yarn":
    mscale = params.get("attention_factor")
    if mscale is None:
      m, m_all = params.get("mscale"), params.get("mscale_all_dim")
      mscale = (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all
                else _yarn_mscale(factor))
    fields.update(yarn_beta=float(params.get("beta_fast") or 32),
                  yarn_alpha=float(params.get("beta_slow") or 1), mscale=float(mscale),
                  truncate=bool(params.get("truncate", True)))
  return theta, fields


def hf_rope(rope) -> dict[str, Any]:
  """The transformers rope dict of a `models.rope.Rope` (ValueError if it has none)."""
  types = {v: k for k, v in _SCALING.items()}
  if rope.scaling not in types:
    raise ValueError(f"rope scaling {rope.scaling!r} has no transformers equivalent; "
                     f"savable: {sorted(types)}.")
  out: dict[str, Any] = {"rope_type": types[rope.scaling], "rope_theta": rope.theta}
  if rope.scaling == "none":
    return out
  out["factor"] = rope.factor
  if rope.scaling in ("llama3", "yarn_hf"):
    out["original_max_position_embeddings"] = rope.original_length
  if rope.scaling == "llama3":
    out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
  if rope.scaling == "yarn_hf":
    out.update(beta_fast=rope.yarn_beta, beta_slow=rope.yarn_alpha, truncate=rope.truncate,
               attention_factor=(rope.mscale if rope.mscale is not None
                                 else _yarn_mscale(rope.factor)))
  return out


def max_positions(rope_by_kind: Mapping[str, Any], default: int) -> int:
  """max_position_embeddings to write: dynamic's L if any layer uses it, else `default`."""
  lengths = [r.original_length for r in rope_by_kind.values() if r.scaling == "dynamic"]
  return int(lengths[0]) if lengths else int(default)
