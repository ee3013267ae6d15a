r"""Multi-query associative recall (Zoology) with three layer patterns at the same budget.

    python -m experiments.train --config=experiments/configs/mqar.py:global --workdir=/tmp/mqar

Zoology's task (experiments/data/tasks.py `MQAR`: unique keys in [1, V/2), values in [V/2, V),
key-value pairs then the keys again as queries at power-law gaps, random tokens elsewhere;
only the value after each query is scored, and the logged `token_accuracy` is Zoology's
per-query accuracy) at a CPU-sized point: 32 tokens, 8 key-value pairs (the 16-token context,
then 8 queries in the 16-token query region: every query slot used), vocabulary 64. A 2-layer
decoder (d_model 64, 4 heads, MLP 128; Zoology's attention baseline has 2 layers) for 10000
steps of 32 sequences, lr 3e-3: all-global attention stays at 1 / pairs (a value from the
context, not the bound one) for 2500-6500 steps depending on the seed, then learns the binding
(an induction circuit) within about 1000 steps (at 6000 steps one seed of three had not). experiments/results/README.md, row 2, lists the attempts that did not get there (longer
sequences with fewer queries per sequence, 4 layers, 600 steps, ...).

Variants (results row 2, experiments/rows/mqar.py):
* `:global`       G G   every layer attends to all earlier tokens (RoPE theta 1e7);
* `:local`        L L   sliding window of 4 tokens (RoPE theta 1e4): the two layers reach 6
                        tokens back, while a query is on average 15 tokens after its value;
* `:alternating`  L G   (the default) local then global: with 2 layers, the ModernBERT-style
                        mix must end with the global layer to retrieve (G L could not);
* `:dsa`          L D   the alternating model with its global layer as a DSA layer
                        (experiments/configs/dsa.py's kind: indexer 4 heads x 32 dims,
                        top_k = L / 8 = 4), stage "dense" with the indexer's KL loss (DeepSeek's
                        dense warm-up; `dsa.sparse_stage` turns it into stage 2, results row 2);
`:smoke` is the tiny run (alone or after a pattern: `:global,smoke`).
"""

from experiments.configs import common
from experiments.configs import dsa
from experiments.configs.patterns import PATTERNS, pattern_model


def get_config(variant: str | None = None):
  pattern, smoke = common.parse_variant(variant, name="mqar.py",
                                        choices=tuple(PATTERNS) + ("dsa",),
                                        default="alternating")
  config = common.base_config()
  config.task = dict(name="mqar", seq_len=32, num_kv_pairs=8, vocab_size=64)
  pattern_model(config, "alternating" if pattern == "dsa" else pattern, window=4)
  config.model.num_layers = 2
  if pattern == "alternating":
    config.model.layer_pattern = ("local", "global")
  elif pattern == "dsa":
    config.model.layer_pattern = ("local", "dsa")
    config.model.kinds.dsa = dsa.dsa_kind(top_k=config.task.seq_len // 8)
    config.aux_losses = dict(indexer_kl=1.0)
  config.batch_size = 32
  config.num_steps = 10000
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.eval_every = 250
  config.checkpoint_every = 1000
  if smoke:
    common.smoke(config, num_layers=2)  # the row's 2 layers (L D for :dsa)
    config.task.update(seq_len=32, num_kv_pairs=4)
    config.model.kinds.local.window = 8
    if pattern == "dsa":
      config.model.kinds.dsa.options.update(index_heads=2, index_dim=8)
  return config
