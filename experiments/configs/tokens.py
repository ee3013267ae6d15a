r"""Language modelling on a token file larger than memory, then needles in its own text.

    python -m experiments.tokenize --input='/data/books/**/*.txt' --tokenizer=/ckpt/llama \
        --output=/data/books_llama
    python -m experiments.train --config=experiments/configs/tokens.py --workdir=/tmp/tok \
        --config.task.path=/data/books_llama --config.task.tokenizer=/ckpt/llama \
        --config.model.vocab_size=128256
    tensorboard --logdir=/tmp/tok        # live curves (metrics.jsonl holds the same scalars)

The corpus is a token file (`python -m experiments.tokenize`, experiments/data/token_file.py)
read through `np.memmap`: rows of `task.seq_len` tokens pack its documents (each framed by the
tokenizer's BOS/EOS) with segment ids; document `i` is held out iff `i % task.heldout_every
== 0` (every 100th) for the periodic evaluation (experiments/data/tokens.py). `task.tokenizer`
must be the tokenizer the file was made with (its hash is checked) and `model.vocab_size` at
least its vocabulary. After training, `niah`: a needle ("The special magic number for KEY is
VALUE.") at 5 depths of the corpus's own text at 1x and 2x the training length, scored by
exact match of the greedy answer decoded with the KV cache (experiments/evaluation/needle.py).

Variants: tiny `:smoke` (the tests: 64-token rows, niah at 256 tokens).
"""

from experiments.configs import common


def get_config(variant: str | None = None):
  config = common.base_config()
  config.task = dict(name="tokens", path="", seq_len=1024, tokenizer="bytes", heldout_every=100)
  config.model.update(d_model=256, num_layers=6, num_heads=4, mlp_dim=512,
                      layer_pattern=("global", "local", "local"))
  config.model.kinds.local.window = 256
  config.batch_size = 8
  config.num_steps = 2000
  config.optim.update(lr=1e-3, warmup_steps=100)
  config.eval_every = 500
  config.eval_after_train = True
  config.eval.update(tasks=("niah",), length_multiples=(1, 2), examples=8, batch_size=8)
  _, smoke = common.parse_variant(variant, name="tokens.py")
  if smoke:
    common.smoke(config, steps=4, every=2)
    config.task.update(seq_len=64, heldout_every=4)
    config.model.kinds.local.window = 16
    config.eval.update(length_multiples=(4,), depths=(0.0, 1.0), examples=2, batch_size=2)
  return config
