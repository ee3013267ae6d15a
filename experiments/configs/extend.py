r"""Context extension: fine-tune a passkey model at 2x its length with a RoPE scaling.

    python -m experiments.train --config=experiments/configs/passkey.py --workdir=/tmp/longctx_passkey
    python -m experiments.train --config=experiments/configs/extend.py:yarn \
        --config.init_from=/tmp/longctx_passkey --workdir=/tmp/longctx_extend_yarn

One command per method (`:linear` = position interpolation, `:ntk`, `:yarn`, `:none` = plain
fine-tuning at the longer length); each evaluates at 1x-4x the *new* length when done, so the
printed tables compare the methods. The model settings must match the source run (they are
those of passkey.py); only the RoPE fields change, and RoPE has no parameters. Tiny variant
for tests: `:smoke` (= `:yarn,smoke`; also `:linear,smoke` etc.; its source is a
`passkey.py:smoke` run). Variant syntax: experiments/configs/common.py.
"""

from experiments.configs import common, passkey

METHODS = ("none", "linear", "ntk", "yarn")


def get_config(variant: str | None = None):
  method, smoke = common.parse_variant(variant, name="extend.py", choices=METHODS,
                                       default="yarn")
  config = extend(passkey.get_config("smoke" if smoke else None), method, multiple=2, factor=2)
  config.init_from = "" if smoke else "/tmp/longctx_passkey"
  if not smoke:
    config.num_steps = 100
    config.optim.update(lr=1e-3, warmup_steps=10)
    config.eval_every = 50
  return config


def extend(config, method: str, *, multiple: int, factor: float):
  """Turns a source run's `config` (in place) into its fine-tune at `multiple` x its length
  with RoPE scaling `method` of scale `factor` (from the source length); returns it."""
  if method not in METHODS:
    raise ValueError(f"unknown extension method {method!r}; known: {METHODS}.")
  original = config.task.seq_len
  config.task.seq_len = multiple * original
  if method != "none":
    config.model.update(rope_scaling=method, rope_factor=float(factor),
                        rope_original_length=original)
  return config
