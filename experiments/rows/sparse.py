"""Row 10: token-level (DSA) vs block-level (MoBA, NSA) selection at the same key budget.

experiments/configs/sparse.py's four models (a local layer then the layer under test; L = 128,
k = L / 8 = 16 selected keys per query) trained per task and seed with equal total steps:

* `dense`: flash attention (DSA stage "dense", its indexer learning the KL alongside), `STEPS`;
* `dsa`: DeepSeek's sparse stage for the last `SPARSE_STEPS` steps, from the dense run's
  checkpoint at `STEPS - SPARSE_STEPS` (row 4's chain, `dsa.chain_stage`): `STEPS` in all;
* `moba`, `nsa`: trained from scratch for `STEPS` steps.

Measured per (task, model, seed): passkey exact match by depth (`scores.grid`; and the share of
answer digits right, over all depths), MQAR per-query
accuracy and text held-out bits per byte (`BATCHES` held-out batches each); attention FLOPs
per token at L and at 128K (`models.flops`); for DSA and MoBA the recall of the dense choice
(`selection_recall`: on the task's held-out batches, the share of the model's own dense
attention's top-k keys (DSA) or top gated-count past blocks by attention mass (MoBA) that the
selection contains).
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import jax

from experiments.configs import sparse
from experiments.data import tasks
from experiments.evaluation import runs, scores
from experiments.rows import base, dsa, grids
from experiments.training import plots, trainer
from models import dsa as dsa_model
from models import flops
from models import moba as moba_model

MODELS = sparse.SETTINGS
TASKS = ("passkey", "mqar", "text")
# The quick row (run by the tests) covers the DSA chain and MoBA's recall on two tasks; NSA runs
# through the same generic path and is trained in tests/models/test_nsa.py (its compile would
# double the quick cost).
QUICK = ("passkey/dense", "passkey/dsa", "mqar/moba")
STEPS, SPARSE_STEPS = 100, 25
DEPTHS = (0.0, 0.5, 1.0)
EXAMPLES, BATCHES = 16, 4
LONG = 131072
COLUMNS = ("task", "model", "seed", "length", "steps", "metric", "value", "selection_recall",
           "attn_flops_per_token", "attn_flops_per_token_128k")


def make_config(ctx: base.Context, setting: str, seed: int):
  """`sparse.py:<model>` on `<task>` (setting `"<task>/<model>"`); DSA in row 4's chain."""
  task, model = setting.split("/")
  config = grids.variant_config(sparse.get_config, model, seed, ctx.quick)
  sparse.set_task(config, task)
  if ctx.quick:
    config.task.update(max_bytes=1 << 16) if task == "text" else None
  if model in ("dense", "dsa"):
    steps = (2, 1) if ctx.quick else (STEPS, SPARSE_STEPS)
    dsa.chain_stage(config, model == "dsa", ctx.path(f"{task}/dense_s{seed}"), *steps)
    config.log_every = config.eval_every = min(config.eval_every, config.num_steps)
  elif not ctx.quick:
    config.num_steps = STEPS
  return config


@nnx.jit
def _layer_recalls(model, batch):
  _, aux = model(batch["tokens"], segment_ids=batch["segment_ids"])
  return [layer.get("selection_recall") for layer in aux["layers"]]


def selection_recall(model, batches) -> float:
  """Mean `aux["selection_recall"]` of the DSA / MoBA layers over `batches` (NaN if none)."""
  found = dsa_model.set_recall(model, True) + moba_model.set_recall(model, True)
  try:
    values = [float(v) for batch in batches
              for v in jax.device_get(_layer_recalls(model, trainer.to_device(batch)))
              if v is not None]
  finally:
    dsa_model.set_recall(model, False)
    moba_model.set_recall(model, False)
  return sum(values) / len(values) if found and values else float("nan")


def measure(ctx: base.Context, workdir: str, setting: str, seed: int) -> list[dict]:
  config, model, step = runs.load_run(workdir)
  task_name, model_name = setting.split("/")
  task = tasks.make_task(config.task, seed=config.seed)
  batches = 1 if ctx.quick else BATCHES
  held_out = [task.batch(i, config.batch_size, salt=1) for i in range(batches)]
  if task_name == "passkey":
    examples = 2 if ctx.quick else EXAMPLES
    grid = scores.grid(model, config, "passkey", [config.task.seq_len], DEPTHS, examples,
                       examples)
    cells = [(f"passkey depth {c['depth']:.2f}", c["accuracy"]) for c in grid] + [
        ("passkey digit accuracy", sum(c["token_accuracy"] for c in grid) / len(grid))]
  else:
    result = trainer.evaluate_batches(model, held_out)
    cells = [("MQAR per-query accuracy", result["token_accuracy"])] if task_name == "mqar" else [
        ("text bits per byte", result["eval_loss"] / math.log(2))]
  model_config = trainer.model_config(config)
  common = dict(task=task_name, model=model_name, seed=seed, length=config.task.seq_len,
                steps=step + (config.init_step if config.init_from else 0))
  recall = (selection_recall(model, held_out) if model_name in ("dsa", "moba")
            else float("nan"))
  cost = dict(selection_recall=recall,
              attn_flops_per_token=flops.attention_flops_per_token(model_config,
                                                                   config.task.seq_len),
              attn_flops_per_token_128k=flops.attention_flops_per_token(model_config, LONG))
  return [dict(common, metric=metric, value=float(value), **cost) for metric, value in cells]


def run(ctx: base.Context) -> base.Result:
  settings = QUICK if ctx.quick else tuple(f"{t}/{m}" for t in TASKS for m in MODELS)
  records = []
  for seed in ctx.run_seeds:  # seed-major: an interrupted row has every setting of a seed
    records += grids.run_settings(dataclasses.replace(ctx, seeds=(seed,)), settings,
                                  lambda s, d: make_config(ctx, s, d),
                                  lambda w, s, d: measure(ctx, w, s, d))
  models = list(dict.fromkeys(r["model"] for r in records))
  metrics = list(dict.fromkeys(r["metric"] for r in records))
  at = lambda metric, model, key="value": [r[key] for r in records
                                           if r["metric"] == metric and r["model"] == model]
  rows = [[metric] + [base.cell(at(metric, m)) if at(metric, m) else "-" for m in models]
          for metric in metrics]
  for task in dict.fromkeys(r["task"] for r in records):
    first = next(r["metric"] for r in records if r["task"] == task)
    rows.append([f"selection recall ({task})"] + [
        base.cell(at(first, m, "selection_recall")) if m in ("dsa", "moba") and at(first, m)
        else "-" for m in models])
  for key, label in (("attn_flops_per_token", f"attention FLOPs / token at {records[0]['length']}"),
                     ("attn_flops_per_token_128k", "attention FLOPs / token at 128K")):
    rows.append([label] + [f"{next(r[key] for r in records if r['model'] == m):,}"
                           for m in models])
  table = base.markdown_table(["measure \\ model"] + models, rows)
  note = (f"L = {records[0]['length']}, k = L/8 selected keys; {grids.seeds_note(records)}; "
          "mean (min-max) over seeds.")
  return base.Result(records, f"{table}\n\n{note}", lambda path: plot_bars(records, path))


def plot_bars(records: list[dict], path: str) -> None:
  """One panel per measure: mean over seeds per model, min-max error bars."""
  metrics = list(dict.fromkeys(r["metric"] for r in records))
  fig, axes = plots.figure(1, len(metrics), figsize=(3 * len(metrics), 3.2), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    models = list(dict.fromkeys(r["model"] for r in records if r["metric"] == metric))
    stats = [base.spread([r["value"] for r in records
                          if r["metric"] == metric and r["model"] == m]) for m in models]
    means = [s["mean"] for s in stats]
    errors = [[m - s["lo"] for m, s in zip(means, stats)],
              [s["hi"] - m for m, s in zip(means, stats)]]
    ax.bar(models, means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(models))])
    plots.label(ax, title=metric, legend=False)
  plots.save(fig, path)


ROW = base.Row(number=10, name="sparse",
               title="DSA vs MoBA vs NSA at the same selected-key budget (passkey, MQAR, text)",
               columns=COLUMNS, run=run, unmeasured=("selection_recall",))
