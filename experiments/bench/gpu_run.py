"""What the GPU check scripts share: a time budget, a GPU guard and tables written as they go.

A lent GPU comes for minutes, and each command is cut at 600 s, so the scripts
(`experiments/bench/gpu_check.py`, `experiments/bench/dsa_gpu_check.py`) never lose what they measured:

* `Budget`: one deadline for the whole run, correctness included, counted from process start
  (JAX start-up too); nothing new starts after `deadline - margin`.
* `Table`: each row is printed the moment it is measured (flushed) and appended to
  `OUT/<name>.csv` (header first, flushed per row); `OUT/<name>.md` is rewritten per row. A run
  killed mid-way keeps every finished row on disk. Rows never started are written as
  "skipped (budget)" when the run ends normally.
* `define_common_flags`: the flags both scripts take (budget, output folder, CPU override).
* `run_checks` / `verdict`: the correctness loop (one table row per case, budget-aware, an
  exception is a row, not a crash) and the pass rule (max |err| of out and the gradients within
  the dtype's tolerance of the float32 result, gradients 2x, all finite).
* `require_gpu`: exits with status 2 at once when JAX's backend is not a GPU, unless the caller
  passes the explicit CPU override (the interpret-mode smoke test).

Imports nothing beyond the standard library, absl and JAX: the scripts must run on a bare JAX image.
"""

from __future__ import annotations

import csv
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags


def define_common_flags(check_share: float) -> None:
  """Defines --budget_s, --margin_s, --check_share, --out, --allow_cpu and --interpret."""
  flags.DEFINE_float("budget_s", 240.0, "Seconds for the whole run, correctness included.")
  flags.DEFINE_float("margin_s", 20.0, "No measurement starts in the last margin_s seconds.")
  flags.DEFINE_float("check_share", check_share, "Correctness cases start only in this first "
                     "share of the budget; the rest is for timing.")
  flags.DEFINE_string("out", "", "Directory for the CSV/markdown tables (written as rows come).")
  flags.DEFINE_bool("allow_cpu", False, "Run without a GPU (with --interpret: CPU smoke test).")
  flags.DEFINE_bool("interpret", False, "Pallas interpret mode (a CPU smoke test of this script).")


def require_gpu(allow_cpu: bool) -> None:
  """Exit(2) unless the default backend is a GPU or `allow_cpu` (the CPU smoke-test override)."""
  backend = jax.default_backend()
  print(f"jax {jax.__version__}, backend {backend}, devices: {jax.devices()}", flush=True)
  if backend != "gpu" and not allow_cpu:
    print(f"ERROR: JAX backend is {backend!r}, not a GPU: nothing measured. (CPU smoke test: "
          f"--allow_cpu --interpret.)", file=sys.stderr, flush=True)
    sys.exit(2)


class Budget:
  """Wall-clock budget from `start` (a `time.time()`, e.g. at import): `budget_s` in all."""

  def __init__(self, start: float, budget_s: float, margin_s: float):
    self.start, self.budget_s, self.margin_s = start, float(budget_s), float(margin_s)

  def elapsed(self) -> float:
    return time.time() - self.start

  def left(self) -> float:
    """Seconds left for starting new work (deadline minus the margin)."""
    return self.budget_s - self.margin_s - self.elapsed()

  def allows(self, share: float = 1.0) -> bool:
    """May a new measurement start, within the first `share` of the usable budget?"""
    usable = self.budget_s - self.margin_s
    return self.elapsed() < usable * share


def verdict(ours, errs: list[float], ref, tol: float) -> bool:
  """PASS rule: `errs[i] <= tol * (1 + max|ref[i]|)` (2x `tol` for the gradients, i >= 1) and
  every array of `ours` finite."""
  scale = [float(jnp.max(jnp.abs(r.astype(jnp.float32)))) + 1.0 for r in ref]
  ok = all(e <= tol * (2 if i else 1) * s for i, (e, s) in enumerate(zip(errs, scale)))
  return ok and all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in ours)


def format_errors(errs: list[float]) -> str:
  return " ".join(f"{e:.1e}" for e in errs)


def run_checks(table: "Table", cases, check_one, budget: Budget, share: float,
               error_column: str) -> bool:
  """`check_one(*args) -> dict` (with "status") for each `(row, args)` of `cases`, one table row
  each; cases the budget no longer allows are "skipped (budget)", an exception is an ERROR row
  (its message in `error_column`). True when no case that ran failed."""
  all_ok = True
  for row, args in cases:
    if not budget.allows(share):
      table.add(**row, status="skipped (budget)")
      continue
    start = time.time()
    try:
      row = {**row, **check_one(*args)}
    except Exception as e:  # pylint: disable=broad-except
      row = {**row, "status": "ERROR", error_column: f"{type(e).__name__}: {e}"[:300]}
    all_ok &= row["status"] == "PASS"
    table.add(**row, s=round(time.time() - start, 1))
  return all_ok


def begin(start: float, flag_values) -> Budget:
  """`require_gpu`, then the run's `Budget` from `start` and the common flags' values."""
  require_gpu(flag_values.allow_cpu)
  return Budget(start, flag_values.budget_s, flag_values.margin_s)


def finish(ok: bool, budget: Budget) -> None:
  """Prints the verdict line and exits: 0 when every correctness case passed, else 1."""
  print(f"\ncorrectness: {'ALL PASS' if ok else 'FAILURES (see above)'}; "
        f"total {budget.elapsed():.0f}s of {budget.budget_s:.0f}s", flush=True)
  sys.exit(0 if ok else 1)


class Table:
  """Rows printed as measured and written to `out_dir/<name>.csv` and `.md` as they come.

  `columns` name the fields; `widths` (same length) give the printed column widths.
  """

  def __init__(self, out_dir: str | None, name: str, columns, widths, title: str):
    self.columns, self.widths, self.rows = list(columns), list(widths), []
    self.csv_path = self.md_path = None
    self.title = title
    print(f"\n== {title} ==", flush=True)
    print("  " + " ".join(f"{c:>{w}}" if w > 0 else f"{c:<{-w}}"
                          for c, w in zip(self.columns, self.widths)), flush=True)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      self.csv_path = os.path.join(out_dir, f"{name}.csv")
      self.md_path = os.path.join(out_dir, f"{name}.md")
      with open(self.csv_path, "w", newline="") as f:
        csv.writer(f).writerow(self.columns)
      self._write_markdown()

  def add(self, **row) -> None:
    """Prints the row (flushed) and appends it to the CSV and markdown files at once."""
    cells = [_fmt(row.get(c, "")) for c in self.columns]
    self.rows.append(cells)
    print("  " + " ".join(f"{c:>{w}}" if w > 0 else f"{c:<{-w}}"
                          for c, w in zip(cells, self.widths)), flush=True)
    if self.csv_path:
      with open(self.csv_path, "a", newline="") as f:
        csv.writer(f).writerow(cells)
        f.flush()
        os.fsync(f.fileno())
      self._write_markdown()

  def _write_markdown(self) -> None:
    lines = [f"## {self.title}", "", "| " + " | ".join(self.columns) + " |",
             "|" + "---|" * len(self.columns)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in self.rows]
    tmp = self.md_path + ".tmp"
    with open(tmp, "w") as f:
      f.write("\n".join(lines) + "\n")
    os.replace(tmp, self.md_path)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
  return str(value)
