"""The schema every experiment config starts from: all fields, with defaults.

A config file calls `base_config()` and changes what it needs; `--config.x=y` can then set
any of these fields. `check_config` rejects fields that are not in this schema (a typo in a
config file or a flag), naming the known ones.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Sections whose fields are free-form (checked by their consumer): the task's fields depend on
# its name (experiments/tasks.py), a layer kind's on models.KindSettings.
_FREE = ("task", "model.kinds", "aux_losses")


def base_config() -> ml_collections.ConfigDict:
  """Defaults of every field a run reads."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ml_collections.ConfigDict(dict(name="passkey", seq_len=256))

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, d_model=64, num_layers=4, num_heads=4,
      num_kv_heads=config_dict.placeholder(int), head_dim=config_dict.placeholder(int),
      mlp_dim=config_dict.placeholder(int), mlp="geglu", norm="rms", causal=True,
      layer_pattern=("global", "local", "local"),
      rope_scaling="none", rope_factor=1.0, rope_original_length=config_dict.placeholder(int),
      tie_embeddings=True, dtype="float32", param_dtype="float32", remat=False))
  c.model.kinds = ml_collections.ConfigDict({
      "global": dict(rope_theta=160_000.0), "local": dict(window=64, rope_theta=10_000.0)})

  c.batch_size = 16
  c.grad_accum = 1           # micro-batches per step (batch_size must divide evenly)
  c.lm_loss_weight = 0.0     # + this x the LM loss on the unscored tokens (0 = answers only)
  c.aux_losses = ml_collections.ConfigDict()  # {name: weight} of losses layers put in aux
  c.trainable = ""           # train only params whose path contains this ("" = all)
  c.num_steps = 300
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=30, final_lr_ratio=0.1, b1=0.9, b2=0.99, weight_decay=0.01,
      clip_norm=1.0))

  c.log_every = 10
  c.eval_every = 100         # 0 = only at the end
  c.eval_batches = 2         # batches of `batch_size` rows per evaluation
  c.checkpoint_every = 100
  c.max_to_keep = 2
  c.init_from = ""           # a workdir (or checkpoint dir) whose weights initialise the model
  c.progress = True          # tqdm progress bar

  # Devices (experiments/sharding.py): "" = one device; "data:2,seq:4" = 2-way data x 4-way
  # sequence (ring attention) parallel; "data:-1" = data parallel over every device.
  c.mesh = ""
  c.fsdp = False             # shard parameters + optimizer state over the data axis
  c.multihost = False        # jax.distributed.initialize() first (one process per host)

  # After training: accuracy over (context length x depth) with the haystack tasks.
  c.eval_after_train = False
  c.eval = ml_collections.ConfigDict(dict(
      tasks=("passkey",), length_multiples=(1, 2, 3, 4), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
      examples=16, batch_size=16))
  return c


def smoke(config: ml_collections.ConfigDict, *, steps: int = 2, every: int = 1,
          batch_size: int = 4, num_layers: int = 3) -> ml_collections.ConfigDict:
  """Shrinks `config` in place to the tiny, fast run of a `:smoke` variant (used by tests):
  d_model 32 with 2 heads, `steps` steps logged/evaluated/checkpointed every `every`, one eval
  batch, no progress bar. Task sizes and windows stay with each config."""
  config.model.update(d_model=32, num_layers=num_layers, num_heads=2, mlp_dim=64)
  config.batch_size = batch_size
  config.num_steps = steps
  config.log_every = config.eval_every = config.checkpoint_every = every
  config.eval_batches = 1
  config.progress = False
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ValueError` naming every field of `config` that `base_config()` does not have."""
  unknown = sorted(_unknown(config.to_dict(), base_config().to_dict(), ""))
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown}. Known fields are those of "
                     f"experiments/configs/common.py:base_config(); check the spelling.")


def _unknown(given: dict, known: dict, prefix: str) -> list[str]:
  out = []
  for key, value in given.items():
    path = f"{prefix}{key}"
    if path in _FREE:
      continue
    if key not in known:
      out.append(path)
    elif isinstance(value, dict) and isinstance(known[key], dict):
      out.extend(_unknown(value, known[key], path + "."))
  return out
