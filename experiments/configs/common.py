"""The schema every experiment config starts from: all fields, with defaults and meanings.

A config file calls `base_config()` and changes what it needs; `--config.x=y` can then set
any of these fields (`python -m experiments.train --config=FILE --print_config` lists them
with their values and `FIELD_HELP`'s one-line meaning). `check_config` rejects fields that
are not in this schema (a typo in a config file or a flag), suggesting the nearest names.

Variants: `--config=experiments/configs/NAME.py:WORDS`, where WORDS is a comma-separated list
of at most one of the file's own variants (a stage or a method, listed in its docstring) and
optionally `smoke` (the tiny run of the tests), in any order: `passkey.py:smoke`,
`extend.py:ntk`, `extend.py:ntk,smoke`, `dsa.py:sparse,smoke`. `parse_variant` reads them.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

# Sections whose fields are free-form (checked by their consumer): the task's fields depend on
# its name (experiments/data/tasks.py), a layer kind's on models.KindSettings.
_FREE = ("task", "model.kinds", "aux_losses")


def base_config() -> ml_collections.ConfigDict:
  """Defaults of every field a run reads."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ml_collections.ConfigDict(dict(name="passkey", seq_len=256, tokenizer="bytes"))

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, d_model=64, num_layers=4, num_heads=4,
      num_kv_heads=config_dict.placeholder(int), head_dim=config_dict.placeholder(int),
      mlp_dim=config_dict.placeholder(int), mlp="geglu", norm="rms", causal=True,
      layer_pattern=("global", "local", "local"), last_layers=(),
      rope_scaling="none", rope_factor=1.0, rope_original_length=config_dict.placeholder(int),
      rope_yarn_alpha=1.0, rope_yarn_beta=32.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_mscale=config_dict.placeholder(float), rope_truncate=True,
      tie_embeddings=True, mlm_head=False, qkv_bias=False, o_bias=False, mlp_bias=False,
      qk_norm=config_dict.placeholder(str), post_norms=False, first_attn_norm=True,
      embed_norm=False, embed_scale=1.0, attention_scale=config_dict.placeholder(float),
      final_logit_soft_cap=config_dict.placeholder(float), output_bias=False,
      mlm_head_bias=False, mlm_activation="gelu_tanh", dtype="float32", param_dtype="float32",
      remat="none", scan_layers=True, mlp_chunk=0, init_std=0.02, norm_eps=1e-6))
  c.model.kinds = ml_collections.ConfigDict({
      "global": dict(rope_theta=160_000.0), "local": dict(window=64, rope_theta=10_000.0)})

  c.batch_size = 16
  c.grad_accum = 1           # micro-batches per step (batch_size must divide evenly)
  c.lm_loss_weight = 0.0     # + this x the LM loss on the unscored tokens (0 = answers only)
  c.aux_losses = ml_collections.ConfigDict()  # {name: weight} of losses layers put in aux
  c.trainable = ""           # train only params whose path contains this ("" = all)
  c.loss_chunk = -1          # cross-entropy positions per chunk: 0 = full logits, -1 = auto
  c.num_steps = 300
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=30, final_lr_ratio=0.1, b1=0.9, b2=0.99, weight_decay=0.01,
      clip_norm=1.0, state_dtype="float32"))

  c.log_every = 10
  c.eval_every = 100         # 0 = only at the end
  c.eval_batches = 2         # batches of `batch_size` rows per evaluation
  c.checkpoint_every = 100
  c.max_to_keep = 2
  c.max_nonfinite_steps = 3  # non-finite steps (not applied) in a row before the run stops
  c.init_from = ""           # a workdir (or checkpoint dir) whose weights initialise the model
  c.init_step = 0            # with init_from: the checkpoint step to load (0 = the latest)
  c.allow_config_change = False  # resume although computation fields changed (recorded)
  c.progress = True          # tqdm progress bar

  # Devices (experiments/training/sharding.py): "" = one device; "data:2,seq:4" = 2-way data x 4-way
  # sequence (ring attention) parallel; "data:-1" = data parallel over every device.
  c.mesh = ""
  c.fsdp = False             # shard parameters + optimizer state over the data axis
  c.multihost = False        # jax.distributed.initialize() first (one process per host)
  c.heartbeat_timeout_s = 100  # multihost: a silent peer for this long ends every process

  # After training: accuracy over (context length x depth) with the haystack tasks.
  c.eval_after_train = False
  c.eval = ml_collections.ConfigDict(dict(
      tasks=("passkey",), length_multiples=(1, 2, 3, 4), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
      examples=16, batch_size=16, filler=""))
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


def parse_variant(variant: str | None, *, name: str, choices: Sequence[str] = (),
                  default: str | None = None) -> tuple[str | None, bool]:
  """`(choice, smoke)` of a variant string `"word[,word]"` (the syntax above).

  `choice` is the one word of `choices` given (else `default`); `smoke` is whether `smoke`
  was given. Raises `ValueError` naming the variant and the allowed words otherwise.
  """
  words = [w.strip() for w in (variant or "").split(",") if w.strip()]
  picked = [w for w in words if w in choices]
  if len(picked) > 1 or len(set(words)) != len(words) or set(words) - set(choices) - {"smoke"}:
    example = f"{choices[-1]},smoke" if choices else "smoke"
    raise ValueError(f"unknown variant {variant!r} of {name}: use at most one of "
                     f"{tuple(choices)} and/or smoke, comma-separated (e.g. :{example}).")
  return (picked[0] if picked else default), "smoke" in words


# One line per field of `base_config()` (sections: the meaning of the section). `--print_config`
# shows them; a test checks that every field has one.
FIELD_HELP = {
    "seed": "parameter init and data order (batches are a pure function of (seed, step))",
    "task": "the training task (experiments/data/tasks.py); its fields depend on task.name",
    "task.tokenizer": "bytes, or a local tokenizer.json / its directory (text, passkey, needle, "
                      "tokens tasks; model.vocab_size must hold its vocabulary)",
    "model": "models.ModelConfig fields",
    "model.vocab_size": "token vocabulary (256 = bytes)",
    "model.d_model": "residual width",
    "model.num_layers": "decoder layers",
    "model.num_heads": "query heads per attention layer",
    "model.num_kv_heads": "key/value heads (GQA/MQA); None = num_heads",
    "model.head_dim": "per-head width; None = d_model / num_heads",
    "model.mlp_dim": "MLP hidden width; None = 4 x d_model",
    "model.mlp": "MLP kind: geglu, swiglu or gelu",
    "model.norm": "normalisation: rms or layer",
    "model.causal": "decoder (True) or bidirectional encoder (False)",
    "model.layer_pattern": "layer kinds, repeated cyclically over num_layers (config.json "
                           "lists the resolved per-layer kinds)",
    "model.last_layers": "kinds of the last layers, replacing the pattern there (MoBA's "
                         "hybrid: global,global,global = the last three layers full attention)",
    "model.rope_scaling": "RoPE scaling: none, linear (PI), ntk, yarn, yarn_hf (transformers'), "
                          "llama3, dynamic",
    "model.rope_factor": "RoPE scale s = new length / original length (0 with init_from a "
                         "checkpoint: task.seq_len / its original length)",
    "model.rope_original_length": "training length L that yarn scales from",
    "model.rope_yarn_alpha": "yarn ramp: pairs turning fewer than alpha times over L are "
                             "interpolated (paper: 1)",
    "model.rope_yarn_beta": "yarn ramp: pairs turning more than beta times over L are kept "
                            "(paper: 32)",
    "model.rope_low_freq_factor": "llama3 RoPE scaling: wavelengths above L / this are divided "
                                  "by rope_factor",
    "model.rope_high_freq_factor": "llama3 RoPE scaling: wavelengths below L / this are kept",
    "model.rope_mscale": "yarn_hf: the attention factor's mscale (None = 0.1 ln(s) + 1)",
    "model.rope_truncate": "yarn_hf: floor/ceil the ramp's bounds (transformers' default)",
    "model.tie_embeddings": "share the input embedding and the output projection",
    "model.mlm_head": "ModernBERT's dense-GELU-norm head before the vocabulary (encoders)",
    "model.qkv_bias": "biases on the q/k/v projections (Qwen2, ModernBERT attention_bias)",
    "model.o_bias": "bias on the attention output projection",
    "model.mlp_bias": "biases in the MLP",
    "model.qk_norm": "per-head norm of q and k before RoPE: None, or a norm name (Qwen3, Gemma 3)",
    "model.post_norms": "norms after attention and MLP too (Gemma 2/3's sandwich norms)",
    "model.first_attn_norm": "False: layer 0 has no attention pre-norm (ModernBERT)",
    "model.embed_norm": "a norm after the embedding (ModernBERT)",
    "model.embed_scale": "embeddings multiplied by this (Gemma: sqrt(d_model))",
    "model.attention_scale": "logit scale; None = head_dim^-0.5 (Gemma: query_pre_attn_scalar)",
    "model.final_logit_soft_cap": "cap * tanh(logits / cap) on the output logits (Gemma 2)",
    "model.output_bias": "bias on the vocabulary projection (ModernBERT's decoder)",
    "model.mlm_head_bias": "bias on the MLM head's dense layer",
    "model.mlm_activation": "activation of the MLM head (gelu_tanh, gelu, ...)",
    "model.init_std": "stddev of the embedding initialiser",
    "model.norm_eps": "epsilon of the norms",
    "model.dtype": "activation dtype",
    "model.param_dtype": "parameter dtype",
    "model.remat": "remat policy of the scanned layers: none, block (keep each repeat's input), "
                   "dots (also matmul outputs); models/remat.py",
    "model.scan_layers": "lax.scan over repeats of layer_pattern (False = a Python loop)",
    "model.mlp_chunk": "MLP computed this many positions at a time, recomputed in the backward "
                       "(0 = all at once; less memory at long context)",
    "model.kinds": "per layer kind: attention, window, rope_theta, options, sinks, sink "
                   "(models.KindSettings)",
    "batch_size": "rows per optimizer step",
    "grad_accum": "micro-batches per step (batch_size must divide evenly)",
    "lm_loss_weight": "weight of the LM loss on unscored tokens (0 = answers only)",
    "aux_losses": "{name: weight} of losses layers report in aux (e.g. indexer_kl)",
    "loss_chunk": "cross-entropy computed this many positions at a time (the [B, T, V] logits "
                  "never exist); 0 = full logits; -1 = chunked when the float32 logits of a "
                  "batch exceed 1 GiB (models/chunked_loss.py)",
    "trainable": "train only parameters whose path contains this (\"\" = all)",
    "num_steps": "optimizer steps (also the length of the cosine schedule)",
    "optim": "AdamW on linear warmup + cosine decay, after gradient clipping",
    "optim.lr": "peak learning rate",
    "optim.warmup_steps": "linear warmup steps",
    "optim.final_lr_ratio": "final learning rate / peak",
    "optim.b1": "AdamW beta1",
    "optim.b2": "AdamW beta2",
    "optim.weight_decay": "AdamW decoupled weight decay",
    "optim.clip_norm": "global gradient-norm clip (0 = off)",
    "optim.state_dtype": "optimizer state dtype: narrower parameters (bf16) get master weights "
                         "and moments in it (\"\" = each parameter's own dtype)",
    "log_every": "steps between metrics.jsonl lines",
    "eval_every": "steps between held-out evaluations (0 = only at the end)",
    "eval_batches": "batches of batch_size rows per held-out evaluation",
    "checkpoint_every": "steps between checkpoints",
    "max_to_keep": "checkpoints kept (older ones are deleted)",
    "max_nonfinite_steps": "non-finite steps in a row (each not applied) before the run stops "
                           "with exit code 3",
    "init_from": "a workdir whose latest weights initialise the model (context extension)",
    "init_step": "with init_from: the checkpoint step whose weights are loaded (0 = latest)",
    "allow_config_change": "resume even if seed/model/task/optim/batch/num_steps changed "
                           "(recorded in config_history.jsonl)",
    "progress": "tqdm progress bar",
    "mesh": "device mesh: \"\" = one device, \"data:2,seq:4\", \"data:-1\"",
    "fsdp": "shard parameters and optimizer state over the data axis",
    "multihost": "call jax.distributed.initialize() first (one process per host)",
    "heartbeat_timeout_s": "multihost: seconds without a peer's heartbeat before JAX ends the "
                           "other processes (a dead peer never leaves them hanging)",
    "eval_after_train": "run the haystack evaluation grid when training ends",
    "eval": "the evaluation grid after training (experiments/evaluate.py)",
    "eval.tasks": "passkey, needle (teacher-forced), niah (real filler, generated answers), "
                  "mlm_needle (encoders)",
    "eval.length_multiples": "context lengths as multiples of task.seq_len",
    "eval.depths": "needle depths in [0, 1]",
    "eval.examples": "prompts per (length, depth) cell",
    "eval.batch_size": "rows per evaluation batch",
    "eval.filler": "niah haystack: a glob of text files or a token-file directory (\"\" = the "
                   "training corpus, else the Python standard library)",
}


def field_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
  """Every dotted path of a nested dict, sections included (`optim`, `optim.lr`, ...)."""
  out = []
  for key, value in tree.items():
    path = f"{prefix}{key}"
    out.append(path)
    if isinstance(value, dict):
      out.extend(field_paths(value, path + "."))
  return out


def describe_fields(config: ml_collections.ConfigDict) -> str:
  """One line per field: `path = value  # meaning` (what `--print_config` prints)."""
  lines = []
  for path in field_paths(config.to_dict()):
    value = config
    for key in path.split("."):
      value = value[key]
    meaning = FIELD_HELP.get(path, "")
    if isinstance(value, ml_collections.ConfigDict):
      lines.append(f"{path}:" + (f"  # {meaning}" if meaning else ""))
    else:
      lines.append(f"  {path} = {value!r}" + (f"  # {meaning}" if meaning else ""))
  return "\n".join(lines)


def unknown_fields_message(unknown: Sequence[str], known: Sequence[str]) -> str:
  """`unknown config field x (did you mean: a, b?)` for each name, on one line."""
  parts = []
  for name in unknown:
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if not near:  # compare the last component with the sibling fields' last components
      head, _, leaf = name.rpartition(".")
      siblings = {p.rpartition(".")[2]: p for p in known if p.rpartition(".")[0] == head}
      near = [siblings[s] for s in difflib.get_close_matches(leaf, list(siblings), n=3)]
    parts.append(f"{name} (did you mean: {', '.join(near)}?)" if near else f"{name}")
  return (f"unknown config field{'s' if len(parts) > 1 else ''} {'; '.join(parts)}; "
          f"--print_config lists every field.")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ValueError` naming every field of `config` that `base_config()` does not have,
  with the nearest known names."""
  known = base_config().to_dict()
  unknown = sorted(_unknown(config.to_dict(), known, ""))
  if unknown:
    raise ValueError(unknown_fields_message(unknown, field_paths(known)))


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
