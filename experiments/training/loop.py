"""The training loop: setup -> steps -> finish, resuming from `workdir`'s checkpoints.

    train(config, workdir)  =  setup -> train_loop -> finish

`experiments/train.py` is the command around it; `experiments.evaluation.train_and_evaluate`
adds the evaluation grid after the last step. Writes under `workdir`: `config.json`,
`metrics.jsonl` (one JSON line per logged step), `checkpoints/` (orbax), `loss.png`. A run that
is killed and started again continues from its last checkpoint with the same data order
(batches are a pure function of (seed, step)).

Safety (`training/workdir.py`): a run holds the workdir's lock, so a second run into it stops
at once naming the first one's pid; an unreadable newest checkpoint is skipped for the newest
one that loads; a resume whose seed, model, task, optimizer, batch or num_steps differ from
`config.json` is refused unless `config.allow_config_change` (then recorded in
`config_history.jsonl`). What else a run survives (`training/stops.py` has the exit codes):
SIGTERM/SIGINT/SIGUSR1 finish the step in flight, checkpoint it and stop (`Preempted`); a
non-finite step is not applied, and `max_nonfinite_steps` of them in a row stop the run
(`Diverged`) with every checkpoint finite; a failed checkpoint write stops it (`WriteFailed`)
with the older checkpoints intact. `metrics.jsonl` is strict JSON (non-finite values as null).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import tqdm

from experiments.configs import common
from experiments.data import tasks
from experiments.training import checkpoints as ckpt_lib
from experiments.training import hf_bridge
from experiments.training import plots, sharding, stops, summaries, trainer
from experiments.training import workdir as workdir_lib

WorkdirError = workdir_lib.WorkdirError
# Run-time hook: `(model, config, workdir, overwrite=True) -> results` after the last step.
Evaluate = Callable[..., dict[str, Any]]


class ConfigChangeError(ValueError):
  """A resume would change fields that decide what the checkpoints compute."""


class MetricsLog:
  """Appends JSON lines to `metrics.jsonl` and the same scalars to TensorBoard event files
  next to it (`summaries.Scalars`); on resume drops lines past the restored step (rewriting
  the file atomically), so a run killed at any point and resumed logs each step once."""

  def __init__(self, path: str, start_step: int):
    self.path = path
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= start_step]
    workdir_lib.write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    self.scalars = summaries.Scalars(os.path.dirname(path), start_step)

  def write(self, row: dict[str, Any]) -> None:
    """One line of strict JSON (a non-finite number becomes null); `stops.WriteFailed`
    naming the file if it cannot be written."""
    row = finite_or_null(row)
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
    except OSError as e:
      raise stops.WriteFailed(f"cannot append to {self.path} ({type(e).__name__}: "
                              f"{e.strerror or e}); free space or fix permissions, then run the "
                              f"same command again to resume.") from e
    self.scalars.write(row)  # TensorBoard: finite values only

  def close(self) -> None:
    self.scalars.close()


def finite_or_null(row: dict[str, Any]) -> dict[str, Any]:
  """`row` with NaN and infinite floats as None (JSON null: strict readers reject NaN)."""
  return {k: None if isinstance(v, float) and not math.isfinite(v) else v
          for k, v in row.items()}


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of `metrics.jsonl`; a torn last line (a run killed while appending it) is
  ignored (the resumed run writes that step again)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = [json.loads(line) for line in lines[:-1]]
  try:
    rows += [json.loads(line) for line in lines[-1:]]
  except json.JSONDecodeError:
    logging.warning("%s: ignoring a torn last line (the run was killed while writing it).", path)
  return rows


def plot_loss(metrics: list[dict[str, Any]], path: str) -> None:
  """Training loss (and eval loss where logged) against step, as a PNG."""
  fig, ax = plots.figure(figsize=(6, 4))
  for key in ("loss", "eval_loss"):
    points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
    if points:
      ax.plot(*zip(*points), label=key, marker="." if key == "eval_loss" else None)
  ax.set_yscale("log")
  plots.label(ax, xlabel="step", ylabel="cross-entropy (scored tokens)")
  plots.save(fig, path)


@dataclasses.dataclass
class Run:
  """What `setup` builds and the loop uses: model, optimizer, data and where things go."""
  workdir: str
  task: Any
  model: Any
  optimizer: Any
  ckpt: ckpt_lib.Checkpoints
  start: int
  mesh: Any
  put: Callable
  model_meta: dict[str, Any]
  log: MetricsLog | None
  skipped: int = 0     # steps not applied (non-finite) since step 0, restored from the checkpoint
  in_a_row: int = 0    # of which the last ones in a row


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None,
          evaluate: Evaluate | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it has checkpoints); returns the final metrics.

  Holds the workdir's exclusive lock for the whole run (`workdir.lock`: a second run into it
  stops at once). `stop_at_step` stops early after checkpointing that step, as if the run
  were killed there (tests of resume determinism). `evaluate` (with
  `config.eval_after_train`) runs once the run has reached `num_steps`, under the lock; its
  results are `result["eval"]`.

  Early stops raise a `stops.RunStopped` (each with its exit code) after closing the files:
  `Preempted` (SIGTERM/SIGINT/SIGUSR1: the step in flight finished and was checkpointed),
  `Diverged` (`max_nonfinite_steps` non-finite steps in a row, none applied), `WriteFailed`.
  """
  common.check_config(config)
  check_stop_settings(config)
  if config.multihost:
    sharding.initialize_distributed(  # before anything touches a device
        heartbeat_timeout_seconds=int(config.heartbeat_timeout_s))
    workdir_lib.set_process(jax.process_index())  # from here on, each process its own log
  config = hf_bridge.with_checkpoint_model(config)  # init_from a Hugging Face directory
  workdir = workdir_lib.prepare(workdir)
  primary = jax.process_index() == 0  # several hosts: one writer (and locker) of the workdir
  with workdir_lib.lock(workdir) if primary else contextlib.nullcontext():
    with stops.StopSignals() as signals:  # while training, a signal stops after a step
      run = setup(config, workdir, primary)
      try:
        end = config.num_steps if stop_at_step is None else min(stop_at_step, config.num_steps)
        last = train_loop(run, config, end, signals)
      finally:
        run.ckpt.close()
        if run.log is not None:
          run.log.close()
    return finish(run, config, end, last, evaluate)


def check_stop_settings(config) -> None:
  """A ValueError unless `max_nonfinite_steps` and `heartbeat_timeout_s` are >= 1."""
  for name in ("max_nonfinite_steps", "heartbeat_timeout_s"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}.")


def setup(config: ml_collections.ConfigDict, workdir: str, primary: bool = True) -> Run:
  """Task, model, optimizer (sharded over `config.mesh`), restored from the newest loadable
  checkpoint or `config.init_from`; writes `config.json` and opens `metrics.jsonl`."""
  task = tasks.make_task(config.task, seed=config.seed)
  task.batch(0, 1)  # fails fast on task settings that cannot make an example
  tok = getattr(task, "tok", None)
  if tok is not None and tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"task.tokenizer {tok.spec!r} has {tok.vocab_size} tokens: set "
                     f"--config.model.vocab_size={tok.vocab_size} (or more); it is "
                     f"{config.model.vocab_size}.")
  check_stop_settings(config)
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
    put = functools.partial(sharding.shard_batch, mesh=mesh,
                            layout=sharding.batch_layout(model.config))
  model_meta = json.loads(json.dumps(config.model.to_dict()))  # as the checkpoint stores it
  ckpt = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), config.max_to_keep)
  try:  # both raise before anything is written
    changes = check_resume(config, workdir, ckpt.latest_step())
    meta = ckpt.restore(model, optimizer, model_meta,
                        log_path=workdir_lib.log_path(workdir))
  except BaseException:
    ckpt.close()
    raise
  start = 0 if meta is None else int(meta["step"])
  skipped = 0 if meta is None else int(meta.get("skipped_steps", 0))
  in_a_row = 0 if meta is None else int(meta.get("nonfinite_in_a_row", 0))
  if meta is not None:
    logging.info("Resumed from step %d in %s.", start, ckpt.directory)
  elif hf_bridge.is_hf_dir(config.init_from):
    hf_bridge.load_weights(model, config.init_from)
    logging.info("Initialised the weights from the checkpoint %s.", config.init_from)
  elif config.init_from:
    source = hf_bridge.run_config(config.init_from) or {}
    converted = source.get("resolved", {}).get("layer_kinds", list(model.config.layer_kinds))
    loaded = ckpt_lib.load_params(model, config.init_from, config.init_step or None,
                                  allow_added=list(converted) != list(model.config.layer_kinds))
    logging.info("Initialised the weights from %s (step %d).", config.init_from, loaded)
  log = None
  if primary:
    if changes:
      workdir_lib.record_config_change(workdir, start, changes)
    write_config(config, model, os.path.join(workdir, "config.json"))
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start)
  logging.info("Model: %s %s", trainer.describe(config, model),
               sharding.describe(mesh, config.fsdp))
  return Run(workdir, task, model, optimizer, ckpt, start, mesh, put, model_meta, log,
             skipped, in_a_row)


def check_resume(config: ml_collections.ConfigDict, workdir: str, step: int | None
                 ) -> list[tuple[str, Any, Any]]:
  """The computation fields (`workdir.COMPUTATION_FIELDS`) that differ from the saved
  `config.json` when resuming; raises `ConfigChangeError` listing them unless
  `config.allow_config_change`. Empty on a fresh run."""
  path = os.path.join(workdir, "config.json")
  if step is None or not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  changes = workdir_lib.config_changes(saved, config.to_dict())
  if changes and not config.allow_config_change:
    raise ConfigChangeError(
        f"{workdir} holds checkpoints (step {step}) made with another config: "
        f"{workdir_lib.format_changes(changes)}. Resume with the saved values, pass a new "
        f"--workdir, or set --config.allow_config_change=True to continue with the new values "
        f"(recorded in {workdir_lib.HISTORY_FILE}).")
  return changes


def write_config(config: ml_collections.ConfigDict, model, path: str) -> None:
  """`config.json`: the config, plus `resolved.layer_kinds` (the pattern repeated per layer)."""
  data = json.loads(config.to_json_best_effort())
  data["resolved"] = dict(
      layer_kinds=list(model.config.layer_kinds),
      note="model.layer_pattern repeats cyclically over model.num_layers; layer_kinds is the "
           "resulting kind of each layer (written for reading, ignored when loading).")
  workdir_lib.write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def train_loop(run: Run, config: ml_collections.ConfigDict, end: int,
               signals: stops.StopSignals | None = None) -> dict[str, Any]:
  """Steps `run.start` .. `end`: update, log every `log_every`, evaluate every `eval_every`,
  checkpoint every `checkpoint_every` (and at `end`). Returns the last logged metrics.

  A step with a non-finite loss or gradients is not applied (`trainer.update_if_finite`); it
  is counted (`skipped_steps` in the metrics and the checkpoints), a periodic checkpoint is
  put off while such steps run in a row, and `config.max_nonfinite_steps` of them in a row
  raise `stops.Diverged`. After each step, if any process got a stop signal (`signals`), that
  step is checkpointed and `stops.Preempted` raised.
  """
  schedule = trainer.learning_rate(config)
  aux_losses = tuple(sorted((k, float(v)) for k, v in config.aux_losses.items()))
  last: dict[str, Any] = {}
  bar = tqdm.tqdm(range(run.start, end), initial=run.start, total=config.num_steps, unit="step",
                  disable=not config.progress, dynamic_ncols=True)
  timer, timed_tokens = time.perf_counter(), 0
  mesh_context = (jax.sharding.set_mesh(run.mesh) if run.mesh is not None
                  else contextlib.nullcontext())
  with mesh_context:  # ring attention layers read the ambient mesh while tracing
    for step in bar:
      batch = run.put(run.task.batch(step, config.batch_size))
      metrics = trainer.train_step(run.model, run.optimizer, batch, grad_accum=config.grad_accum,
                                   lm_weight=float(config.lm_loss_weight),
                                   aux_losses=aux_losses, trainable=config.trainable,
                                   loss_chunk=config.loss_chunk)
      count_applied(run, bool(metrics.pop("applied")), step + 1)
      timed_tokens += trainer.tokens_per_step(config)
      done = step + 1
      if done % config.log_every == 0 or done == end:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last = dict(step=done, lr=float(schedule(step)),
                    tokens_per_s=timed_tokens / (time.perf_counter() - timer), **metrics,
                    skipped_steps=run.skipped)
        if (config.eval_every and done % config.eval_every == 0) or done == config.num_steps:
          last.update(trainer.evaluate_batches(run.model, eval_batches(run.task, config), run.put,
                                               loss_chunk=config.loss_chunk))
        if run.log is not None:
          run.log.write(last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        timer, timed_tokens = time.perf_counter(), 0
      if run.in_a_row >= config.max_nonfinite_steps:
        raise stops.Diverged(diverged_message(run, config, done))
      stop = signals is not None and signals.agreed() and done < end
      if (done % config.checkpoint_every == 0 and not run.in_a_row) or done == end or stop:
        run.ckpt.save(done, run.model, run.optimizer,
                      dict(seed=config.seed, data_step=done, model=run.model_meta,
                           skipped_steps=run.skipped, nonfinite_in_a_row=run.in_a_row))
      if stop:
        raise stops.Preempted(
            f"stopped by {signals.received} after step {done} of {config.num_steps}: saved "
            f"checkpoint {done} in {run.ckpt.directory}; run the same command again to resume.")
  bar.close()
  return last


def count_applied(run: Run, applied: bool, step: int) -> None:
  """Updates the run's counts of steps not applied (non-finite), one warning line for each."""
  if applied:
    run.in_a_row = 0
    return
  run.skipped += 1
  run.in_a_row += 1
  logging.warning("step %d: non-finite loss or gradients; the update was not applied "
                  "(%d in a row).", step, run.in_a_row)


def diverged_message(run: Run, config: ml_collections.ConfigDict, step: int) -> str:
  """One line: which steps were not finite, and the last good checkpoint to go back to."""
  good = run.ckpt.latest_step()
  path = os.path.join(run.ckpt.directory, str(good))
  where = (f"the last good checkpoint is step {good} ({path})" if good is not None
           else "no checkpoint was written")
  return (f"training diverged: steps {step - run.in_a_row + 1}-{step} had a non-finite loss or "
          f"gradients ({run.in_a_row} in a row, max_nonfinite_steps="
          f"{config.max_nonfinite_steps}) and none was applied; {where}. Lower optim.lr (or "
          f"raise optim.warmup_steps) and train into a new --workdir, or from that checkpoint "
          f"with --config.init_from.")


def finish(run: Run, config: ml_collections.ConfigDict, end: int, last: dict[str, Any],
           evaluate: Evaluate | None = None) -> dict[str, Any]:
  """Plots the loss and, when the run reached `num_steps`, evaluates (`eval_after_train`)."""
  if run.log is not None:
    plot_loss(read_metrics(run.log.path), os.path.join(run.workdir, "loss.png"))
  result = {"step": end, "workdir": run.workdir, **last}
  if evaluate is not None and config.eval_after_train and end == config.num_steps:
    result["eval"] = evaluate(run.model, config, run.workdir, overwrite=True)
  return result


def eval_batches(task, config: ml_collections.ConfigDict):
  """Held-out batches (a different RNG stream than training) for the periodic evaluation."""
  return [task.batch(i, config.batch_size, salt=1) for i in range(config.eval_batches)]
