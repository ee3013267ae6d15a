r"""ModernBERT at toy scale: a byte-level MLM encoder with alternating global/local attention.

    python -m experiments.train --config=experiments/configs/mlm.py --workdir=/tmp/longctx_mlm
    python -m experiments.train --config=experiments/configs/mlm.py:local --workdir=/tmp/mlm_local
    python -m experiments.evaluate --workdir=/tmp/longctx_mlm --lengths=1024  # before extension
    python -m experiments.train --config=experiments/configs/mlm.py:extend \
        --config.init_from=/tmp/longctx_mlm --workdir=/tmp/longctx_mlm_extend   # 1024, after

Variants (syntax: experiments/configs/common.py): `:alternating` (default; ModernBERT's
pattern: layer i global when i % 3 == 0, else local), `:global` (every layer global), `:local`
(every layer local), `:extend` (context extension: continue an `:alternating` run at 4x the
length with the global RoPE theta raised 4x, `--config.init_from=` that run), and `:smoke`.

Model: bidirectional (`causal=False`), pre-LayerNorm, GeGLU, MLM head, 6 layers of d_model 48
(global, local, local, global, local, local), local window 64 tokens in total (32 each side;
ModernBERT: 128 = 64 each side), RoPE theta 160,000 global / 10,000 local. Vocabulary 257:
the bytes and `[MASK]` (experiments/data/mlm.py). Task: 30% masking (80/10/10) of packed rows
of 256 bytes of the Python standard library (every 10th file held out for evaluation); every
training row carries up to 4 key-value needle pairs (distinct keys; `needles_per_row`), the
whole 4-digit value masked in one copy of each pair (`masked_digits=0`); needle lines are
exempt from the random masking, so the visible copy is always intact. 500 steps of 8 rows
(1.0M tokens, 154k parameters; at 200 steps every pattern is still at the all-spaces floor).
After training: masked-token accuracy (`token_accuracy` in metrics.jsonl) and needle accuracy
by distance, `eval_mlm_needle.csv/.png`.

Retrieval is NOT learned at this budget, nor single-seed at 2500 steps (experiments/results/README.md, ModernBERT
section: every attempt, all at chance), so the needle columns measure nothing yet.
"""

from experiments.configs import common

PATTERNS = {"alternating": ("global", "local", "local"), "global": ("global",),
            "local": ("local",)}
VARIANTS = (*PATTERNS, "extend")
EXTEND_FACTOR = 4


def get_config(variant: str | None = None):
  choice, smoke = common.parse_variant(variant, name="mlm.py", choices=VARIANTS,
                                       default="alternating")
  config = common.base_config()
  config.task = dict(name="mlm", seq_len=256, mask_rate=0.3, needle_rate=1.0, needle_weight=1.0,
                     digits=4, needles_per_row=4, masked_digits=0)
  config.model.update(vocab_size=257, d_model=48, num_layers=6, num_heads=4, mlp_dim=96,
                      causal=False, norm="layer", mlp="geglu",
                      mlm_head=True, layer_pattern=PATTERNS.get(choice, PATTERNS["alternating"]))
  config.model.kinds = {"global": dict(rope_theta=160_000.0),
                        "local": dict(window=64, rope_theta=10_000.0)}
  config.batch_size = 8
  config.num_steps = 500
  config.optim.update(lr=3e-3, warmup_steps=20)
  config.eval_every = 100
  config.eval_batches = 4
  config.eval_after_train = True
  config.eval.update(tasks=("mlm_needle",), length_multiples=(1,), depths=(), examples=32,
                     batch_size=16)
  if choice == "extend":
    config.task.seq_len *= EXTEND_FACTOR
    config.model.kinds["global"]["rope_theta"] *= EXTEND_FACTOR
    config.batch_size //= EXTEND_FACTOR  # the same tokens per step
    config.num_steps = 100
    config.optim.update(lr=1e-3, warmup_steps=10)
    config.init_from = "/tmp/longctx_mlm"
  if smoke:
    common.smoke(config, steps=4, every=2)
    config.model.num_layers = 3
    config.task.update(seq_len=64 * (EXTEND_FACTOR if choice == "extend" else 1),
                       max_bytes=1 << 17)
    config.model.kinds["local"]["window"] = 16
    config.eval.update(examples=2, batch_size=2)
    config.init_from = ""
  return config
