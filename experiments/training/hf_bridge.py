"""Hugging Face checkpoints in a run: the model section from the checkpoint, its weights, export.

    config.init_from = "/data/Llama-3.2-1B"       # a directory snapshot_download left
    config = with_checkpoint_model(config)         # config.model := the checkpoint's (+ overrides)
    model = trainer.make_model(config)             # the same parameters
    load_weights(model, config.init_from)          # read tensor by tensor (models.hf.load)
    export(model, config, "/tmp/out")              # back to a transformers directory

The model section comes from the checkpoint (`models.hf.read_config`), or, when `init_from` is
the workdir of a run that started from one (a stage of a recipe, possibly through earlier
stages: `hf_origin` follows the chain), from that run's `config.json`. A config may still set
the parameter-free fields (`RUNTIME_FIELDS`: RoPE scaling and its settings, dtypes, remat, and
every layer kind's settings: attention function, window, RoPE base, options): a value that
differs from `common.base_config()`'s default replaces the checkpoint's (context extension is
exactly that; `rope_factor = AUTO_FACTOR` (0) means the training length over the checkpoint's
original one, so a schedule of lengths needs no factor per checkpoint). `model.layer_pattern`
may convert layers to another kind (DeepSeek Sparse Attention: "dsa"): a kind that replaces
another takes its `INHERITED` settings (RoPE base and overrides) unless the config sets them,
and the new model must hold every parameter of the
source (the ones it adds, DSA's indexers, keep their initialisation: `load_weights`,
`checkpoints.load_params(allow_added=True)`). Any other architecture field (sizes, norms,
biases, vocabulary, ...) that differs from the default and from the checkpoint is a conflict: a
ValueError names every one, so a byte-level config (say passkey.py) is not silently mixed with
a pretrained model. The task's tokenizer is the checkpoint's own `tokenizer.json` (or the
source run's tokenizer) unless the config names another.
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
CONVERTIBLE_FIELDS = ("layer_pattern",)  # may change when the new model only adds parameters
AUTO_FACTOR = 0.0  # model.rope_factor: task.seq_len / the checkpoint's original length
INHERITED = ("rope_theta", "rope")  # a kind replacing another at the same layers takes these
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


def run_config(path: str | None) -> dict[str, Any] | None:
  """The saved `config.json` of a training run's workdir `path` (None if it is not one)."""
  file = os.path.join(path or "", "config.json")
  if not path or is_hf_dir(path) or not os.path.isfile(file):
    return None
  with open(file) as f:
    saved = json.load(f)
  return saved if isinstance(saved.get("model"), dict) and "task" in saved else None


def hf_origin(path: str | None) -> str | None:
  """The Hugging Face directory a model comes from: `path` itself if it is one, else (for a
  run's workdir) its `init_from`, followed back through earlier stages; None otherwise."""
  seen = set()
  while path and path not in seen:
    if is_hf_dir(path):
      return os.path.abspath(path)
    seen.add(path)
    saved = run_config(path)
    path = saved.get("init_from") if saved else None
  return None


def _source(path: str) -> tuple[dict[str, Any], str | None]:
  """(model section, tokenizer or None) of an HF directory or an HF-initialised run's workdir."""
  if is_hf_dir(path):
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    return model_section(hf.read_config(path)), os.path.abspath(path) if has_tokenizer else None
  saved = run_config(path)
  tokenizer = saved["task"].get("tokenizer")
  return dict(saved["model"]), None if tokenizer_lib.is_bytes(tokenizer) else tokenizer


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
  at `config.init_from`, or from the run there that started from one; unchanged otherwise (see
  the module docstring)."""
  origin = hf_origin(config.init_from)
  if origin is None:
    return config
  stored, tokenizer = _source(config.init_from)
  defaults = common.base_config().model.to_dict()
  given = config.model.to_dict()
  merged, changed, conflicts = dict(stored), [], []
  for name, value in given.items():
    if name == "kinds" or _same(value, defaults.get(name)) or _same(value, stored.get(name)):
      continue
    if name in RUNTIME_FIELDS + CONVERTIBLE_FIELDS:
      merged[name] = value
      changed.append(name)
    else:
      conflicts.append(f"model.{name} = {value!r} (the checkpoint: {stored.get(name)!r})")
  if conflicts:
    raise ValueError(f"the model section comes from the checkpoint {config.init_from}, and the "
                     f"config sets architecture fields that differ: {'; '.join(conflicts)}. "
                     f"Leave them out (experiments/configs/hf.py does); only "
                     f"{', '.join(RUNTIME_FIELDS + CONVERTIBLE_FIELDS)} may be changed.")
  if merged.get("rope_original_length") is None and merged["rope_scaling"] in NEEDS_LENGTH:
    merged["rope_original_length"] = trained_length(origin)
  if merged["rope_factor"] <= 0:  # AUTO_FACTOR: the training length over the original one
    original = merged.get("rope_original_length") or trained_length(origin)
    merged["rope_factor"] = (1.0 if merged["rope_scaling"] == "none"
                             else float(config.task.seq_len) / original)
    if merged["rope_factor"] < 1:
      raise ValueError(f"model.rope_factor=0 scales to task.seq_len / the original length, but "
                       f"task.seq_len {config.task.seq_len} is below the checkpoint's original "
                       f"length {original}: train longer rows or set --config.model.rope_factor.")
  merged["kinds"], kind_changes = _merged_kinds(stored["kinds"], given.get("kinds") or {},
                                                defaults.get("kinds") or {})
  _inherit(merged["kinds"], stored["layer_pattern"], merged["layer_pattern"],
           merged["num_layers"])
  if changed or kind_changes:
    logging.info("Model of %s with the config's changes: %s", config.init_from, "; ".join(
        [f"{n}: {stored.get(n)!r} -> {merged[n]!r}" for n in changed] + kind_changes))
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = ml_collections.ConfigDict(merged)
  if tokenizer and tokenizer_lib.is_bytes(config.task.get("tokenizer")):
    config.task.tokenizer = tokenizer
  return config


def _inherit(kinds: dict, old_pattern, new_pattern, num_layers: int) -> None:
  """In place: a kind that replaces another at the same layers takes its `INHERITED` fields
  that the config leaves unset (DSA layers keep the RoPE base of the layers they replace)."""
  for i in range(num_layers):
    old, new = old_pattern[i % len(old_pattern)], new_pattern[i % len(new_pattern)]
    for field in INHERITED if old != new else ():
      if field in kinds.get(old, {}) and field not in kinds.get(new, {}):
        kinds.setdefault(new, {})[field] = kinds[old][field]


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
  """Replaces `model`'s parameters by the checkpoint's (read tensor by tensor, in the model's
  parameter dtype), each placed as the parameter it replaces was (a sharded model stays
  sharded: every process fills its own devices' shards). A model whose layers were converted
  to a kind with more parameters (DSA) keeps its own initialisation of the added ones."""
  target = nnx.state(model, nnx.Param)
  stored = hf.read_config(path)
  same = tuple(stored.layer_kinds) == tuple(model.config.layer_kinds)
  source = hf.load(path, config=model.config if same else None,
                   dtype=model.config.param_dtype)
  loaded = dict(nnx.state(source, nnx.Param).flat_state())
  if not same:
    added = sorted(".".join(map(str, p)) for p, _ in target.flat_state() if p not in loaded)
    logging.warning("%s: %d parameters are not in the checkpoint and keep their "
                    "initialisation: %s ...", path, len(added), ", ".join(added[:4]))

  def place(new, old):
    if not (isinstance(old, jax.Array) and old.committed):
      return new
    host = np.asarray(jax.device_get(new))
    return jax.make_array_from_callback(old.shape, old.sharding, lambda index: host[index])

  flat = [(p, v.replace(place(loaded[p][...], v[...])) if p in loaded else v)
          for p, v in target.flat_state()]
  nnx.update(model, nnx.State.from_flat_path(flat))


def load_model(config: ml_collections.ConfigDict) -> Transformer:
  """The model of a resolved config (`with_checkpoint_model`) with the checkpoint's weights,
  built directly from the checkpoint (no random initialisation first)."""
  model_config = trainer.model_config(config)
  return hf.load(config.init_from, config=model_config, dtype=model_config.param_dtype)


def architecture_of(path: str) -> str | None:
  """`architectures[0]` of the Hugging Face directory `path` or of the one the run at `path`
  started from (`hf_origin`); None if neither."""
  path = hf_origin(path)
  if path is None:
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
