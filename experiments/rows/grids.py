"""What the recall rows (1 patterns, 2 MQAR, 4 DSA) share: train a setting per seed, tabulate.

A setting is one model recipe (a layer pattern, a DSA stage chain); each is trained once per
seed under `<row workdir>/<setting>_s<seed>/` (`base.train_run`: resumable) and evaluated into
records (dicts, one per measured cell) cached as JSON next to the run (`base.cached`). The
markdown tables put one setting per column and report every cell as mean (min-max) over seeds.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import ml_collections

from experiments.training import plots
from experiments.rows import base


def variant_config(get_config: Callable[[str], ml_collections.ConfigDict], setting: str,
                   seed: int, quick: bool) -> ml_collections.ConfigDict:
  """`get_config(setting[,smoke])` with `seed`; `quick`: 2 steps, one evaluation and checkpoint
  (the suite runs every row's quick version)."""
  config = get_config(setting + (",smoke" if quick else ""))
  config.seed = seed
  if quick:
    config.num_steps = config.log_every = config.eval_every = config.checkpoint_every = 2
  return config


def run_settings(ctx: base.Context, settings: Sequence[str],
                 make_config: Callable[[str, int], ml_collections.ConfigDict],
                 measure: Callable[[str, str, int], list[dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
  """Trains every (setting, seed) and returns `measure(workdir, setting, seed)`'s records.

  `make_config(setting, seed)` is the run's config (its seed already set); `measure` is cached
  in `<workdir>/row_eval.json`, so a finished row re-runs in seconds. `--quick` trains the first
  seed only (every run costs seconds of compilation; the tables' code is the same).
  """
  records = []
  for setting in settings:
    for seed in ctx.run_seeds:
      workdir = base.train_run(make_config(setting, seed), ctx.path(f"{setting}_s{seed}"))
      records += base.cached(os.path.join(workdir, "row_eval.json"),
                             lambda w=workdir, s=setting, d=seed: measure(w, s, d))
  return records


def seed_table(records: Sequence[dict[str, Any]], row_key: str, col_key: str, value: str,
               row_label: str, fmt: str = "{:.2f}", mean_row: bool = True) -> str:
  """Markdown table: one row per `row_key` value, one column per `col_key` value, each cell
  `value`'s mean (min-max) over the seeds; with `mean_row`, a last row of the per-seed means
  over the rows (so its spread is over seeds, not over rows)."""
  rows = sorted({r[row_key] for r in records})
  cols = list(dict.fromkeys(r[col_key] for r in records))
  def values(col, row=None):
    per_seed = {}
    for r in records:
      if r[col_key] == col and (row is None or r[row_key] == row):
        per_seed.setdefault(r["seed"], []).append(float(r[value]))
    return [sum(v) / len(v) for v in per_seed.values()]
  lines = [[row] + [base.cell(values(c, row), fmt) for c in cols] for row in rows]
  if mean_row:
    lines.append(["**mean**"] + [f"**{base.cell(values(c), fmt)}**" for c in cols])
  return base.markdown_table([row_label] + cols, lines)


def seeds_note(records: Sequence[dict[str, Any]]) -> str:
  """`"seeds 0, 1, 2"` (`"seed 0"`): the seeds the records come from."""
  seeds = sorted({r["seed"] for r in records})
  return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))


def depth_plot(records: Sequence[dict[str, Any]], title: str):
  """`plot(path)` (for `base.Result`): passkey exact match against needle depth, per setting."""
  return lambda path: plot_by(records, "depth", "accuracy", path, xlabel="needle depth",
                              ylabel="passkey exact match", title=title)


def plot_by(records: Sequence[dict[str, Any]], x_key: str, value: str, path: str, *,
            xlabel: str, ylabel: str, title: str) -> None:
  """`value` against `x_key`, one line per setting: the mean over seeds with a min-max band."""
  fig, ax = plots.figure(figsize=(6, 4))
  for setting in dict.fromkeys(r["setting"] for r in records):
    xs = sorted({r[x_key] for r in records if r["setting"] == setting})
    cells = [[float(r[value]) for r in records if r["setting"] == setting and r[x_key] == x]
             for x in xs]
    stats = [base.spread(c) for c in cells]
    line, = ax.plot(xs, [s["mean"] for s in stats], marker="o", label=setting)
    ax.fill_between(xs, [s["lo"] for s in stats], [s["hi"] for s in stats],
                    color=line.get_color(), alpha=0.2)
  plots.label(ax, xlabel=xlabel, ylabel=ylabel, title=title, ylim=(-0.02, 1.02))
  plots.save(fig, path)
