"""The parity checks of a loaded Hugging Face model against transformers' golden outputs.

`golden` holds `tokens [B, T]`, `mask [B, T]` (1 = real token; right padding), `logits
[B, T, V]` and, for decoders, `prompt [B, P]` / `greedy [B, P + 16]` (see
tests/models/hf_fixtures/make.py). Padded positions are excluded: transformers still computes
their rows (they attend to the real keys), this package zeroes them (segment id -1).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import models

TOLERANCE = 1e-4  # max |logit difference| <= TOLERANCE * max |logit|


@nnx.jit
def _forward(model, tokens, segment_ids):
  return model(tokens, segment_ids=segment_ids)[0]


def logits(model, golden) -> np.ndarray:
  tokens = jnp.asarray(golden["tokens"], jnp.int32)
  segment_ids = jnp.where(jnp.asarray(golden["mask"]) > 0, 0, -1).astype(jnp.int32)
  return np.asarray(_forward(model, tokens, segment_ids))


def compare(model, golden) -> dict:
  """`{"error": max |diff| / max |logit|, "argmax_equal": bool, "greedy_equal": bool|None}`."""
  valid = np.asarray(golden["mask"]) > 0
  ours, theirs = logits(model, golden)[valid], np.asarray(golden["logits"])[valid]
  result = dict(error=float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))),
                argmax_equal=bool(np.array_equal(ours.argmax(-1), theirs.argmax(-1))),
                greedy_equal=None)
  if "greedy" in golden:
    prompt = jnp.asarray(golden["prompt"], jnp.int32)
    steps = golden["greedy"].shape[1] - prompt.shape[1]
    tokens = np.asarray(models.generate(model, prompt, max_new_tokens=steps))
    result["greedy_equal"] = bool(np.array_equal(tokens, golden["greedy"]))
  return result


def assert_parity(model, golden) -> dict:
  result = compare(model, golden)
  assert result["error"] <= TOLERANCE, result
  assert result["argmax_equal"], result
  assert result["greedy_equal"] in (None, True), result
  return result
