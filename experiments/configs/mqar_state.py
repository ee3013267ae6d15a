r"""MQAR recall against state size: attention, Gated DeltaNet (gdn), their 3:1 hybrid, local.

    python -m experiments.train --config=experiments/configs/mqar_state.py:hybrid \
        --workdir=/tmp/mqar_state

Results row 7 (experiments/rows/recall_state.py). Zoology's MQAR (row 2's task and density:
queries fill the query region, `seq_len = 4 x pairs`) trained at **16 key-value pairs in 64
tokens, vocabulary 256** (room for 64 pairs), then scored at 8, 16, 32 and 64 pairs (`seq_len`
32 .. 256: up to 4x the trained length). Four 4-layer decoders (d_model 64, 4 heads of 16, MLP
128) that differ only in `layer_pattern`:

* `:global`  G G G G   every layer attends to all earlier tokens (RoPE theta 1e7, as row 2);
* `:gdn`     N N N N   gated delta rule layers (models/gdn.py): a state of 4 heads x 16 x 16
                       per layer, whatever the length (q/k heads 4, conv width 4);
* `:hybrid`  N N N G   Qwen3-Next's 3:1 (the default);
* `:local`   L L L L   sliding window of 4 tokens (RoPE theta 1e4): reaches 12 tokens back.

CPU-sized: 1000 steps of 16 sequences, lr 3e-3, about 1-3 CPU minutes a run. At this budget no
pattern learns the key-value binding (results row 7: global sits at "a value from the context",
the others at chance); a first try at 64 pairs / 256 tokens with d_model 32 and 600 steps of 8
left gdn at chance (loss ln 128) after 400 steps. Row 2's all-global needed 2500-6500 steps
of 32 sequences at 8 pairs.
`:smoke` is the tiny run (alone or after a pattern: `:gdn,smoke`).
"""

from experiments.configs import common

PATTERNS = {"global": ("global",), "gdn": ("gdn",), "hybrid": ("gdn", "gdn", "gdn", "global"),
            "local": ("local",)}


def get_config(variant: str | None = None):
  pattern, smoke = common.parse_variant(variant, name="mqar_state.py", choices=tuple(PATTERNS),
                                        default="hybrid")
  config = common.base_config()
  config.task = dict(name="mqar", seq_len=64, num_kv_pairs=16, vocab_size=256)
  config.model.update(d_model=64, num_layers=4, num_heads=4, mlp_dim=128,
                      layer_pattern=PATTERNS[pattern])
  config.model.kinds = {"global": dict(rope_theta=1e7), "local": dict(window=4, rope_theta=1e4),
                        "gdn": dict(options=dict(chunk_size=32))}
  config.batch_size = 16
  config.num_steps = 1000
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.eval_every = 100
  config.checkpoint_every = 500
  if smoke:
    common.smoke(config, num_layers=2)  # the quick row: the code path, not the 3:1 pattern
    config.task.update(seq_len=32, num_kv_pairs=8)
  return config
