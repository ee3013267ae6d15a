"""Evaluation outputs: accuracy tables, CSV files and heatmaps, written without overwriting.

    results = evaluate_and_report(model, config, outdir)   # every task of config.eval
    train_and_evaluate(config, workdir)                     # training, then the grid

Files are `eval_<task>[_<tag>].csv/.png` (and `eval_dsa_recall[_<tag>].csv`); an existing one is
refused (`FileExistsError`) before anything is evaluated, unless `overwrite`.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from experiments.evaluation import needle, scores
from experiments.training import loop, plots


def format_table(rows: list[dict[str, Any]]) -> str:
  """Markdown table: one row per depth plus the mean, one column per length."""
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  cell = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
  lines = [f"| {rows[0]['task']} depth \\ length | " + " | ".join(map(str, lengths)) + " |",
           "|---" * (len(lengths) + 1) + "|"]
  for depth in depths:
    lines.append(f"| {depth:.2f} | " + " | ".join(f"{cell[l, depth]:.2f}" for l in lengths) + " |")
  means = [np.mean([cell[l, d] for d in depths]) for l in lengths]
  lines.append("| **mean** | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
  return "\n".join(lines)


def format_distance_table(rows: list[dict[str, Any]]) -> str:
  """Markdown table of `needle_by_distance` rows: one row per (length, distance bucket)."""
  lines = ["| length | distance | exact match | digit accuracy |", "|---|---|---|---|"]
  lines += [f"| {r['length']} | [{r['distance_lo']}, {r['distance_hi']}) | {r['accuracy']:.2f} "
            f"| {r['token_accuracy']:.2f} |" for r in rows]
  return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot_heatmap(rows: list[dict[str, Any]], path: str, title: str) -> None:
  """Accuracy over (context length x depth), the standard needle-in-a-haystack picture."""
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  cell = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
  image = np.array([[cell[l, d] for l in lengths] for d in depths])
  fig, ax = plots.figure(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
  im = ax.imshow(image, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  for i in range(len(depths)):
    for j in range(len(lengths)):  # white on dark cells, black on light ones
      r, g, b, _ = im.cmap(im.norm(image[i, j]))
      dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5
      ax.text(j, i, f"{image[i, j]:.2f}", ha="center", va="center", fontsize=8,
              color="white" if dark else "black")
  ax.set_xticks(range(len(lengths)), [str(l) for l in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="exact-match accuracy")
  plots.save(fig, path)


def plot_distance(rows: list[dict[str, Any]], path: str, title: str, window: int) -> None:
  """Needle exact match against distance (bucket midpoints), one line per context length;
  the dotted line marks one local layer's reach (`window // 2` each side; 0 = none)."""
  fig, ax = plots.figure(figsize=(6, 4))
  for length in sorted({r["length"] for r in rows}):
    points = [((r["distance_lo"] + r["distance_hi"]) / 2, r["accuracy"]) for r in rows
              if r["length"] == length]
    ax.plot(*zip(*points), marker="o", label=f"context {length}")
  if window:
    ax.axvline(window // 2, color="gray", linestyle=":", label=f"local reach {window // 2}")
  ax.set_xscale("log", base=2)
  plots.label(ax, xlabel="distance between the masked value and its key (tokens)",
              ylabel="exact match (all digits)", title=title, ylim=(-0.02, 1.02))
  plots.save(fig, path)


def check_outputs(outdir: str, task_names: Sequence[str], tag: str, overwrite: bool) -> None:
  """Raises `FileExistsError` if an output `eval_<task>[_<tag>].csv/.png` exists (unless
  `overwrite`): evaluations never replace a result silently."""
  suffix = f"_{tag}" if tag else ""
  outputs = [os.path.join(outdir, f"eval_{n}{suffix}{x}") for n in task_names
             for x in (".csv", ".png")]
  existing = [p for p in outputs if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"{', '.join(existing)} already exist(s); pass another --tag, or "
                          f"--overwrite to replace them.")


def haystack_evaluation(score: Callable[..., list[dict[str, Any]]]) -> Callable[..., list]:
  """An evaluation whose `score(model, config, name, lengths, depths, examples, batch_size)`
  gives one row per (length, depth): CSV, heatmap and the printed table."""
  def evaluate(model, config, name, lengths, depths, examples, stem, rope):
    rows = score(model, config, name, lengths, depths, examples, config.eval.batch_size)
    write_csv(rows, stem + ".csv")
    plot_heatmap(rows, stem + ".png", f"{name}: trained at {config.task.seq_len}, {rope}")
    print(f"\n{name} exact-match accuracy (trained at length {config.task.seq_len}; {rope}):")
    print(format_table(rows), flush=True)
    return rows
  return evaluate


def mlm_needle_evaluation(model, config, name, lengths, depths, examples, stem, rope):
  """MLM encoders: the masked needle's accuracy by distance (CSV, line plot, table)."""
  del depths
  rows = scores.needle_by_distance(model, config, lengths, examples, config.eval.batch_size)
  write_csv(rows, stem + ".csv")
  kinds = "/".join(model.config.layer_pattern)
  train_len = config.task.seq_len
  plot_distance(rows, stem + ".png", f"MLM needle ({kinds}), trained at {train_len}",
                model.config.kind_settings("local").window if "local" in kinds else 0)
  print(f"\nMLM needle retrieval by distance ({kinds}; trained at {train_len}; {rope}):")
  print(format_distance_table(rows), flush=True)
  return rows


# Evaluation task name -> (model, config, name, lengths, depths, examples, file stem, rope
# description) -> rows, having written `<stem>.csv` / `.png` and printed its table.
EVALUATIONS = {
    "passkey": haystack_evaluation(scores.grid),        # teacher-forced exact match
    "needle": haystack_evaluation(scores.grid),
    "niah": haystack_evaluation(needle.niah_grid),      # real filler, generated answers
    "mlm_needle": mlm_needle_evaluation,
}


def evaluate_and_report(model, config: ml_collections.ConfigDict, outdir: str, *,
                        task_names=None, lengths=None, depths=None, examples=None,
                        tag: str = "", overwrite: bool = False) -> dict[str, list[dict[str, Any]]]:
  """Runs the grid for each task (`EVALUATIONS`), writes CSV + plot under `outdir`, prints the
  tables.

  Files are `eval_<task>[_<tag>].csv/.png` (and `eval_dsa_recall[_<tag>].csv`); if one exists
  and not `overwrite`, raises `FileExistsError` before evaluating anything (`ValueError` for
  an unknown task name).
  """
  e = config.eval
  train_len = config.task.seq_len
  lengths = lengths or [m * train_len for m in e.length_multiples]
  depths = depths or list(e.depths)
  suffix = f"_{tag}" if tag else ""
  names = list(task_names or e.tasks)
  unknown = sorted(set(names) - set(EVALUATIONS))
  if unknown:
    raise ValueError(f"unknown evaluation task(s) {unknown}; known: {sorted(EVALUATIONS)}.")
  check_outputs(outdir, names, tag, overwrite)
  rope = f"rope={model.config.rope_scaling}" + (
      f" x{model.config.rope_factor:g}" if model.config.rope_scaling != "none" else "")
  results = {}
  for name in names:
    stem = os.path.join(outdir, f"eval_{name}{suffix}")
    results[name] = EVALUATIONS[name](model, config, name, lengths, depths,
                                      examples or e.examples, stem, rope)
  recall = scores.indexer_recall(model, config, (task_names or e.tasks)[0], train_len, depths,
                          examples or e.examples, e.batch_size)
  if recall:
    write_csv(recall, os.path.join(outdir, f"eval_dsa_recall{suffix}.csv"))
    print(f"\nDSA indexer recall at length {train_len} (dense attention mass on the top-k keys):")
    print("  " + "  ".join(f"layer {r['layer']}: {r['recall']:.3f}" for r in recall), flush=True)
    results["dsa_recall"] = recall
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict[str, Any]:
  """`training.loop.train`, then (with `config.eval_after_train`, once the run reached
  `num_steps`) `evaluate_and_report` into the workdir: what `python -m experiments.train`
  runs. Returns the final metrics, with the evaluation's rows under `"eval"`."""
  return loop.train(config, workdir, stop_at_step=stop_at_step, evaluate=evaluate_and_report)
