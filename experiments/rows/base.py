"""What every results row shares: the `Row` record, its run context, seed spreads, caching.

A row is one research question answered by real runs (experiments/results/README.md). Its
module
defines `ROW = Row(...)`; `experiments/reproduce.py` runs it and writes
`<out>/<row.name>.csv`, `<out>/<row.name>.png` and the row's markdown table into the summary.

Rows train through `experiments.training.loop.train`, one workdir per (setting, seed)
under `Context.workdir`, so a killed `reproduce.py` resumes from the runs' checkpoints; results
computed from finished runs are cached as JSON next to them (`cached`), so re-running a finished
row only re-writes its outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import ml_collections

from experiments.training import loop


@dataclasses.dataclass(frozen=True)
class Context:
  """Where and how a row runs.

  workdir: this row's own directory (training runs and caches go under it).
  quick:   the seconds-long version (tiny models, a few steps; `reproduce.py --quick`, tests).
  seeds:   the training seeds; every cell of a table is reported over them.
  """
  workdir: str
  quick: bool
  seeds: tuple[int, ...]

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  @property
  def run_seeds(self) -> tuple[int, ...]:
    """The seeds a row trains: all of them, or with `quick` the first (the code path, once)."""
    return self.seeds[:1] if self.quick else self.seeds


@dataclasses.dataclass
class Result:
  """What a row produced: CSV records (keys = `Row.columns`), its markdown table, its plot."""
  records: list[dict[str, Any]]
  markdown: str
  plot: Callable[[str], None] | None = None  # writes the row's PNG to the path given


@dataclasses.dataclass(frozen=True)
class Row:
  """One results row: `number` as in experiments/results/README.md, `name` for its files,
  what it runs."""
  number: int
  name: str
  title: str
  columns: tuple[str, ...]
  run: Callable[[Context], Result]
  unmeasured: tuple[str, ...] = ()  # columns that may be NaN: "not measured" (e.g. untimed)


def layer_letters(kinds: Sequence[str]) -> str:
  """`"NNNG"`: one letter per layer, its kind's initial (N for gdn: G is global)."""
  return "".join("N" if k == "gdn" else k[0].upper() for k in kinds)


def spread(values: Sequence[float]) -> dict[str, float]:
  """Mean, min and max of one cell's per-seed values."""
  values = [float(v) for v in values]
  if not values:
    raise ValueError("spread() of no values: a cell needs at least one seed.")
  return dict(mean=sum(values) / len(values), lo=min(values), hi=max(values))


def cell(values: Sequence[float], fmt: str = "{:.2f}") -> str:
  """`"0.83 (0.75-0.97)"`: the mean over seeds with its min-max (one seed: the value)."""
  s = spread(values)
  if len(values) == 1:
    return fmt.format(s["mean"])
  return f"{fmt.format(s['mean'])} ({fmt.format(s['lo'])}-{fmt.format(s['hi'])})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines)


def cached(path: str, compute: Callable[[], Any]) -> Any:
  """`compute()`'s JSON-able result, read from `path` if an earlier call wrote it.

  Written atomically (temp file, then rename), so a killed run never leaves half a cache.
  """
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  value = compute()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f)
  os.replace(tmp, path)
  return value


DONE = "row_done.json"  # in a finished run's workdir: its final metrics and CPU minutes


@dataclasses.dataclass
class CpuLedger:
  """What `train_run` did in this process: the runs it was asked for (finished before or
  trained now, in call order) and the CPU minutes it spent training."""
  runs: list[str] = dataclasses.field(default_factory=list)
  trained_minutes: float = 0.0


LEDGER = CpuLedger()  # this process's; `reproduce.run_row` reads it around a row


def train_run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains `config` into `workdir` (resuming; a finished run is not retrained); returns it.

  Evaluation after training is the row's job (`eval_after_train` is switched off), so the
  row decides which grid to measure and caches it. The run's `DONE` file records its final
  metrics and `cpu_minutes`: this process's CPU time (all threads) over the call that finished
  it (a killed run's earlier calls are not counted). A finished run made with other
  computation fields (`loop.check_resume`: say, a row's sizes changed since) is refused,
  not silently measured as the new config's.
  """
  LEDGER.runs.append(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_after_train = False
  done = os.path.join(workdir, DONE)
  if os.path.exists(done):
    with open(done) as f:
      loop.check_resume(config, workdir, json.load(f).get("step", 0))
    return workdir
  start = time.process_time()
  result = loop.train(config, workdir)
  record = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
  record["cpu_minutes"] = (time.process_time() - start) / 60
  LEDGER.trained_minutes += record["cpu_minutes"]
  with open(done, "w") as f:
    json.dump(record, f)
  return workdir


def training_cpu(workdirs: Sequence[str]) -> tuple[float, int, int]:
  """(CPU minutes, runs, runs without a recorded CPU time) of the finished training runs in
  `workdirs` (each counted once; their `DONE` files, wherever they were trained)."""
  minutes, runs, unrecorded = 0.0, 0, 0
  for workdir in dict.fromkeys(workdirs):
    path = os.path.join(workdir, DONE)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      value = json.load(f).get("cpu_minutes")
    runs += 1
    if value is None:
      unrecorded += 1
    else:
      minutes += value
  return minutes, runs, unrecorded


def at_end_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One log line, held-out evaluation and checkpoint, at the last step (quick rows: each
  checkpoint and evaluation costs more than a smoke step)."""
  config.update(log_every=config.num_steps, eval_every=config.num_steps,
                checkpoint_every=config.num_steps)
  return config


def check_records(row: Row, records: Sequence[dict[str, Any]]) -> None:
  """Every record has exactly the row's columns and every number in it is finite."""
  if not records:
    raise ValueError(f"row {row.number} ({row.name}) produced no records.")
  for r in records:
    if tuple(r) != tuple(row.columns):
      raise ValueError(f"row {row.number} ({row.name}): record columns {tuple(r)} != "
                       f"{row.columns}.")
    bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)
           and not (k in row.unmeasured and math.isnan(v))]
    if bad:
      raise ValueError(f"row {row.number} ({row.name}): non-finite {bad} in {r}.")
