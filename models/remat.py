"""Remat (activation checkpointing) policies: name -> what the backward pass keeps of a block.

`ModelConfig.remat` names one; the Transformer puts `jax.checkpoint(policy=...)` on the body of
its `lax.scan` over the layers (models/layer_scan.py), so the saving holds on every backend
(a `jax.checkpoint` per layer in a Python loop saves almost nothing on XLA's CPU backend).

* "none": no checkpoint; the backward keeps every intermediate of every layer.
* "block": keep only each scanned step's input (the residual stream entering the repeat of the
  layer pattern); everything inside is recomputed. Least memory, ~1 extra forward.
* "dots": also keep the outputs of matmuls without batch dimensions (q/k/v/o projections and
  the MLP's two maps: `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`), so the
  backward recomputes only norms, RoPE, activations and attention itself.

All give identical values and gradients. Old configs said `remat=True` / `False`: they mean
"block" / "none" (`policy_name`). A registry, as the layer kinds are: `register_policy` adds one.
"""

from __future__ import annotations

from typing import Callable

import jax

# name -> jax.checkpoint policy; None = no checkpoint at all.
_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_LEGACY = {True: "block", False: "none", "True": "block", "False": "none"}  # old configs


def register_policy(name: str, policy: Callable) -> None:
  """Adds `policy` (a `jax.checkpoint_policies`-style function) under `name`."""
  if not isinstance(name, str) or not name or name in _POLICIES:
    raise ValueError(f"remat policy name must be a new non-empty string, got {name!r}; taken: "
                     f"{available_policies()}.")
  _POLICIES[name] = policy


def available_policies() -> tuple[str, ...]:
  return tuple(sorted(_POLICIES))


def policy_name(value) -> str:
  """The policy name of a `remat` setting: a known name, or an old boolean (True = "block")."""
  if isinstance(value, bool) or value in ("True", "False"):
    return _LEGACY[value]
  if value not in _POLICIES:
    raise ValueError(f"unknown remat policy {value!r}; known: {available_policies()} (or the "
                     f"old booleans True = 'block', False = 'none').")
  return value


def checkpointed(fn: Callable, name: str, *, in_scan: bool) -> Callable:
  """`fn` under `jax.checkpoint` with policy `name` ("none": `fn` itself). `in_scan`: `fn` is
  a scan body, where letting XLA CSE the recomputation is safe (JAX's advice); outside a scan
  CSE could merge the recomputation with the forward and undo the saving."""
  policy = _POLICIES[policy_name(name)]
  if policy is None:
    return fn
  return jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)
