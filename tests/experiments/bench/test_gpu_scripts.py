"""The GPU check scripts: CPU smoke runs (interpret mode) on a simulated bare JAX image, rows
written as they come, the budget, the GPU guard.

Each smoke run is one subprocess under `tests.experiments.bench.bare_jax` (imports beyond JAX, numpy,
absl, jaxtyping fail the run) with a budget far too small for its plan, so the run is cut
short (the plans hold minutes of rows, even on a quiet machine) and the tables must still
hold the measured rows plus "skipped (budget)" rows. The budget (25 s) leaves a quiet machine
time for the correctness case and a few timed rows; a machine too loaded to time any row in
it gets one more run with a longer budget.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys
import time

import pytest

from experiments.bench import gpu_run

REPO = str(pathlib.Path(__file__).resolve().parents[3])  # the repository root
BUDGETS_S = (25, 45)  # the second only if the first was too loaded to check and time a row


def _smoke(script: str, out_dir, *flags: str):
  """Runs the script with the first budget of BUDGETS_S in which the correctness case ran and
  at least one row was timed; returns `(result, seconds, budget_s)` of that run."""
  env = dict(os.environ, PYTHONPATH=REPO)
  # No compilation cache (tests/conftest.py): writing it imports tensorflow, which bare_jax blocks.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  for budget_s in BUDGETS_S:
    cmd = [sys.executable, "-u", "-m", "tests.experiments.bench.bare_jax",
           f"experiments.bench.{script}",
           "--allow_cpu", "--interpret", f"--budget_s={budget_s}", "--margin_s=5",
           f"--out={out_dir}", *flags]
    start = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                            cwd=REPO, env=env)
    seconds = time.time() - start
    checked = [r["status"] for r in _rows(out_dir, f"{script}_correctness", missing_ok=True)]
    if result.returncode != 0 or (checked[:1] != ["skipped (budget)"]
                                  and "ok" in _statuses(out_dir, script)):
      break
  return result, seconds, budget_s


def _statuses(out_dir, script):
  return [row["status"] for row in _rows(out_dir, f"{script}_speed", missing_ok=True)]


def _rows(out_dir, name, missing_ok=False):
  path = os.path.join(out_dir, f"{name}.csv")
  if missing_ok and not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _check_cut_run(result, seconds, budget_s, out_dir, script):
  out = result.stdout
  assert result.returncode == 0, result.stderr[-3000:] + out[-3000:]
  assert "ModuleNotFoundError" not in result.stderr and "bare_jax" not in result.stderr
  assert "correctness: ALL PASS" in out, out
  checks = _rows(out_dir, f"{script}_correctness")
  assert checks[0]["status"] == "PASS", checks
  statuses = _statuses(out_dir, script)
  assert "ok" in statuses and "skipped (budget)" in statuses, statuses  # cut short, rows kept
  assert not any(s.startswith("ERROR") for s in statuses), statuses
  # Rows were printed in the order measured: every "ok" row precedes the skipped ones.
  assert statuses.index("skipped (budget)") > max(i for i, s in enumerate(statuses) if s == "ok")
  assert os.path.exists(os.path.join(out_dir, f"{script}_speed.md"))
  # Nothing starts after budget - margin (the skipped rows above); the last measurement may run
  # over by its own length, and a loaded 2-core CI machine stretches it: a loose bound.
  assert seconds < budget_s + 60, seconds


@pytest.mark.slow
def test_gpu_check_smoke_cut_by_budget(tmp_path):
  result, seconds, budget_s = _smoke("gpu_check", tmp_path, "--check_len=32", "--check_cases=1",
                                     "--lengths=32,64,128,256", "--head_dims=16,32",
                                     "--window=16", "--tokens=256", "--width=32",
                                     "--decode_lengths=64", "--decode_batches=1")
  _check_cut_run(result, seconds, budget_s, tmp_path, "gpu_check")
  assert "16K d128 causal fwd" in result.stdout  # the acceptance table came last
  # The decode rows (between correctness and speed): the split-K kernel ran or was cut.
  decode = {r["impl"]: r["status"] for r in _rows(tmp_path, "gpu_check_decode")}
  assert decode["cudnn"] == "n/a (no GPU)", decode
  assert {decode[k] for k in ("read K+V (jnp.sum)", "pallas (split-K)", "xla (decode path)")} <= {
      "ok", "skipped (budget)"}, decode


@pytest.mark.slow
def test_dsa_gpu_check_smoke_cut_by_budget(tmp_path):
  result, seconds, budget_s = _smoke("dsa_gpu_check", tmp_path, "--check_len=32",
                                     "--check_cases=1", "--lengths=64,128,256,512",
                                     "--top_k=16", "--heads=2")
  _check_cut_run(result, seconds, budget_s, tmp_path, "dsa_gpu_check")
  assert "lax.top_k select" in result.stdout
  assert "DSA decode step (FP8 keys)" in result.stdout  # a decode row, measured or cut


def test_table_rows_reach_disk_as_they_come(tmp_path, capsys):
  table = gpu_run.Table(str(tmp_path), "t", ["name", "ms"], [-6, 8], "title")
  assert _rows(tmp_path, "t") == []  # header written before any row
  table.add(name="a", ms=1.5)
  assert _rows(tmp_path, "t") == [{"name": "a", "ms": "1.5"}]  # on disk before the next row
  assert "| a | 1.5 |" in (tmp_path / "t.md").read_text()
  table.add(name="b", ms="skipped (budget)")
  assert [r["ms"] for r in _rows(tmp_path, "t")] == ["1.5", "skipped (budget)"]
  printed = capsys.readouterr().out.splitlines()
  assert printed[-2].split() == ["a", "1.5"] and printed[-1].split()[0] == "b"


def test_budget_share():
  budget = gpu_run.Budget(time.time() - 50, budget_s=120, margin_s=20)  # 50 s of 100 usable
  assert budget.allows() and budget.allows(0.6) and not budget.allows(0.4)
  assert 49 < 100 - budget.left() < 52


def test_require_gpu_exits_on_cpu():
  with pytest.raises(SystemExit) as exit_info:
    gpu_run.require_gpu(allow_cpu=False)
  assert exit_info.value.code == 2
  gpu_run.require_gpu(allow_cpu=True)  # the smoke-test override


def test_scripts_import_only_jax_numpy_absl_jaxtyping():
  """Both scripts, kernels included, import under the bare-JAX import blocker, in one process:
  importing them defines no flag (`define_flags()` runs only under `__main__`). The smoke runs
  above cover what the scripts import lazily while running."""
  modules = ("experiments.bench.gpu_check", "experiments.bench.dsa_gpu_check",
             "attention.kernels.flash_pallas", "attention.kernels.sparse_pallas",
             "attention.kernels.decode_pallas", "attention.kernels.sparse_decode_pallas")
  code = ("import importlib, sys; from tests.experiments.bench import bare_jax; b = bare_jax.install(); "
          f"[importlib.import_module(m) for m in {modules!r}]; print('blocked:', b.blocked); "
          "from absl import flags; print('flags defined:', 'budget_s' in flags.FLAGS)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "blocked: []" in result.stdout, result.stdout
  assert "flags defined: False" in result.stdout, result.stdout
