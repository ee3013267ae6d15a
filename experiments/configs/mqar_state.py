r"""MQAR recall against state size: attention, Gated DeltaNet (gdn), their 3:1 hybrid, local.

    python -m experiments.train --config=experiments/configs/mqar_state.py:hybrid \
        --workdir=/tmp/mqar_state

Results row 7 (experiments/rows/recall_state.py). Zoology's MQAR (row 2's task and density:
queries fill the query region, `seq_len = 4 x pairs`) trained at its hardest point, **64
key-value pairs in 256 tokens, vocabulary 256**, then scored at 8, 16, 32 and 64 pairs
(`seq_len` 32 .. 256). Four 4-layer decoders (d_model 32, 2 heads of 16, MLP 64) that differ
only in `layer_pattern`:

* `:global`  G G G G   every layer attends to all earlier tokens (RoPE theta 1e7, as row 2);
* `:gdn`     N N N N   gated delta rule layers (models/gdn.py): a state of 2 heads x 16 x 16
                       per layer, whatever the length (q/k heads 2, conv width 4);
* `:hybrid`  N N N G   Qwen3-Next's 3:1 (the default);
* `:local`   L L L L   sliding window of 4 tokens (RoPE theta 1e4): reaches 12 tokens back.

CPU-sized (row 7 runs 12 of these in about 25 CPU minutes): 600 steps of 8 sequences, lr 3e-3.
`:smoke` is the tiny run (alone or after a pattern: `:gdn,smoke`).
"""

from experiments.configs import common

PATTERNS = {"global": ("global",), "gdn": ("gdn",), "hybrid": ("gdn", "gdn", "gdn", "global"),
            "local": ("local",)}


def get_config(variant: str | None = None):
  pattern, smoke = common.parse_variant(variant, name="mqar_state.py", choices=tuple(PATTERNS),
                                        default="hybrid")
  config = common.base_config()
  config.task = dict(name="mqar", seq_len=256, num_kv_pairs=64, vocab_size=256)
  config.model.update(d_model=32, num_layers=4, num_heads=2, mlp_dim=64,
                      layer_pattern=PATTERNS[pattern])
  config.model.kinds = {"global": dict(rope_theta=1e7), "local": dict(window=4, rope_theta=1e4),
                        "gdn": dict(options=dict(chunk_size=32))}
  config.batch_size = 8
  config.num_steps = 600
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.eval_every = 100
  config.checkpoint_every = 300
  if smoke:
    common.smoke(config, num_layers=2)  # the quick row: the code path, not the 3:1 pattern
    config.task.update(seq_len=32, num_kv_pairs=8)
  return config
