r"""Train a model on an offline task; resumes automatically from `--workdir`/checkpoints.

    python -m experiments.train --workdir=/tmp/longctx_passkey      # configs/passkey.py
    python -m experiments.train --config=experiments/configs/passkey.py --workdir=/tmp/passkey
    python -m experiments.train --config=experiments/configs/mqar.py:smoke --workdir=/tmp/m \
        --config.num_steps=50 --config.model.d_model=128

Writes under `--workdir`: `config.json`, `metrics.jsonl` (one JSON line per logged step),
`checkpoints/` (orbax), `loss.png`; with `config.eval_after_train`, also the evaluation grid
(`eval_<task>.csv`, `eval_<task>.png`) and the printed accuracy table. A run that is killed
and started again with the same command continues from its last checkpoint with the same data
order (batches are a pure function of (seed, step)).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import tqdm

from experiments import checkpoints as ckpt_lib
from experiments import sharding, tasks, trainer
from experiments.configs import common

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "passkey.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Experiment config file[:variant] (default: configs/passkey.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the run writes.")


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written."""


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks it is writable; raises `WorkdirError` with the reason."""
  if not workdir:
    raise WorkdirError("--workdir is required: the directory where the run writes its files.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  probe = os.path.join(workdir, ".write_test")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({type(e).__name__}: {e.strerror or e})"
                       f"; pass a --workdir you can write to.") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {workdir} is not writable; pass a --workdir you can write to.")
  return workdir


class MetricsLog:
  """Appends JSON lines to `metrics.jsonl`; on resume drops lines past the restored step."""

  def __init__(self, path: str, start_step: int):
    self.path = path
    rows = read_metrics(path)
    with open(path, "w") as f:
      for row in rows:
        if row.get("step", 0) <= start_step:
          f.write(json.dumps(row) + "\n")

  def write(self, row: dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics: list[dict[str, Any]], path: str) -> None:
  """Training loss (and eval loss where logged) against step, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in ("loss", "eval_loss"):
    points = [(m["step"], m[key]) for m in metrics if key in m]
    if points:
      ax.plot(*zip(*points), label=key, marker="." if key == "eval_loss" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (scored tokens)")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it has checkpoints); returns the final metrics.

  `stop_at_step` stops early after checkpointing that step, as if the run were killed there
  (tests of resume determinism).
  """
  common.check_config(config)
  if config.multihost:
    sharding.initialize_distributed()  # before anything touches a device
  workdir = prepare_workdir(workdir)
  task = tasks.make_task(config.task, seed=config.seed)
  task.batch(0, 1)  # fails fast on task settings that cannot make an example
  if config.batch_size % config.grad_accum:
    raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of grad_accum "
                     f"({config.grad_accum}).")
  mesh = sharding.make_mesh(config.mesh) if config.mesh else None
  if mesh is not None:
    sharding.check_divisible(mesh, config.batch_size // config.grad_accum, config.task.seq_len)
  model = trainer.make_model(config, mesh=mesh)
  optimizer = trainer.make_optimizer(model, config)
  put = trainer.to_device
  if mesh is not None:  # before restoring: orbax restores onto these shardings
    sharding.shard_state(model, optimizer, mesh, fsdp=config.fsdp)
    put = functools.partial(sharding.shard_batch, mesh=mesh)
  model_meta = json.loads(json.dumps(config.model.to_dict()))  # as the checkpoint stores it

  ckpt = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), config.max_to_keep)
  meta = ckpt.restore(model, optimizer, model_meta)  # CheckpointError before anything is written
  start = 0 if meta is None else int(meta["step"])
  if meta is not None:
    logging.info("Resumed from step %d in %s.", start, ckpt.directory)
  elif config.init_from:
    loaded = ckpt_lib.load_params(model, config.init_from)
    logging.info("Initialised the weights from %s (step %d).", config.init_from, loaded)
  primary = jax.process_index() == 0  # several hosts: one writer of the run's own files
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start) if primary else None
  logging.info("Model: %s %s", trainer.describe(config, model),
               sharding.describe(mesh, config.fsdp))

  end = config.num_steps if stop_at_step is None else min(stop_at_step, config.num_steps)
  schedule = trainer.learning_rate(config)
  aux_losses = tuple(sorted((k, float(v)) for k, v in config.aux_losses.items()))
  last: dict[str, Any] = {}
  bar = tqdm.tqdm(range(start, end), initial=start, total=config.num_steps, unit="step",
                  disable=not config.progress, dynamic_ncols=True)
  timer, timed_tokens = time.perf_counter(), 0
  mesh_context = jax.sharding.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with mesh_context:  # ring attention layers read the ambient mesh while tracing
    for step in bar:
      batch = put(task.batch(step, config.batch_size))
      metrics = trainer.train_step(model, optimizer, batch, grad_accum=config.grad_accum,
                                   lm_weight=float(config.lm_loss_weight),
                                   aux_losses=aux_losses, trainable=config.trainable)
      timed_tokens += trainer.tokens_per_step(config)
      done = step + 1
      if done % config.log_every == 0 or done == end:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - timer
        last = dict(step=done, lr=float(schedule(step)), tokens_per_s=timed_tokens / elapsed,
                    **metrics)
        if (config.eval_every and done % config.eval_every == 0) or done == config.num_steps:
          last.update(trainer.evaluate_batches(model, eval_batches(task, config), put))
        if log is not None:
          log.write(last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        timer, timed_tokens = time.perf_counter(), 0
      if done % config.checkpoint_every == 0 or done == end:
        ckpt.save(done, model, optimizer, dict(seed=config.seed, data_step=done, model=model_meta))
  bar.close()
  ckpt.close()
  if log is not None:
    plot_loss(read_metrics(log.path), os.path.join(workdir, "loss.png"))
  result = {"step": end, "workdir": workdir, **last}
  if config.eval_after_train and end == config.num_steps:
    from experiments import evaluate  # pylint: disable=g-import-not-at-top
    result["eval"] = evaluate.evaluate_and_report(model, config, workdir)
  return result


def eval_batches(task, config: ml_collections.ConfigDict):
  """Held-out batches (a different RNG stream than training) for the periodic evaluation."""
  return [task.batch(i, config.batch_size, salt=1) for i in range(config.eval_batches)]


class _QuietLibraries:
  """Drops other libraries' INFO lines (orbax logs every checkpoint step); keeps warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; set fields with --config.x=y.")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  result = train(_CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", {k: v for k, v in result.items() if k != "eval"})


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
