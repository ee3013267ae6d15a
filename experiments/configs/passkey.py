r"""Passkey retrieval with ModernBERT's ("global", "local", "local") layers; then 1x-4x eval.

    python -m experiments.train --config=experiments/configs/passkey.py --workdir=/tmp/longctx_passkey

A 4-layer byte-level decoder (layers global, local, local, global; local window 64) learns to
copy a 5-digit pass key hidden at a random depth of 256 tokens of filler, scored only on the
answer. It is then evaluated at 256, 512, 768 and 1024 tokens (1x-4x) over 5 depths and the
accuracy table is printed (`eval_passkey.csv`/`.png`). Tiny variant for tests: `:smoke`.
"""

from experiments.configs import common


def get_config(variant: str | None = None):
  config = common.base_config()
  config.task = dict(name="passkey", seq_len=256, digits=5, instruction="", min_len=112)
  config.model.update(d_model=64, num_layers=4, num_heads=4, mlp_dim=128,
                      layer_pattern=("global", "local", "local"))
  config.model.kinds = {"global": dict(rope_theta=1e7), "local": dict(window=64, rope_theta=1e4)}
  config.batch_size = 16
  config.num_steps = 1000
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.eval_every = 250
  config.eval_after_train = True
  if variant == "smoke":
    config.task.seq_len = 128
    config.model.update(d_model=32, num_layers=3, num_heads=2, mlp_dim=64)
    config.model.kinds.local.window = 16
    config.batch_size = 4
    config.num_steps = 4
    config.log_every = config.eval_every = config.checkpoint_every = 2
    config.eval_batches = 1
    config.progress = False
    config.eval.update(length_multiples=(1, 2), depths=(0.0, 1.0), examples=2, batch_size=2)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of passkey.py; known: smoke.")
  return config
