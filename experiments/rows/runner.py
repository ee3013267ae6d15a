"""Running results rows: the row table, one row's outputs and the summary of all of them.

    run_rows(parse_rows("1,3"), workdir="/tmp/longctx_results", out=RESULTS_DIR, quick=False,
             seeds=(0, 1, 2))

Each row (one module of this package, listed in `ROWS`) trains its models under
`<workdir>/<row name>/` (resumable: rerun after a kill) and reports every cell over the seeds.
Outputs go to `out`: `<row>.csv`, `<row>.png`, `<row>.md` and `summary.md` (`summary_quick.md`):
every row's table, seeds, CPU and wall minutes (CPU: each training run's own, recorded by
`base.train_run` wherever it ran, plus the measuring done by these calls; wall: these calls',
which count runs trained by other processes as nothing and parallel ones twice).
"""

from __future__ import annotations

import csv
import json
import os
import time

from experiments.rows import (base, decode_memory, dsa, extension, mqar, patterns, performance,
                              recall_state, sparse, streaming, text)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "results")

# Every row, by its number in experiments/results/README.md.
ROWS: dict[int, base.Row] = {m.ROW.number: m.ROW for m in (patterns, mqar, extension, dsa, text,
                                                          performance, recall_state,
                                                          decode_memory, streaming, sparse)}


def parse_rows(spec: str) -> list[base.Row]:
  """`"1,3"` or `"all"` -> the rows; ValueError naming unknown ones and what exists."""
  if spec.strip() == "all":
    return [ROWS[n] for n in sorted(ROWS)]
  picked = []
  for word in (w.strip() for w in spec.split(",") if w.strip()):
    match = [r for r in ROWS.values() if word in (str(r.number), r.name)]
    if not match:
      raise ValueError(f"--rows: unknown row {word!r}; rows: "
                       + ", ".join(f"{r.number} ({r.name})" for r in ROWS.values()))
    picked.append(match[0])
  return picked


def write_csv(records: list[dict], path: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
  os.replace(tmp, path)


def run_row(row: base.Row, workdir: str, out: str, quick: bool, seeds: tuple[int, ...]
            ) -> str:
  """Runs one row; writes `<out>/<name>.csv`, `.md` (+ `.png`); returns its summary section."""
  start, cpu_start = time.perf_counter(), time.process_time()
  ctx = base.Context(workdir=os.path.join(workdir, row.name), quick=quick, seeds=seeds)
  os.makedirs(ctx.workdir, exist_ok=True)
  runs_before, trained_before = len(base.LEDGER.runs), base.LEDGER.trained_minutes
  print(f"\n=== row {row.number}: {row.title} ({'quick' if quick else 'full'}, seeds "
        f"{','.join(map(str, ctx.run_seeds))}) ===", flush=True)
  result = row.run(ctx)
  base.check_records(row, result.records)
  write_csv(result.records, os.path.join(out, f"{row.name}.csv"))
  if result.plot is not None:
    result.plot(os.path.join(out, f"{row.name}.png"))
  # The runs this row used (trained now or before, by any process) count their own CPU time;
  # measuring is this call's CPU time less the training it did.
  trained, runs, unrecorded = base.training_cpu(base.LEDGER.runs[runs_before:])
  evaluation = ((time.process_time() - cpu_start) / 60
                - (base.LEDGER.trained_minutes - trained_before))
  wall = add_minutes(ctx.path("wall_minutes.json"), "wall_minutes",
                     (time.perf_counter() - start) / 60)
  evaluation = add_minutes(ctx.path("eval_cpu_minutes.json"), "cpu_minutes", evaluation)
  unrecorded = f", {unrecorded} of them without a recorded CPU time" if unrecorded else ""
  section = (f"## Row {row.number}: {row.title}\n\n`python -m experiments.reproduce "
             f"--rows={row.number}{' --quick' if quick else ''}`; seeds "
             f"{','.join(map(str, ctx.run_seeds))}; {trained + evaluation:.1f} CPU minutes "
             f"(training {trained:.1f} over {runs} runs{unrecorded}; measuring "
             f"{evaluation:.1f}), "
             f"{wall:.1f} wall minutes over the calls that computed it (finished runs and "
             f"results are cached, not recomputed).\n\n{result.markdown}\n")
  with open(os.path.join(out, f"{row.name}.md"), "w") as f:
    f.write(section)
  print(section, flush=True)
  return section


def add_minutes(path: str, key: str, minutes: float) -> float:
  """Adds this call's `minutes` to the row's total `key` in `path` (a resumed row's calls add
  up; a re-run from caches adds about 0); returns the total."""
  total = minutes
  if os.path.exists(path):
    with open(path) as f:
      total += json.load(f)[key]
  with open(path, "w") as f:
    json.dump({key: total}, f)
  return total


def run_rows(rows: list[base.Row], workdir: str, out: str, quick: bool,
             seeds: tuple[int, ...]) -> str:
  """Runs `rows` in order and writes their outputs under `out`; returns the summary's path.

  The summary holds every row whose section (`<out>/<name>.md`) exists, this call's and
  earlier calls' (`--rows=1` then `--rows=3` leave both in it).
  """
  os.makedirs(out, exist_ok=True)
  for row in rows:
    run_row(row, workdir, out, quick, seeds)
  sections = []
  for number in sorted(ROWS):
    md = os.path.join(out, f"{ROWS[number].name}.md")
    if os.path.exists(md):
      with open(md) as f:
        sections.append(f.read())
  path = os.path.join(out, "summary_quick.md" if quick else "summary.md")
  with open(path, "w") as f:
    f.write("# Results\n\n" + "\n".join(sections))
  print(f"wrote {path}")
  return path
