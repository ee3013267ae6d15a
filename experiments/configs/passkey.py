r"""Passkey retrieval with ModernBERT's ("global", "local", "local") layers; then 1x-4x eval.

    python -m experiments.train --config=experiments/configs/passkey.py --workdir=/tmp/longctx_passkey

The trainer's default config (`python -m experiments.train --workdir=...` runs it). A 4-layer
byte-level decoder (d_model 64, 181k parameters; layers global, local, local, global; local
window 64 with RoPE theta 1e4, global layers with theta 1e7, i.e. nearly position-free) learns
to copy a 5-digit pass key from the published passkey prompt (instruction line dropped to leave
room for filler). Rows of 256 tokens pack documents of 112-256 tokens (segment ids), so a step
sees more answers and a spread of needle distances; only the answer is scored. 1000 steps of
16 rows (~5 CPU-minutes), then the accuracy over 256, 512, 768 and 1024 tokens (1x-4x) and 5
depths is printed and written to `eval_passkey.csv`/`.png`.

Result (seeds 0-2, experiments/results/README.md): 0.83 exact match at the training length (0.75-0.97 by seed);
beyond it accuracy drops (0.32 at 2x, 0.12 at 4x; RoPE models do not extrapolate reliably);
`python -m experiments.evaluate --workdir=... --rope_scaling=yarn --rope_factor=4` or
fine-tuning with `extend.py` recovers part of it.

Variants: `:rope` = ordinary RoPE on every layer (all layers global, theta 1e4, so positions
past the training length are unseen rotations and RoPE scaling matters: experiments/results/README.md, row 3,
experiments/rows/extension.py), 2 heads of head_dim 32 (16 frequency pairs, so YaRN's ramp
has pairs to keep, ramp and interpolate), documents of every length from the bare fixed text
(104 tokens, no filler) to the row (`stretch=False`: filler lengths 0 to L - 104);
tiny: `:smoke`, `:rope,smoke`.
"""

from experiments.configs import common


def get_config(variant: str | None = None):
  config = common.base_config()
  config.task = dict(name="passkey", seq_len=256, digits=5, instruction="", min_len=112,
                     tokenizer="bytes")
  config.model.update(d_model=64, num_layers=4, num_heads=4, mlp_dim=128,
                      layer_pattern=("global", "local", "local"))
  config.model.kinds = {"global": dict(rope_theta=1e7), "local": dict(window=64, rope_theta=1e4)}
  config.batch_size = 16
  config.num_steps = 1000
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.eval_every = 250
  config.eval_after_train = True
  rope, smoke = common.parse_variant(variant, name="passkey.py", choices=("rope",))
  if rope:
    config.task.update(min_len=104, stretch=False)
    config.model.update(num_heads=2, layer_pattern=("global",))
    config.model.kinds = {"global": dict(rope_theta=1e4), "local": dict(window=64, rope_theta=1e4)}
  if smoke:
    common.smoke(config, steps=4, every=2)
    config.task.seq_len = 128
    config.model.kinds.local.window = 16
    config.eval.update(length_multiples=(1, 2), depths=(0.0, 1.0), examples=2, batch_size=2)
  return config
