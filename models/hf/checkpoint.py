"""A Hugging Face checkpoint directory on disk: config.json plus safetensors, read lazily.

    ckpt = Checkpoint(path)            # as `huggingface_hub.snapshot_download` leaves it
    ckpt.config                        # config.json as a dict
    ckpt.names()                       # every tensor name, over all shards
    ckpt.shape(name), ckpt.dtype(name)
    ckpt.read(name, (slice(0, 4), slice(None)))   # only that box is read (safe_open.get_slice)

Weights are `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`weight_map`: tensor -> file). Files are opened with `safetensors.safe_open` (memory-mapped),
one handle per shard, and a read returns only the requested box, so a host never holds a whole
checkpoint. `write` saves the other way: shards of at most `max_shard_size` bytes and an index
when there is more than one, as transformers' `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _safetensors():
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.flax  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError("Hugging Face checkpoints need `safetensors`: pip install "
                      "'longctx[hf]'.") from e
  return safetensors


class Checkpoint:
  """Read access to a checkpoint directory (see the module docstring)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    config_path = os.path.join(self.path, CONFIG)
    if not os.path.isfile(config_path):
      raise ValueError(f"{self.path!r} is not a Hugging Face checkpoint directory: no {CONFIG}.")
    with open(config_path) as f:
      self.config: dict[str, Any] = json.load(f)
    self._files = self._weight_map()
    self._handles: dict[str, Any] = {}
    self._cpu = jax.devices("cpu")[0]

  def _weight_map(self) -> dict[str, str]:
    index = os.path.join(self.path, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        return dict(json.load(f)["weight_map"])
    single = os.path.join(self.path, SINGLE)
    if not os.path.isfile(single):
      raise ValueError(f"{self.path!r} has neither {SINGLE} nor {INDEX} (only safetensors "
                       f"checkpoints are supported, not pytorch_model.bin).")
    with self._open(SINGLE) as handle:
      return {name: SINGLE for name in handle.keys()}

  def _open(self, file: str):
    return _safetensors().safe_open(os.path.join(self.path, file), framework="flax")

  def _handle(self, name: str):
    if name not in self._files:
      raise ValueError(f"tensor {name!r} is not in the checkpoint {self.path!r}.")
    file = self._files[name]
    if file not in self._handles:
      self._handles[file] = self._open(file).__enter__()
    return self._handles[file]

  def names(self) -> list[str]:
    return sorted(self._files)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> np.dtype:
    """The stored dtype (safetensors' "BF16" -> bfloat16, ...)."""
    return np.dtype(_DTYPES[self._handle(name).get_slice(name).get_dtype()])

  def read(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
    """The `box` (one slice per axis) of tensor `name`, in its stored dtype, on the host."""
    with jax.default_device(self._cpu):
      return np.asarray(self._handle(name).get_slice(name)[box])

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()

  def __enter__(self) -> "Checkpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def write(path: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
          max_shard_size: int) -> list[str]:
  """Writes config.json and the tensors as safetensors (sharded past `max_shard_size` bytes,
  with an index); returns the weight files written."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  files = [SINGLE] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  with jax.default_device(jax.devices("cpu")[0]):
    for file, shard in zip(files, shards):
      _safetensors().flax.save_file({k: jax.numpy.asarray(v) for k, v in shard.items()},
                                    os.path.join(path, file), metadata={"format": "pt"})
  stale = os.path.join(path, INDEX)
  if len(files) > 1:
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
    with open(stale, "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  elif os.path.exists(stale):
    os.remove(stale)
  return files
