"""Orbax checkpoints of a run: model parameters, optimizer state, step and data position.

    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    start = ckpt.restore(model, optimizer, config)     # 0 on a fresh run, else the saved step
    ckpt.save(step, model, optimizer, config)
    load_params(model, "/path/to/other/workdir")       # context extension: weights only

A checkpoint `checkpoints/<step>/` holds three items: `model` (`nnx.state(model)`), `opt`
(`nnx.state(optimizer)`: AdamW moments and the update count that drives the schedule) and
`meta` (JSON: the step, the seed, the next data step, and the model config). The data a run
sees is a pure function of (seed, step) (experiments/tasks.py), so the step *is* the data
position and a restarted run continues with the same batches. The model is deterministic
(no dropout), so there is no other RNG state to save.

Never destructive on error: a checkpoint that cannot be read, or that was written by a
different model, raises `CheckpointError` before anything is trained or saved.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(RuntimeError):
  """A checkpoint is unreadable or belongs to a different model."""


def _advice(directory: str) -> str:
  return (f"Existing checkpoints in {directory} were left untouched. Pass a new --workdir to "
          f"start a fresh run, or --config.init_from=<workdir> to start from a run's weights.")


class Checkpoints:
  """`ocp.CheckpointManager` over `directory`, keeping the last `max_to_keep` steps."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("model", "opt", "meta"))
    except Exception as e:  # noqa: BLE001 - orbax raises many types on a broken directory
      raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: "
                            f"{type(e).__name__}: {e}\n{_advice(self.directory)}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, model, optimizer, meta: dict[str, Any]) -> None:
    """Saves model, optimizer and `meta` (JSON) as checkpoint `step` (blocking)."""
    self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)),
        opt=ocp.args.StandardSave(nnx.state(optimizer)),
        meta=ocp.args.JsonSave(dict(meta, step=step))))
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {step} in {self.directory} is unreadable (meta): "
                            f"{type(e).__name__}: {e}\n{_advice(self.directory)}") from e

  def restore(self, model, optimizer, model_meta: dict[str, Any]) -> dict[str, Any] | None:
    """Restores the latest checkpoint into `model`/`optimizer` in place; returns its meta.

    Returns None when there is no checkpoint. Raises `CheckpointError` when the checkpoint was
    written for a different model (`model_meta`, the current `config.model`) or is unreadable.
    """
    step = self.latest_step()
    if step is None:
      return None
    meta = self.read_meta(step)
    saved = meta.get("model")
    if saved != model_meta:
      diff = sorted(k for k in set(saved or {}) | set(model_meta)
                    if (saved or {}).get(k) != model_meta.get(k))
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} was written by a different model: "
          f"config.model differs in {diff} (saved {[(saved or {}).get(k) for k in diff]}, now "
          f"{[model_meta.get(k) for k in diff]}).\n{_advice(self.directory)}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(nnx.state(model)),
          opt=ocp.args.StandardRestore(nnx.state(optimizer))))
      nnx.update(model, restored["model"])
      nnx.update(optimizer, restored["opt"])
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {step} in {self.directory} is corrupt or incompatible "
                            f"with this model: {type(e).__name__}: {e}\n"
                            f"{_advice(self.directory)}") from e
    return meta

  def close(self) -> None:
    self.manager.close()


def find_checkpoints(path: str) -> str:
  """The checkpoint directory of `path`: a workdir (with `checkpoints/`) or the directory itself."""
  path = os.path.abspath(os.path.expanduser(path))
  candidate = os.path.join(path, "checkpoints")
  return candidate if os.path.isdir(candidate) else path


def load_params(model, path: str, step: int | None = None) -> int:
  """Loads only the model weights of run `path` (latest step unless given) into `model`.

  Used by `--config.init_from` (context extension: RoPE scaling changes no parameter) and by
  evaluate.py. Returns the step loaded.
  """
  directory = find_checkpoints(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"init_from: no checkpoints at {path} (expected a workdir with "
                          f"checkpoints/ or a checkpoint directory).")
  manager = ocp.CheckpointManager(directory, item_names=("model", "opt", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint steps found in {directory}.")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(nnx.state(model))))
    nnx.update(model, restored["model"])
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot load the weights of checkpoint {step} in {directory} into "
                          f"this model (corrupt, or a different architecture): "
                          f"{type(e).__name__}: {e}") from e
  finally:
    manager.close()
  return step
