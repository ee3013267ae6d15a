"""The named building blocks a `ModelConfig` chooses between: norms and activations.

A neutral module below both `models/config.py` (which validates names against these tables)
and `models/layers.py` (which builds from them), so neither imports the other's internals and
there is no import circle. Adding a choice is one entry here.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from models.norms import OffsetRMSNorm

# name -> builder `(features, *, epsilon, dtype, param_dtype, rngs)`.
NORMS = {
    "rms": nnx.RMSNorm,                                          # x / rms(x) * w
    "layer": functools.partial(nnx.LayerNorm, use_bias=False),   # ModernBERT: no bias
    "layer_bias": nnx.LayerNorm,                                 # with a bias
    "rms_offset": OffsetRMSNorm,                                 # Gemma: x / rms(x) * (1 + w)
}

# name -> elementwise activation.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf: transformers' "gelu"
    "silu": jax.nn.silu,
}

# Gated MLP name -> activation of the gate branch.
MLP_ACTIVATIONS = {
    "geglu": ACTIVATIONS["gelu_tanh"],
    "geglu_exact": ACTIVATIONS["gelu"],
    "swiglu": jax.nn.silu,
}
