"""Layer kinds: name -> how a layer of that kind attends. A registry, like attention/registry.py.

A model's depth is a `layer_pattern` of kind names (ModernBERT: `("global", "local", "local")`
repeated). Each kind carries default `KindSettings`:

* `attention`: the name of the attention function in the `attention` registry,
* `window`: sliding-window width in tokens (0 = unbounded). A causal layer sees the last
  `window` tokens (itself included); a bidirectional one `window // 2` on each side
  (`attention.local_mask`), so ModernBERT's "128" is `(64, 64)`,
* `rope_theta`: the RoPE base of this kind (ModernBERT: 160k global, 10k local),
* `options`: extra keyword arguments for the attention function (e.g. `implementation`),
* `rope`: overrides of the model's RoPE fields for this kind (`models.rope.Rope` field names,
  e.g. `{"scaling": "none", "factor": 1.0}`: Gemma 3's sliding layers skip the scaling),
* `alibi`: ALiBi instead of RoPE (Press et al.): no rotary embedding on this kind's q/k, and the
  attention function gets `alibi_slopes` = the geometric `2^(-8 n / N)` (`rope_theta` unused),
* `sinks`: attention sinks (StreamingLLM): the first `sinks` tokens of the sequence stay visible
  to every later query besides its window (`attention.Mask(sinks=...)`); a windowed kind's
  decoding cache then keeps those tokens and the window (`cache.SinkRingCache`, constant size),
* `sink`: a learned per-head sink logit (GPT-OSS), a parameter `sink_logits [N]` (zeros at
  init) passed as the attention function's `sink_logits`,

and the attention module that implements it (`None` = `models.layers.Attention`, which handles
any kind defined by these settings, KV cache included: a windowed kind keeps a ring buffer of
`window` keys, an unbounded kind caches every position).

Adding a kind never copies the model::

    register_layer_kind("local256", LayerKind(KindSettings("local", 256, 10_000.0)))
    ModelConfig(layer_pattern=("global", "local256"), ...)

A kind that needs parameters or inputs of its own (DeepSeek sparse attention: an indexer) passes
`module=`: a class built as `module(config, kind, rngs=rngs)` that follows the protocol of
`layers.Attention` (`__call__(x, *, positions, segment_ids, cache) -> (y, cache, aux)` and
`init_cache(batch, max_len)`, and the static counts `models.flops` reads,
`attention_flops(config, kind, keys)` and `cache_bytes(config, kind, batch, max_len)`: a subclass
of `layers.Attention` inherits them); whatever it puts in `aux` reaches the model's
`aux["layers"]`.

A kind without softmax attention (`attends=False`: the recurrent "gdn" kind, models/gdn.py) reads
only `options`: its defaults leave `attention`, `window`, `rope_theta` unset, and a config that
sets them (or `alibi`, `rope`) for it is a ValueError.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class KindSettings:
  """Per-kind attention settings. `None` fields inherit the registered kind's defaults.

  Attributes:
    attention: name of a registered attention function (`attention.available()`).
    window: sliding-window width in tokens, `>= 0`; 0 means unbounded (global).
    rope_theta: RoPE base, `> 0`.
    options: extra keyword arguments for the attention function, a mapping or pairs.
    alibi: True: ALiBi position biases and no RoPE; None (not set) is False.
    rope: overrides of the model's `Rope` fields (not head_dim / theta), a mapping or pairs.
    sinks: attention sinks: the first `sinks` tokens visible to every query; None (not set) is 0.
    sink: True: a learned per-head sink logit in the softmax denominator; None is False.
  """

  attention: str | None = None
  window: int | None = None
  rope_theta: float | None = None
  options: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None  # stored as pairs
  alibi: bool | None = None
  rope: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None  # stored as pairs
  sinks: int | None = None
  sink: bool | None = None

  def __post_init__(self):
    for name in ("options", "rope"):
      value = getattr(self, name)
      if isinstance(value, Mapping):
        object.__setattr__(self, name, tuple(sorted(value.items())))
      elif value is not None:
        object.__setattr__(self, name, tuple(tuple(pair) for pair in value))

  def merged_into(self, defaults: "KindSettings") -> "KindSettings":
    """`defaults` with every non-None field of `self` replacing it."""
    updates = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if getattr(self, f.name) is not None}
    return dataclasses.replace(defaults, **updates)


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """A registered kind: complete default settings and its attention module (None = standard);
  `attends=False` for a kind without softmax attention (its settings are only `options`)."""

  defaults: KindSettings
  module: Callable[..., Any] | None = None
  attends: bool = True


_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(name: str, kind: LayerKind, *, overwrite: bool = False) -> LayerKind:
  """Registers `kind` under `name`; re-registering a name needs `overwrite=True`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"layer kind name must be a non-empty string, got {name!r}.")
  if not isinstance(kind, LayerKind):
    raise ValueError(f"register_layer_kind({name!r}) needs a LayerKind, got {kind!r}.")
  missing = [f.name for f in dataclasses.fields(KindSettings)
             if f.name not in ("options", "alibi", "rope", "sinks", "sink")
             and getattr(kind.defaults, f.name) is None and kind.attends]
  if not kind.attends and kind.module is None:
    raise ValueError(f"layer kind {name!r}: attends=False needs its own module.")
  if missing:
    raise ValueError(f"layer kind {name!r}: defaults must set {missing}.")
  if kind.defaults.options is None:
    kind = dataclasses.replace(kind, defaults=dataclasses.replace(kind.defaults, options=()))
  if name in _KINDS and _KINDS[name] != kind and not overwrite:
    raise ValueError(f"layer kind {name!r} is already registered; pass overwrite=True.")
  _KINDS[name] = kind
  return kind


def get_layer_kind(name: str) -> LayerKind:
  """The kind registered as `name`; a `ValueError` lists the known kinds otherwise."""
  try:
    return _KINDS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown layer kind {name!r}; known kinds: {available_layer_kinds()}."
                     ) from None


def available_layer_kinds() -> tuple[str, ...]:
  """Registered kind names, sorted."""
  return tuple(sorted(_KINDS))


register_layer_kind("global", LayerKind(KindSettings("flash", 0, 160_000.0)))
register_layer_kind("local", LayerKind(KindSettings("local", 128, 10_000.0)))
register_layer_kind("alibi", LayerKind(KindSettings("flash", 0, 10_000.0, alibi=True)))


def settings_from_options(cls, options, label: str):
  """`cls(**options)` for a kind's settings dataclass `cls` from its `options` (a mapping, pairs
  or None); an option name `cls` does not have raises a ValueError naming it and the known ones
  (`label` says whose options they are, e.g. "DSA")."""
  options = dict(options or ())
  check_option_names(options, [f.name for f in dataclasses.fields(cls)], label)
  return cls(**options)


def check_option_names(options, known, label: str) -> None:
  """A ValueError naming the option names of `options` (a mapping or pairs) not in `known`."""
  unknown = sorted(set(dict(options or ())) - set(known))
  if unknown:
    raise ValueError(f"unknown {label} option(s) {unknown}; known: {sorted(known)}.")
