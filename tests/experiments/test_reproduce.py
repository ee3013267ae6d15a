"""experiments/reproduce.py: every row's --quick version runs and writes sane outputs."""

import csv
import json
import math
import subprocess
import sys

import pytest

from experiments.rows import runner
from experiments.rows import base


@pytest.mark.slow
@pytest.mark.parametrize("number", sorted(runner.ROWS))
def test_quick_runs_every_row(tmp_path, number):
  """Each row's --quick version (one test per row, so pytest-xdist spreads them)."""
  row = runner.ROWS[number]
  out = tmp_path / "results"
  runner.run_rows([row], str(tmp_path), str(out), quick=True, seeds=(0,))
  summary = (out / "summary_quick.md").read_text()
  with open(out / f"{row.name}.csv") as f:
    records = list(csv.DictReader(f))
  assert records, row.name
  assert tuple(records[0]) == row.columns, row.name
  for r in records:
    for key, value in r.items():
      try:
        number_ = float(value)
      except ValueError:
        continue  # a label column
      assert math.isfinite(number_) or key in row.unmeasured, (row.name, key, r)
  assert f"## Row {row.number}:" in summary and "CPU minutes (training" in summary
  assert (out / f"{row.name}.md").exists()


def test_training_cpu_sums_the_finished_runs_records(tmp_path):
  for name, record in [("a_s0", {"cpu_minutes": 1.5}), ("b_s0", {"cpu_minutes": 2.0}),
                       ("old_s0", {"step": 10}), ("other_s0", {"cpu_minutes": 9.0})]:
    (tmp_path / name).mkdir()
    (tmp_path / name / base.DONE).write_text(json.dumps(record))
  (tmp_path / "running_s0").mkdir()  # no DONE file: not finished, not counted
  used = [str(tmp_path / n) for n in ("a_s0", "b_s0", "a_s0", "old_s0", "running_s0")]
  assert base.training_cpu(used) == (3.5, 3, 1)  # a_s0 once; other_s0 was not used
  assert runner.add_minutes(str(tmp_path / "m.json"), "cpu_minutes", 1.0) == 1.0
  assert runner.add_minutes(str(tmp_path / "m.json"), "cpu_minutes", 0.5) == 1.5


def test_command_line_refuses_an_unknown_row(tmp_path):
  cmd = [sys.executable, "-m", "experiments.reproduce", "--rows=99", f"--workdir={tmp_path}"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert "unknown row '99'" in result.stderr


def test_parse_rows():
  assert [r.number for r in runner.parse_rows("all")] == sorted(runner.ROWS)
  assert runner.parse_rows("performance") == [runner.ROWS[6]]
  with pytest.raises(ValueError, match="unknown row '99'"):
    runner.parse_rows("6,99")


def test_cell_and_spread():
  assert base.cell([0.5, 1.0, 0.75]) == "0.75 (0.50-1.00)"
  assert base.cell([0.25]) == "0.25"
  with pytest.raises(ValueError):
    base.spread([])


def test_cached_computes_once(tmp_path):
  calls = []
  compute = lambda: calls.append(1) or {"a": 1.5}
  path = str(tmp_path / "c" / "x.json")
  assert base.cached(path, compute) == {"a": 1.5}
  assert base.cached(path, compute) == {"a": 1.5}
  assert len(calls) == 1


def test_check_records_refuses_bad_records():
  row = base.Row(number=9, name="t", title="t", columns=("a", "b"), run=lambda ctx: None)
  base.check_records(row, [{"a": 1, "b": 2.0}])
  with pytest.raises(ValueError, match="columns"):
    base.check_records(row, [{"a": 1}])
  with pytest.raises(ValueError, match="non-finite"):
    base.check_records(row, [{"a": 1, "b": float("nan")}])
  unmeasured = base.Row(number=9, name="t", title="t", columns=("a", "b"), run=row.run,
                        unmeasured=("b",))
  base.check_records(unmeasured, [{"a": 1, "b": float("nan")}])
  with pytest.raises(ValueError, match="non-finite"):
    base.check_records(unmeasured, [{"a": 1, "b": float("inf")}])


def test_train_run_refuses_a_finished_run_made_with_other_sizes(tmp_path):
  from experiments.configs import text  # pylint: disable=g-import-not-at-top
  from experiments.evaluation import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from experiments.training import loop  # pylint: disable=g-import-not-at-top
  config = text.get_config("smoke")
  config.eval_after_train = False
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  (tmp_path / base.DONE).write_text(json.dumps({"step": 2}))
  assert base.train_run(config, str(tmp_path)) == str(tmp_path)  # finished: not retrained
  config.task.seq_len *= 2
  with pytest.raises(loop.ConfigChangeError, match="task.seq_len"):
    base.train_run(config, str(tmp_path))
