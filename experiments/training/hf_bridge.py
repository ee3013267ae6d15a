"""Hugging Face checkpoints in a run: the model section from the checkpoint, its weights, export.

    config.init_from = "/data/Llama-3.2-1B"       # a directory snapshot_download left
    config = with_checkpoint_model(config)         # config.model := the checkpoint's (+ overrides)
    model = trainer.make_model(config)             # the same parameters
    load_weights(model, config.init_from)          # read tensor by tensor (models.hf.load)
    export(model, config, "/tmp/out")              # back to a transformers directory

The model section comes from the checkpoint (`models.hf.read_config`). A config may still set
the parameter-free fields (`RUNTIME_FIELDS`: RoPE scaling and its settings, dtypes, remat, and
every layer kind's settings: attention function, window, RoPE base, options): a value that
differs from `common.base_config()`'s default replaces the checkpoint's (context extension is
exactly that). An architecture field (sizes, norms, biases, vocabulary, layer pattern, ...)
that differs from the default and from the checkpoint is a conflict: a ValueError names every
one, so a byte-level config (say passkey.py) is not silently mixed with a pretrained model. The
task's tokenizer is the checkpoint's own `tokenizer.json` unless the config names another.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np

from experiments.configs import common
from experiments.data import tokenizer as tokenizer_lib
from experiments.training import trainer
from models import ModelConfig, Transformer
from models import hf
from models.rope import NEEDS_LENGTH

RUNTIME_FIELDS = ("rope_scaling", "rope_factor", "rope_original_length", "rope_yarn_alpha",
                  "rope_yarn_beta", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_mscale", "rope_truncate", "dtype", "param_dtype", "remat", "scan_layers",
                  "mlp_chunk", "init_std", "kinds")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def is_hf_dir(path: str | None) -> bool:
  """True for a Hugging Face model directory: config.json naming `architectures` + safetensors."""
  if not path or not os.path.isfile(os.path.join(path, "config.json")):
    return False
  if not glob.glob(os.path.join(path, "*.safetensors")):
    return False
  with open(os.path.join(path, "config.json")) as f:
    return bool(json.load(f).get("architectures"))


def model_section(model_config: ModelConfig) -> dict[str, Any]:
  """`config.model` (every ModelConfig field; kinds as dicts of their set fields) of a config."""
  fields = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)}
  kinds = {}
  for name, settings in dict(fields["kinds"]).items():
    kinds[name] = {f.name: (dict(v) if f.name in ("options", "rope") else v)
                   for f in dataclasses.fields(settings)
                   if (v := getattr(settings, f.name)) is not None}
  fields.update(kinds=kinds, layer_pattern=tuple(fields["layer_pattern"]))
  for name in ("dtype", "param_dtype"):
    fields[name] = str(getattr(fields[name], "name", fields[name]))
  return fields


def _same(a: Any, b: Any) -> bool:
  normal = lambda x: json.loads(json.dumps(x)) if isinstance(x, (tuple, list, dict)) else x
  return normal(a) == normal(b)


def _merged_kinds(stored: dict, given: dict, defaults: dict) -> tuple[dict, list[str]]:
  """The checkpoint's kinds with the config's non-default kind fields on top (and what changed)."""
  kinds = {name: dict(settings) for name, settings in stored.items()}
  changed = []
  for name, settings in given.items():
    for field, value in settings.items():
      if _same(value, defaults.get(name, {}).get(field)):
        continue
      old = kinds.setdefault(name, {}).get(field)
      if not _same(value, old):
        kinds[name][field] = value
        changed.append(f"kinds.{name}.{field}: {old!r} -> {value!r}")
  return kinds, changed


def with_checkpoint_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its model section (and default tokenizer) from the Hugging Face checkpoint
  at `config.init_from`; unchanged when that is not one (see the module docstring)."""
  if not is_hf_dir(config.init_from):
    return config
  stored = model_section(hf.read_config(config.init_from))
  defaults = common.base_config().model.to_dict()
  given = config.model.to_dict()
  merged, changed, conflicts = dict(stored), [], []
  for name, value in given.items():
    if name == "kinds" or _same(value, defaults.get(name)) or _same(value, stored.get(name)):
      continue
    if name in RUNTIME_FIELDS:
      merged[name] = value
      changed.append(f"{name}: {stored.get(name)!r} -> {value!r}")
    else:
      conflicts.append(f"model.{name} = {value!r} (the checkpoint: {stored.get(name)!r})")
  if conflicts:
    raise ValueError(f"the model section comes from the checkpoint {config.init_from}, and the "
                     f"config sets architecture fields that differ: {'; '.join(conflicts)}. "
                     f"Leave them out (experiments/configs/hf.py does); only "
                     f"{', '.join(RUNTIME_FIELDS)} may be changed.")
  if merged.get("rope_original_length") is None and merged["rope_scaling"] in NEEDS_LENGTH:
    merged["rope_original_length"] = trained_length(config.init_from)
  merged["kinds"], kind_changes = _merged_kinds(stored["kinds"], given.get("kinds") or {},
                                                defaults.get("kinds") or {})
  if changed or kind_changes:
    logging.info("Model of %s with the config's changes: %s", config.init_from,
                 "; ".join(changed + kind_changes))
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = ml_collections.ConfigDict(merged)
  has_tokenizer = os.path.isfile(os.path.join(config.init_from, "tokenizer.json"))
  if has_tokenizer and tokenizer_lib.is_bytes(config.task.get("tokenizer")):
    config.task.tokenizer = os.path.abspath(config.init_from)
  return config


def trained_length(path: str) -> int:
  """The context length the checkpoint was trained at: `original_max_position_embeddings`
  (of its RoPE scaling, if any), else `max_position_embeddings`."""
  with open(os.path.join(path, "config.json")) as f:
    hf_config = json.load(f)
  rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
  length = rope.get("original_max_position_embeddings") or hf_config.get(
      "max_position_embeddings")
  if not length:
    raise ValueError(f"{path}/config.json names no max_position_embeddings: set "
                     f"--config.model.rope_original_length.")
  return int(length)


def load_weights(model: Transformer, path: str) -> None:
  """Replaces `model`'s parameters by the checkpoint's (same structure; read tensor by tensor,
  in the model's parameter dtype), each placed as the parameter it replaces was (a sharded
  model stays sharded: every process fills its own devices' shards)."""
  target = nnx.state(model, nnx.Param)
  loaded = nnx.state(hf.load(path, config=model.config, dtype=model.config.param_dtype),
                     nnx.Param)

  def place(new, old):
    if not (isinstance(old, jax.Array) and old.committed):
      return new
    host = np.asarray(jax.device_get(new))
    return jax.make_array_from_callback(old.shape, old.sharding, lambda index: host[index])

  nnx.update(model, jax.tree.map(place, loaded, target))


def load_model(config: ml_collections.ConfigDict) -> Transformer:
  """The model of a resolved config (`with_checkpoint_model`) with the checkpoint's weights,
  built directly from the checkpoint (no random initialisation first)."""
  model_config = trainer.model_config(config)
  return hf.load(config.init_from, config=model_config, dtype=model_config.param_dtype)


def architecture_of(path: str) -> str | None:
  """`architectures[0]` of a Hugging Face directory (None if `path` is not one)."""
  if not is_hf_dir(path):
    return None
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)["architectures"][0]


def export(model: Transformer, config: ml_collections.ConfigDict, out: str) -> str:
  """Writes `model` as a transformers directory `out` (which must not exist), with the run's
  tokenizer files; the same architecture as `config.init_from` when that was a checkpoint.
  Written into `out.partial` and renamed at the end, so a failure leaves no half directory.
  Returns the architecture written."""
  if os.path.exists(out):
    raise FileExistsError(f"{out} already exists; export never overwrites: pass a new --out.")
  partial = out.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  architecture = hf.save(model, partial, architecture=architecture_of(config.get("init_from")))
  spec = config.task.get("tokenizer")
  if not tokenizer_lib.is_bytes(spec):
    directory = spec if os.path.isdir(spec) else os.path.dirname(spec)
    for name in TOKENIZER_FILES:
      if (os.path.isfile(os.path.join(directory, name))
          and not os.path.exists(os.path.join(partial, name))):
        shutil.copy(os.path.join(directory, name), os.path.join(partial, name))
  os.replace(partial, out)
  return architecture
