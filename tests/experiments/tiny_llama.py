"""A tiny random Llama checkpoint with a tokenizer, as a Hugging Face directory (seconds, offline).

    python -m tests.experiments.tiny_llama /tmp/tiny_llama     # from the repository root
    directory = make(tmp_path)                                 # in a test

Written by `models.hf.save` (config.json + safetensors; nothing needs torch) next to the tiny
byte-level BPE of `tiny_bpe` (384 tokens); `max_position_embeddings` is `MAX_POSITIONS` (64),
so a 4x YaRN extension trains at 256 tokens.
"""

from __future__ import annotations

import json
import os
import sys

from flax import nnx

import models
from models import hf
from tests.experiments import tiny_bpe

MAX_POSITIONS = 64
CONFIG = models.ModelConfig(
    vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp="swiglu",
    mlp_dim=64, tie_embeddings=False, layer_pattern=("global",),
    kinds={"global": models.KindSettings(rope_theta=10_000.0)})


def make(directory, max_positions: int = MAX_POSITIONS, seed: int = 3) -> str:
  """Writes the checkpoint into `directory` (created); returns it."""
  directory = str(directory)
  hf.save(models.Transformer(CONFIG, rngs=nnx.Rngs(seed)), directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["max_position_embeddings"] = max_positions
  with open(path, "w") as f:
    json.dump(config, f, indent=2)
  return tiny_bpe.train_bpe(directory)


if __name__ == "__main__":
  print(make(sys.argv[1]))
