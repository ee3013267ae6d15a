r"""Byte-level language modelling on plain text files (default: the Python standard library).

    python -m experiments.train --config=experiments/configs/text.py --workdir=/tmp/longctx_text
    python -m experiments.train --config=experiments/configs/text.py --workdir=/tmp/t \
        --config.task.glob='/path/to/corpus/**/*.txt'
    python -m experiments.train --config=experiments/configs/text.py --workdir=/tmp/t \
        --config.task.tokenizer=/ckpt/llama --config.model.vocab_size=128256

The corpus is every file matching `task.glob` (sorted), concatenated as bytes (or, with
`task.tokenizer`, a local tokenizer.json's tokens, each file framed by its BOS/EOS; for a
corpus larger than memory use experiments/configs/tokens.py); rows of `seq_len` tokens pack
short files together, told apart by segment ids (attention and loss stay within a file).
Every 10th file (sorted order) is held out: training reads the others, the periodic
evaluation the held-out ones (`task.heldout_every`). Nothing is downloaded.

Variants (layer patterns, experiments/results/README.md row 5, experiments/rows/text.py): `:alternating` (the
default: global, local, local), `:global` (every layer global), `:local` (every layer local),
`:dsa` (the alternating model with its global layers as DeepSeek sparse attention layers:
experiments/configs/dsa.py's kind with the global layers' RoPE theta, top_k = seq_len / 8,
stage "dense" with the indexer's KL loss, DeepSeek's dense warm-up; `dsa.sparse_stage` turns it
into stage 2); tiny: `:smoke`, e.g. `:local,smoke`.
"""


from experiments.configs import common
from experiments.configs import dsa
from experiments.data import tasks

PATTERNS = {"alternating": ("global", "local", "local"), "global": ("global",),
            "local": ("local",)}


def get_config(variant: str | None = None):
  config = common.base_config()
  config.task = dict(name="text", seq_len=512, glob=tasks.DEFAULT_TEXT_GLOB, max_bytes=64 << 20,
                     heldout_every=10, tokenizer="bytes")
  config.model.update(d_model=128, num_layers=6, num_heads=4, mlp_dim=256)
  config.model.kinds.local.window = 128
  config.batch_size = 16
  config.num_steps = 1000
  config.optim.update(lr=2e-3, warmup_steps=100)
  config.eval_every = 250
  pattern, smoke = common.parse_variant(variant, name="text.py",
                                        choices=tuple(PATTERNS) + ("dsa",), default="alternating")
  if smoke:
    common.smoke(config)
    config.task.update(seq_len=64, max_bytes=1 << 16)
    config.model.kinds.local.window = 16
  if pattern == "dsa":
    config.model.layer_pattern = ("dsa", "local", "local")
    config.model.kinds.dsa = dsa.dsa_kind(top_k=config.task.seq_len // 8)
    config.model.kinds.dsa.rope_theta = config.model.kinds["global"].rope_theta
    config.aux_losses = dict(indexer_kl=1.0)
    if smoke:
      config.model.kinds.dsa.options.update(index_heads=2, index_dim=8)
  else:
    config.model.layer_pattern = PATTERNS[pattern]
  return config
