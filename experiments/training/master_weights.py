"""Float32 optimizer state for lower-precision parameters: master weights, as Megatron-LM keeps.

    tx = with_master_weights(optax.adamw(1e-5), "float32")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)   # bf16 params; f32 master + moments

With bfloat16 parameters, AdamW's step (about the learning rate per weight) is mostly below
half a bfloat16 ulp of the weight it is added to (lr 2e-5 on |w| ~ 0.02, whose ulp is 1.2e-4)
and is lost in the addition; the moments, kept in the parameters' dtype by optax, lose bits too.
So the optimizer keeps a float32 copy of every lower-precision parameter (its master weight),
runs the inner transformation (clipping, AdamW) on float32 gradients and master weights, whose
moments are therefore float32, adds the step to the master in float32 and gives the model the
master rounded to the parameter's dtype. The forward and backward passes see only the bf16
parameters (no cast of the weights per step).

Parameters already in the state dtype keep no copy (`optax.MaskedNode` in their place): their
update is the inner transformation's own. Memory per bf16 parameter: 2 bytes (the parameter)
+ 4 (master) + 8 (two float32 moments).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MasterWeightsState(NamedTuple):
  """`master`: the float32 copy of each narrower parameter (`MaskedNode` for the others);
  `inner`: the inner transformation's state, made from the float32 parameters."""
  master: Any
  inner: Any


def needs_master(dtype: Any, state_dtype: Any) -> bool:
  """True when a parameter of `dtype` gets a master copy in `state_dtype` (floating, narrower)."""
  dtype, state_dtype = jnp.dtype(dtype), jnp.dtype(state_dtype)
  return (jnp.issubdtype(dtype, jnp.floating) and dtype != state_dtype
          and jnp.finfo(dtype).bits < jnp.finfo(state_dtype).bits)


def with_master_weights(inner: optax.GradientTransformation, state_dtype: Any = "float32"
                        ) -> optax.GradientTransformation:
  """`inner` run in `state_dtype` on master copies of the narrower parameters (module docstring).

  The updates it returns are `state_dtype` arrays `new_master - param`, so that
  `optax.apply_updates` (which adds in the wider dtype, then casts) leaves each narrower
  parameter at its new master weight rounded to the parameter's dtype.
  """
  state_dtype = jnp.dtype(state_dtype)
  narrow = lambda p: needs_master(p.dtype, state_dtype)

  def wide(params, master):
    """The parameters in `state_dtype`: the master copies where kept, else themselves."""
    return jax.tree.map(lambda p, m: m if narrow(p) else p, params, master)

  def init(params):
    master = jax.tree.map(lambda p: p.astype(state_dtype) if narrow(p) else optax.MaskedNode(),
                          params)
    return MasterWeightsState(master, inner.init(wide(params, master)))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("with_master_weights needs the parameters in update(grads, state, params).")
    full = wide(params, state.master)
    grads = jax.tree.map(lambda g, p: g.astype(state_dtype) if narrow(p) else g, grads, params)
    steps, inner_state = inner.update(grads, state.inner, full)
    new_full = optax.apply_updates(full, steps)
    master = jax.tree.map(lambda p, w: w if narrow(p) else optax.MaskedNode(), params, new_full)
    updates = jax.tree.map(lambda p, w, u: w - p.astype(state_dtype) if narrow(p) else u,
                           params, new_full, steps)
    return updates, MasterWeightsState(master, inner_state)

  return optax.GradientTransformation(init, update)
