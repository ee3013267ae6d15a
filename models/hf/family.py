"""The registry of Hugging Face architectures, and what every family mapping shares.

A `Family` maps one transformers architecture (`config.json`'s `architectures[0]`, e.g.
"LlamaForCausalLM") to this package's model, both ways:

* `from_hf(raw config dict) -> ModelConfig` (a ValueError names any key it does not understand),
* `to_hf(ModelConfig) -> config dict` (a ValueError when the architecture cannot express the
  config),
* `params(ModelConfig) -> [weights.Param]`: every NNX parameter and the HF tensors it is made of,
* `ignored_weights`: regular expressions of HF tensors that carry nothing (e.g. a tied
  `lm_head.weight`, old checkpoints' `rotary_emb.inv_freq` buffers).

`register(family)` adds one; `get(architecture)` finds it (a ValueError lists the supported).
Layer types: transformers' "full_attention" layers become kind "global" (window 0),
"sliding_attention" layers kind "local" (the window), each kind with its own RoPE theta and,
where it differs from the model's, its own scaling (`KindSettings.rope`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from models import rope as rope_lib
from models.config import ModelConfig
from models.kinds import KindSettings


@dataclasses.dataclass(frozen=True)
class Family:
  architecture: str
  from_hf: Callable[[Mapping[str, Any]], ModelConfig]
  to_hf: Callable[[ModelConfig], dict]
  params: Callable[[ModelConfig], list]
  ignored_weights: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  if family.architecture in _FAMILIES:
    raise ValueError(f"architecture {family.architecture!r} is already registered.")
  _FAMILIES[family.architecture] = family
  return family


def get(architecture: str) -> Family:
  try:
    return _FAMILIES[architecture]
  except KeyError:
    raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                     f"{supported()}.") from None


def supported() -> tuple[str, ...]:
  return tuple(_FAMILIES)


# --- layer kinds and RoPE ---------------------------------------------------------------------

KIND = {"full_attention": "global", "sliding_attention": "local"}
LAYER_TYPE = {kind: layer_type for layer_type, kind in KIND.items()}
DEFAULT_ATTENTION = {"global": "flash", "local": "local"}
# Rope field -> ModelConfig field.
_ROPE_CONFIG = {"scaling": "rope_scaling", "factor": "rope_factor",
                "original_length": "rope_original_length", "yarn_alpha": "rope_yarn_alpha",
                "yarn_beta": "rope_yarn_beta", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor", "mscale": "rope_mscale",
                "truncate": "rope_truncate"}
_ROPE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(rope_lib.Rope)
                  if f.name in _ROPE_CONFIG}


def attention_layout(layer_types, window: int | None, ropes: Mapping[str, tuple[float, dict]],
                     options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """ModelConfig fields (layer_pattern, kinds, rope_*) of transformers `layer_types`.

  `ropes[layer_type] = (theta, Rope fields)`; the model's RoPE fields are those of the full
  attention layers (if any), each kind overrides what differs. `options` go to every kind's
  attention function (e.g. `logits_soft_cap`).
  """
  unknown = sorted(set(layer_types) - set(KIND))
  if unknown:
    raise ValueError(f"layer types {unknown} are not supported; supported: {sorted(KIND)}.")
  main = "full_attention" if "full_attention" in layer_types else layer_types[0]
  base = dict(_ROPE_DEFAULTS, **ropes[main][1])
  kinds = {}
  for layer_type in sorted(set(layer_types)):
    kind = KIND[layer_type]
    theta, fields = ropes[layer_type]
    full = dict(_ROPE_DEFAULTS, **fields)
    if kind == "local" and not window:
      raise ValueError("sliding_attention layers need a sliding_window >= 1.")
    kinds[kind] = KindSettings(
        attention=DEFAULT_ATTENTION[kind], window=int(window) if kind == "local" else 0,
        rope_theta=theta, options=dict(options or {}),
        rope={k: v for k, v in full.items() if v != base[k]} or None)
  return dict(layer_pattern=tuple(KIND[t] for t in layer_types), kinds=kinds,
              **{_ROPE_CONFIG[k]: v for k, v in base.items()})


def layer_types(config: ModelConfig) -> list[str]:
  """transformers layer_types of `config` (kinds must be "global" / "local")."""
  unknown = sorted(set(config.layer_kinds) - set(LAYER_TYPE))
  if unknown:
    raise ValueError(f"layer kinds {unknown} have no transformers equivalent (only "
                     f"{sorted(LAYER_TYPE)}).")
  for kind in set(config.layer_kinds):
    if bool(config.kind_settings(kind).window) != (kind == "local"):
      raise ValueError(f"kind {kind!r} has window {config.kind_settings(kind).window}: "
                       f"'global' must be unbounded and 'local' windowed to save.")
    if config.kind_settings(kind).alibi:
      raise ValueError(f"kind {kind!r} uses ALiBi, which transformers' families do not.")
  return [LAYER_TYPE[kind] for kind in config.layer_kinds]


def window(config: ModelConfig) -> int | None:
  return config.kind_settings("local").window if "local" in config.layer_kinds else None


def kind_options(config: ModelConfig) -> dict[str, Any]:
  """The attention options shared by every kind (ValueError if the kinds disagree)."""
  options = {tuple(sorted((k, v) for k, v in (config.kind_settings(kind).options or ())
                          if k != "implementation")) for kind in set(config.layer_kinds)}
  if len(options) != 1:
    raise ValueError(f"layer kinds have different attention options {sorted(options)}.")
  return dict(options.pop())


def require(config: ModelConfig, architecture: str, **expected) -> None:
  """ValueError naming the first field of `config` that `architecture` cannot express."""
  for name, value in expected.items():
    if getattr(config, name) != value:
      raise ValueError(f"{architecture} cannot express {name}={getattr(config, name)!r} "
                       f"(needs {value!r}).")
