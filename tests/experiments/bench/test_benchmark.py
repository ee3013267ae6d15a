"""experiments/bench: the attention table, CSV and plot on tiny sizes; pair counting, paired
ratios, the preset registry and the benchmark command's flags."""

import csv
import dataclasses
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import attention
from attention import Mask
from experiments import benchmark
from experiments.bench import attention_bench, memory_bench, presets, timing
from models import Transformer


def test_visible_pairs():
  assert attention.visible_pairs(Mask(), 8, 8) == 64
  assert attention.visible_pairs(Mask(causal=True), 8, 8) == 36
  assert attention.visible_pairs(Mask(causal=True, window=(2, 0)), 8, 8) == 3 * 8 - 3
  # DSA: at most top_k keys per query (the first top_k queries see fewer).
  assert attention.visible_pairs(Mask(causal=True), 8, 8, cap=3) == 1 + 2 + 3 * 6


def test_paired_ratio_measures_the_ratio():
  def sleeper(seconds):
    def fn():
      time.sleep(seconds)
      return np.zeros(())
    return fn
  ratio = timing.paired_ratio(sleeper(0.002), sleeper(0.02), (), (), rounds=3, calls=2)
  assert 5 < ratio < 12, ratio


@pytest.mark.slow
def test_benchmark_writes_table_csv_and_plot(tmp_path):
  cmd = [sys.executable, "-m", "experiments.benchmark", "--methods=jax,flash,local,dsa",
         "--lengths=128,1024", "--window=16", "--repeats=1", "--heads=2", "--head_dim=16",
         "--time_max_len=1024", "--time_bwd_max_len=128", f"--workdir={tmp_path}"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "benchmark.csv") as f:
    rows = list(csv.DictReader(f))
  assert {(r["method"], r["length"]) for r in rows} >= {("flash", "1024"), ("local", "1024"),
                                                        ("dsa", "1024"), ("jax", "128")}
  assert all(float(r["fwdbwd_temp_mib"]) > 0 for r in rows)
  assert (tmp_path / "benchmark.png").stat().st_size > 0
  assert "| method | mask | length |" in result.stdout
  assert "fwd+bwd temp memory" in result.stdout


def test_presets_registry_and_command_flags(monkeypatch):
  with pytest.raises(ValueError, match="unknown benchmark preset 'nope'; presets: .*acceptance"):
    presets.run("nope", {})
  # Every Settings field is a flag of the command, so a preset can set it.
  assert {f.name for f in dataclasses.fields(attention_bench.Settings)} <= set(
      benchmark.FLAG_NAMES)
  seen = {}
  monkeypatch.setattr(attention_bench, "run", lambda *args: seen.update(args=args))
  values = dict(methods=["flash"], lengths=["64"], causal=["true"], workdir="/tmp/x",
                window=7, **{f.name: getattr(attention_bench.Settings, f.name)
                             for f in dataclasses.fields(attention_bench.Settings)
                             if f.name != "window"})
  presets.run("acceptance", values, frozenset({"window"}))  # the user's --window stays
  methods, lengths, causal, settings, _ = seen["args"]
  assert methods == presets.ACCEPTANCE["methods"] and lengths[-1] == 131072
  assert causal == [False, True] and settings.window == 7


def test_memory_preset_lengths_and_the_1b_shape(monkeypatch):
  """The memory128k preset measures 8K-128K unless --lengths is given; `llama_1b` has
  Llama-3.2-1B's 1,235,814,400 parameters (abstract: nothing is allocated or compiled)."""
  seen = {}
  monkeypatch.setattr(memory_bench, "run", lambda lengths, workdir: seen.update(l=lengths))
  monkeypatch.setattr(memory_bench, "ask_for_host_devices", lambda count: None)  # keep devices
  presets.run("memory128k", dict(lengths=["64"], workdir="/tmp/x"))
  assert seen["l"] == [8192, 32768, 131072]
  presets.run("memory128k", dict(lengths=["64"], workdir="/tmp/x"), frozenset({"lengths"}))
  assert seen["l"] == [64]
  model = nnx.eval_shape(lambda: Transformer(memory_bench.llama_1b(), rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 1_235_814_400
