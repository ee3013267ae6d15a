"""Orbax checkpoints of a run: model parameters, optimizer state, step and data position.

    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    start = ckpt.restore(model, optimizer, config)     # 0 on a fresh run, else the saved step
    ckpt.save(step, model, optimizer, config)
    load_params(model, "/path/to/other/workdir")       # context extension: weights only

A checkpoint `checkpoints/<step>/` holds three items: `model` (`nnx.state(model)`), `opt`
(`nnx.state(optimizer)`: AdamW moments and the update count that drives the schedule) and
`meta` (JSON: the step, the seed, the next data step, the model config, and the counts of
non-finite steps that were not applied: `skipped_steps`, `nonfinite_in_a_row`). The data a run
sees is a pure function of (seed, step) (experiments/data/tasks.py), so the step *is* the data
position and a restarted run continues with the same batches. The model is deterministic
(no dropout), so there is no other RNG state to save.

Never written with a non-finite value, and a failed write leaves the older checkpoints loadable
(`Checkpoints.save`). Never destructive on error: a checkpoint written by a different model, or
a directory where no step can be read, raises `CheckpointError` before anything is trained or
saved. A newest step that cannot be read (a run killed mid-write on a filesystem without atomic
renames, a disk error) is skipped for the newest step that loads, and moved aside, not deleted.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from experiments.training import stops, trainer

_all_finite = jax.jit(trainer.all_finite)  # one reduction over every leaf, on device


class CheckpointError(RuntimeError):
  """A checkpoint is unreadable or belongs to a different model."""


def short(error: BaseException | None, limit: int = 160) -> str:
  """`Type: first line of the message`, at most `limit` characters (orbax and TensorStore
  errors can carry hundreds of lines of spec dump)."""
  if error is None:
    return "unknown error"
  first = (str(error).strip().splitlines() or [""])[0]
  text = f"{type(error).__name__}: {first}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _see(log_path: str | None) -> str:
  return f" (details in {log_path})" if log_path else ""


def _log_detail(log_path: str | None, error: BaseException | None) -> None:
  """Appends the full traceback of `error` to `log_path` (never to the console)."""
  if log_path and error is not None:
    with open(log_path, "a") as f:
      f.write("".join(traceback.format_exception(error)))


def _advice(directory: str) -> str:
  return (f"Existing checkpoints in {directory} were left untouched. Pass a new --workdir to "
          f"start a fresh run, or --config.init_from=<workdir> to start from a run's weights.")


class Checkpoints:
  """`ocp.CheckpointManager` over `directory`, keeping the last `max_to_keep` steps."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.write_failed = False
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("model", "opt", "meta"))
    except Exception as e:  # noqa: BLE001 - orbax raises many types on a broken directory
      raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: "
                            f"{short(e)}\n{_advice(self.directory)}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, model, optimizer, meta: dict[str, Any]) -> None:
    """Saves model, optimizer and `meta` (JSON) as checkpoint `step` (blocking).

    Refuses (`stops.Diverged`) a state with a non-finite value: a checkpoint is never written
    with NaN or inf parameters or optimizer state, so rotation (`max_to_keep`) only ever drops
    finite checkpoints for newer finite ones. A failed write (disk full, permission) raises
    `stops.WriteFailed` naming the step's path: orbax writes into a temporary directory and
    renames it when complete, and drops old steps only after that, so the checkpoints already
    there stay loadable and a rerun resumes from the newest of them.
    """
    path = os.path.join(self.directory, str(step))
    if not bool(_all_finite(nnx.state(model), nnx.state(optimizer))):
      raise stops.Diverged(f"refusing to write checkpoint {step} to {path}: the parameters or "
                           f"optimizer state are not finite.")
    previous = self.latest_step()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          model=ocp.args.StandardSave(nnx.state(model)),
          opt=ocp.args.StandardSave(nnx.state(optimizer)),
          meta=ocp.args.JsonSave(dict(meta, step=step))))
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - OSError, or orbax/tensorstore wrapping one
      self.write_failed = True
      kept = (f"the newest kept checkpoint is step {previous}" if previous is not None
              else "no earlier checkpoint")
      raise stops.WriteFailed(
          f"cannot write checkpoint {step} to {path} ({short(e)}); {kept}: free space or fix "
          f"permissions, then run the same command again to resume from it.") from e

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {step} in {self.directory} is unreadable (meta): "
                            f"{short(e)}\n{_advice(self.directory)}") from e

  def restore(self, model, optimizer, model_meta: dict[str, Any], *,
              log_path: str | None = None) -> dict[str, Any] | None:
    """Restores the newest loadable checkpoint into `model`/`optimizer`; returns its meta.

    Returns None when there is no checkpoint. A step that cannot be read is skipped with one
    warning line (its traceback goes to `log_path`), and once an older step loads, the bad
    step directories move to `<workdir>/corrupt_checkpoints/` (kept, out of orbax's way).
    Raises `CheckpointError` when no step loads (naming the step directories to delete), or
    when a checkpoint was written for a different model (`model_meta`, the current
    `config.model`); in both cases nothing is changed on disk.
    """
    bad = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except CheckpointError as e:
        bad.append((step, e.__cause__))
        continue
      self._check_model(step, meta.get("model"), model_meta)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(nnx.state(model)),
            opt=ocp.args.StandardRestore(nnx.state(optimizer))))
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
        bad.append((step, e))
        continue
      nnx.update(model, placed_like(restored["model"], nnx.state(model)))
      nnx.update(optimizer, placed_like(restored["opt"], nnx.state(optimizer)))
      self._set_aside(bad, step, log_path)
      return meta
    if bad:
      for _, error in bad:
        _log_detail(log_path, error)
      dirs = ", ".join(os.path.join(self.directory, str(s)) for s, _ in bad)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored: step(s) {[s for s, _ in bad]} "
          f"are unreadable ({short(bad[0][1])}){_see(log_path)}. Nothing was changed. Delete "
          f"{dirs} to train this workdir from scratch, or pass a new --workdir.")
    return None

  def _check_model(self, step: int, saved: dict | None, model_meta: dict[str, Any]) -> None:
    if saved != model_meta:
      diff = sorted(k for k in set(saved or {}) | set(model_meta)
                    if (saved or {}).get(k) != model_meta.get(k))
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} was written by a different model: "
          f"config.model differs in {diff} (saved {[(saved or {}).get(k) for k in diff]}, now "
          f"{[model_meta.get(k) for k in diff]}).\n{_advice(self.directory)}")

  def _set_aside(self, bad: list, used: int, log_path: str | None) -> None:
    """Moves unreadable steps newer than `used` to `../corrupt_checkpoints/` (one line each)."""
    if not bad:
      return
    aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for step, error in bad:
      _log_detail(log_path, error)
      target = os.path.join(aside, str(step))
      suffix = 0
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(aside, f"{step}.{suffix}")
      os.replace(os.path.join(self.directory, str(step)), target)
      logging.warning("checkpoint step %d is unreadable (%s): resuming from step %d; step %d "
                      "moved to %s%s", step, short(error), used, step, target, _see(log_path))
    self.manager.reload()

  def close(self) -> None:
    """Closes the manager. After a failed save, whose error is already on its way, an error
    from closing is logged rather than raised over it."""
    try:
      self.manager.close()
    except Exception as e:  # noqa: BLE001
      if not self.write_failed:
        raise
      logging.warning("closing the checkpoint manager of %s: %s", self.directory, short(e))


def placed_like(restored: Any, target: Any) -> Any:
  """`restored` (orbax's arrays, committed to a device) placed as `target`'s were: an array the
  target held uncommitted (a fresh one-device model's) comes back uncommitted, so what was
  jitted before the restore (`train_step`, `eval_step`) runs it without compiling again."""
  def place(new, old):
    if isinstance(old, jax.Array) and not old.committed and jnp.issubdtype(old.dtype, jnp.number):
      return jnp.asarray(np.asarray(new))
    return new
  return jax.tree.map(place, restored, target)


def find_checkpoints(path: str) -> str:
  """The checkpoint directory of `path`: a workdir (with `checkpoints/`) or the directory itself."""
  path = os.path.abspath(os.path.expanduser(path))
  candidate = os.path.join(path, "checkpoints")
  return candidate if os.path.isdir(candidate) else path


def load_params(model, path: str, step: int | None = None, *, allow_added: bool = False) -> int:
  """Loads only the model weights of run `path` (latest step unless given) into `model`.

  Used by `--config.init_from` (context extension: RoPE scaling changes no parameter) and by
  evaluate.py. With `allow_added`, `model` may hold parameters the checkpoint lacks (a layer
  converted to a kind with more parameters, e.g. DSA's indexers): they keep their
  initialisation and are logged; every saved parameter must still exist in `model`. Returns
  the step loaded.
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
    target = nnx.state(model)
    if allow_added:
      target = _saved_part(target, os.path.join(directory, str(step), "model"))
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target)))
    nnx.update(model, placed_like(restored["model"], target))
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot load the weights of checkpoint {step} in {directory} into "
                          f"this model (corrupt, or a different architecture): "
                          f"{short(e)}") from e
  finally:
    manager.close()
  return step


def _saved_part(state: nnx.State, item_dir: str) -> nnx.State:
  """The part of `state` a saved model item holds (its variables' paths, from orbax's
  metadata); the rest is logged as added. CheckpointError if the item has a path `state`
  lacks."""
  saved, stack = set(), [((), ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree)]
  while stack:
    prefix, node = stack.pop()
    if isinstance(node, dict) and "value" not in node:
      stack.extend((prefix + (str(k),), v) for k, v in node.items())
    else:
      saved.add(prefix)
  flat = {tuple(map(str, p)): (p, v) for p, v in state.flat_state()}
  missing = sorted(".".join(p) for p in saved - set(flat))
  if missing:
    raise CheckpointError(f"{item_dir} holds parameters this model lacks: {missing[:6]}"
                          f"{' ...' if len(missing) > 6 else ''}.")
  added = sorted(".".join(p) for p in set(flat) - saved)
  if added:
    logging.warning("init_from: %d parameters are not in the checkpoint and keep their "
                    "initialisation: %s%s", len(added), ", ".join(added[:6]),
                    " ..." if len(added) > 6 else "")
  return nnx.State.from_flat_path([pv for p, pv in flat.items() if p in saved])
