r"""Passkey with three layer patterns at the same budget: all global, all local, alternating.

    python -m experiments.train --config=experiments/configs/patterns.py:alternating \
        --workdir=/tmp/patterns_alternating        # or :global, :local; + ,smoke for the tiny run

Results row 1 (experiments/rows/patterns.py; `python -m experiments.reproduce --rows=1`). Three
4-layer byte-level decoders (d_model 64, 4 heads, mlp 128) that differ only in
`model.layer_pattern`, repeated over the layers:

* `:global`       G G G G   every layer attends to all earlier tokens (RoPE theta 1e7);
* `:local`        L L L L   sliding window of 8 tokens (RoPE theta 1e4): 4 layers reach at most
                            28 tokens back, while the answer is >= 61 tokens after the nearest
                            copy of the key (the needle line ends "K is the pass key.", then the
                            38-token question), so a local-only model cannot see the key;
* `:alternating`  G L L G   ModernBERT's pattern: global every 3rd layer (the default).

Rows of 128 tokens, one passkey document each (the fixed text is 103 tokens: filler 25, the
needle between 61 and 86 tokens before the answer); only the 6 answer tokens are scored.
Parameters, data order, steps and seed are identical across the three patterns.
"""

from experiments.configs import common

PATTERNS = {"global": ("global",), "local": ("local",),
            "alternating": ("global", "local", "local")}


def pattern_model(config, pattern: str, window: int) -> None:
  """The rows' 4-layer decoder (d_model 64, 4 heads, MLP 128) with `pattern`'s layers: global
  layers RoPE theta 1e7 (nearly position-free), local layers `window` wide with theta 1e4."""
  config.model.update(d_model=64, num_layers=4, num_heads=4, mlp_dim=128,
                      layer_pattern=PATTERNS[pattern])
  config.model.kinds = {"global": dict(rope_theta=1e7),
                        "local": dict(window=window, rope_theta=1e4)}


def get_config(variant: str | None = None):
  pattern, smoke = common.parse_variant(variant, name="patterns.py", choices=tuple(PATTERNS),
                                        default="alternating")
  config = common.base_config()
  config.task = dict(name="passkey", seq_len=128, digits=5, instruction="", tokenizer="bytes")
  pattern_model(config, pattern, window=8)
  config.batch_size = 16
  config.num_steps = 1600
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.eval_every = 100
  config.checkpoint_every = 200
  config.eval.update(length_multiples=(1,), examples=32, batch_size=32)
  if smoke:
    common.smoke(config, steps=4, every=2)
    config.eval.update(depths=(0.0, 1.0), examples=2, batch_size=2)
  return config
