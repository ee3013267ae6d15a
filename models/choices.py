"""The named building blocks a `ModelConfig` chooses between: norms and MLP activations.

A neutral module below both `models/config.py` (which validates names against these tables)
and `models/layers.py` (which builds from them), so neither imports the other's internals and
there is no import circle. Adding a choice is one entry here.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

# name -> builder `(features, *, epsilon, dtype, param_dtype, rngs)`. No biases (ModernBERT).
NORMS = {
    "rms": nnx.RMSNorm,
    "layer": functools.partial(nnx.LayerNorm, use_bias=False),
}

# Gated MLP name -> activation of the gate branch.
MLP_ACTIVATIONS = {
    "geglu": functools.partial(jax.nn.gelu, approximate=True),
    "swiglu": jax.nn.silu,
}
