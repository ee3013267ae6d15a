"""`load` a Hugging Face checkpoint directory as a `models.Transformer`, and `save` one back.

    model = load("/data/Llama-3.2-1B")                           # bf16 stays bf16
    model = load(path, dtype="float32", attention="dense")       # the O(L^2) reference path
    model = load(path, mesh=mesh)                                 # FSDP-placed, shard by shard
    save(model, "/tmp/out")                                       # transformers loads it back

`path` is what `huggingface_hub.snapshot_download` leaves (config.json, `model.safetensors` or
shards with `model.safetensors.index.json`, tokenizer files, which are not read here).
`config.json`'s `architectures[0]` picks the family (`models.hf.family`); every config key and
every tensor must be understood (or declared irrelevant), else a ValueError names it.

Loading never materialises a random model: the parameters' shapes come from
`nnx.eval_shape`, and each parameter is read on its own (`safetensors.safe_open`). With a `mesh`
each is placed with `jax.make_array_from_callback` on the FSDP sharding of
`models.partition.param_sharding` (split over `data` along its largest divisible dimension), and
each callback reads only its own box of the HF tensor (`get_slice`), so a process reads just the
shards of its own devices. Without `dtype`, parameters keep the stored dtype (bf16 stays bf16);
the compute dtype is the parameter dtype.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import partition
from models.config import ModelConfig
from models.hf import checkpoint as checkpoint_lib
from models.hf import family as family_lib
from models.hf import weights as weights_lib
from models.transformer import Transformer

MAX_SHARD_SIZE = 50 * 10**9  # bytes per safetensors file (transformers' save_pretrained)


def read_config(path: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` of the checkpoint at `path` (its config.json only; no tensor is read).

  Parameter and compute dtype are the stored dtype of the checkpoint's first tensor."""
  with checkpoint_lib.Checkpoint(path) as ckpt:
    fam, config, params = _family_config(ckpt)
    dtype = ckpt.dtype(params[0].parts[0].name)
  return dataclasses.replace(config, dtype=dtype, param_dtype=dtype)


def load(path: str | os.PathLike, *, dtype: Any = None, mesh: jax.sharding.Mesh | None = None,
         attention: str | None = None, config: ModelConfig | None = None) -> Transformer:
  """The checkpoint at `path` as a `Transformer` (see the module docstring).

  Args:
    path: a local Hugging Face model directory.
    dtype: parameter and compute dtype; None = the checkpoint's stored dtype.
    mesh: place each parameter FSDP-split over the mesh's `data` axis; None = default device.
    attention: None / "flash": flash attention (windowed layers: "local"); any other registered
      attention name (e.g. "dense") for every layer.
    config: build this `ModelConfig` instead of the checkpoint's own (`read_config`): the same
      parameters with other parameter-free settings (RoPE scaling, attention functions,
      windows, remat, dtypes); a config whose parameters differ fails with a ValueError naming
      them. `dtype` and `attention`, when given, apply on top of it.
  """
  with checkpoint_lib.Checkpoint(path) as ckpt:
    fam, stored, params = _family_config(ckpt)
    _check_names(ckpt, fam, params)
    if config is None:
      config = stored
      dtype = dtype if dtype is not None else ckpt.dtype(params[0].parts[0].name)
    if dtype is not None:
      config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    config = _with_attention(config, attention)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    abstract = _flatten(nnx.to_pure_dict(state))
    _check_paths(params, abstract)
    values = {p.path: _place(ckpt, p, abstract[p.path], mesh) for p in params}
  nnx.replace_by_pure_dict(state, _unflatten(values))
  return nnx.merge(graphdef, state)


def save(model: Transformer, path: str | os.PathLike, *, architecture: str | None = None,
         max_shard_size: int = MAX_SHARD_SIZE) -> str:
  """Writes `model` as a transformers checkpoint (config.json + safetensors, sharded with an
  index past `max_shard_size` bytes); returns the architecture written.

  `architecture` None: the first registered family that can express `model.config`.
  """
  config = model.config
  fam, hf_config = _family_for(config, architecture)
  values = {k: np.asarray(jax.device_get(v)) for k, v in
            _flatten(nnx.to_pure_dict(nnx.state(model))).items()}
  params = fam.params(config)
  _check_paths(params, values)
  pieces: dict[str, list[tuple[weights_lib.Part, np.ndarray]]] = {}
  for param in params:
    for part, tensor in weights_lib.to_hf(param, values[param.path]):
      pieces.setdefault(part.name, []).append((part, tensor))
  tensors = {name: _assemble(name, parts) for name, parts in pieces.items()}
  token_ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))  # not kept
  checkpoint_lib.write(path, dict(token_ids, **hf_config), tensors, max_shard_size)
  return fam.architecture


# --- helpers ------------------------------------------------------------------------------------


def _family_config(ckpt):
  """`(family, ModelConfig, parameter mapping)` from the checkpoint's config.json."""
  architectures = ckpt.config.get("architectures") or [None]
  fam = family_lib.get(architectures[0])
  config = fam.from_hf(ckpt.config)
  return fam, config, fam.params(config)


def _with_attention(config: ModelConfig, attention: str | None) -> ModelConfig:
  if attention in (None, "flash"):
    return config
  kinds = {kind: dataclasses.replace(settings, attention=attention)
           for kind, settings in dict(config.kinds).items()}
  return dataclasses.replace(config, kinds=kinds)


def _check_names(ckpt, fam, params) -> None:
  used = {part.name for p in params for part in p.parts}
  names = set(ckpt.names())
  missing = sorted(used - names)
  if missing:
    raise ValueError(f"{fam.architecture}: the checkpoint lacks tensors {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}.")
  unknown = sorted(n for n in names - used
                   if not any(re.fullmatch(p, n) for p in fam.ignored_weights))
  if unknown:
    raise ValueError(f"{fam.architecture}: tensors this loader does not understand: "
                     f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}.")


def _check_paths(params, values) -> None:
  mapped = [p.path for p in params]
  if sorted(mapped) != sorted(values):
    raise ValueError(f"the mapping and the model disagree: unmapped parameters "
                     f"{sorted(set(values) - set(mapped))}, mapped but absent "
                     f"{sorted(set(mapped) - set(values))}.")


def _place(ckpt, param: weights_lib.Param, abstract, mesh) -> jax.Array:
  shape, dtype = tuple(abstract.shape), abstract.dtype
  for part in param.parts:
    want = weights_lib.hf_shape(param, part, shape)
    have = ckpt.shape(part.name)
    if part.rows is not None:
      have = (part.rows[1] - part.rows[0],) + have[1:] if have[0] >= part.rows[1] else have
    if tuple(have) != tuple(want):
      raise ValueError(f"tensor {part.name!r} has shape {ckpt.shape(part.name)}; "
                       f"{param.path} {shape} needs {want}"
                       f"{f' (rows {part.rows})' if part.rows else ''}.")
  read = lambda box=None: weights_lib.read_block(ckpt, param, shape, box).astype(dtype)
  if mesh is None:
    return jnp.asarray(read())
  blocks: dict[Any, np.ndarray] = {}  # devices holding the same box read it once

  def block(index):
    key = tuple((s.start, s.stop) for s in index)
    if key not in blocks:
      blocks[key] = read(index)
    return blocks[key]

  return jax.make_array_from_callback(shape, partition.param_sharding(shape, mesh), block)


def _assemble(name: str, parts: list[tuple[weights_lib.Part, np.ndarray]]) -> np.ndarray:
  if len(parts) == 1 and parts[0][0].rows is None:
    return parts[0][1]
  parts = sorted(parts, key=lambda pt: pt[0].rows[0])
  start = 0
  for part, tensor in parts:
    if part.rows is None or part.rows[0] != start or part.rows[1] - start != tensor.shape[0]:
      raise ValueError(f"tensor {name!r}: its parts do not tile its rows.")
    start = part.rows[1]
  return np.concatenate([tensor for _, tensor in parts], axis=0)


def _family_for(config: ModelConfig, architecture: str | None):
  if architecture is not None:
    fam = family_lib.get(architecture)
    return fam, fam.to_hf(config)
  reasons = []
  for name in family_lib.supported():
    try:
      return family_lib.get(name), family_lib.get(name).to_hf(config)
    except ValueError as e:
      reasons.append(f"{name}: {e}")
  raise ValueError("no supported architecture can express this config:\n  " +
                   "\n  ".join(reasons))


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    out.update(_flatten(value, path + ".") if isinstance(value, dict) else {path: value})
  return out


def _unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree
