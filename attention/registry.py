"""Name -> attention function. Models pick attention by name, so a user's function plugs in.

Every registered function follows the attention contract::

    fn(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], *, mask: Mask | None = None,
       scale: float | None = None, **options) -> [B, T, N, H]

and computes `reference_attention` under its own visibility rule (a shared parametrised test
checks every registered name against the reference). The contract's optional features
(`logits_soft_cap`, `alibi_slopes`, `return_lse`, a value head dim Hv != H) are either
computed or refused with a ValueError naming them (`refusing` wraps a function for that).

    @register("my_attention")
    def my_attention(q, k, v, *, mask=None, scale=None, **options): ...

    attention.get("my_attention")(q, k, v, mask=mask)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from attention import scores as scores_lib

AttentionFn = Callable[..., object]
_REGISTRY: dict[str, AttentionFn] = {}


def register(name: str, *, overwrite: bool = False) -> Callable[[AttentionFn], AttentionFn]:
  """Decorator registering `fn` under `name`. Re-registering a name needs `overwrite=True`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"attention name must be a non-empty string, got {name!r}.")

  def decorator(fn: AttentionFn) -> AttentionFn:
    if not callable(fn):
      raise ValueError(f"register({name!r}) needs a callable, got {fn!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not fn and not overwrite:
      raise ValueError(f"attention {name!r} is already registered (to "
                       f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}); "
                       f"pass overwrite=True to replace it.")
    _REGISTRY[name] = fn
    return fn

  return decorator


def get(name: str) -> AttentionFn:
  """The function registered as `name`; a `ValueError` lists the known names otherwise."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown attention {name!r}; available: {available()}.") from None


def available() -> tuple[str, ...]:
  """Registered names, sorted."""
  return tuple(sorted(_REGISTRY))


def refusing(fn: AttentionFn, *options: str) -> AttentionFn:
  """`fn` with the contract options it does not support (e.g. "return_lse") refused by a
  ValueError naming them, before anything runs (for registering functions without them)."""

  @functools.wraps(fn)
  def wrapped(q, k, v, **kwargs):
    scores_lib.refuse(fn.__name__, **{name: kwargs.pop(name, None) for name in options})
    return fn(q, k, v, **kwargs)

  return wrapped
