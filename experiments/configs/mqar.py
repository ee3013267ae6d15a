r"""Multi-query associative recall (Zoology) with the ModernBERT-style layer pattern.

    python -m experiments.train --config=experiments/configs/mqar.py --workdir=/tmp/longctx_mqar

Zoology's grid point (seq_len 128, 8 key-value pairs); only the value after each query is
scored, and the logged `token_accuracy` is Zoology's per-query accuracy. Four layers (global,
local, local, global) so that the last global layer can use the local layers' previous-token
features (an induction circuit). Other grid points: `--config.task.seq_len=256
--config.task.num_kv_pairs=16`, ... Not tuned yet: a 3-layer run of 500 steps reached only
8% per-query accuracy (Zoology trains for far longer); raise `num_steps`.
Later single-seed attempts (README, row 2: 64 tokens, 4 pairs, vocabulary 64, 600 steps;
lr 1e-3 or 1e-2; global RoPE theta 1e4; a window-2 local layer) all stopped at 0.22-0.26 =
1 / pairs: a value from the context, not the bound one.

Variants (results row 2, experiments/rows/mqar.py): `:alternating` (the default: global, local,
local), `:global` (every layer global), `:local` (every layer local); `:smoke` is the tiny run
(alone or after a pattern: `:global,smoke`).
"""

from experiments.configs import common
from experiments.configs.patterns import PATTERNS, pattern_model


def get_config(variant: str | None = None):
  pattern, smoke = common.parse_variant(variant, name="mqar.py", choices=tuple(PATTERNS),
                                        default="alternating")
  config = common.base_config()
  config.task = dict(name="mqar", seq_len=128, num_kv_pairs=8, vocab_size=256)
  pattern_model(config, pattern, window=32)
  config.batch_size = 32
  config.num_steps = 2000
  config.optim.update(lr=3e-3, warmup_steps=50)
  if smoke:
    common.smoke(config)
    config.task.update(seq_len=32, num_kv_pairs=4)
    config.model.kinds.local.window = 8
  return config
