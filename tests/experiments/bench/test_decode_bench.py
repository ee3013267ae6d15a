"""The `decode` benchmark preset (`experiments/bench/decode_bench.py`): bytes per step, the paired
ratios from per-round times, a tiny end-to-end run, and the preset's flags."""

import csv

import numpy as np

from experiments.bench import decode_bench, presets


def test_step_bytes_are_the_cache_and_the_dsa_reads():
  shape = decode_bench.Shape()  # 8 heads x 64, indexer 4 x 32 (FP8, one scale per key), top-k 2048
  got = decode_bench.step_bytes(8, 131072, 1, shape)
  assert got["read"] == got["dense"] == 8 * 64 * 2**20  # 64 MiB of float32 K and V per row
  assert got["dsa"] == 8 * (131072 * (32 + 4) + 2 * 2048 * 64 * 4)
  assert decode_bench.step_bytes(1, 1024, 8, shape)["dsa"] == 1024 * 36 + 2 * 1024 * 8 * 64 * 4


def test_cells_take_ratios_within_rounds():
  """Round 2 runs everything 3x slower (a load spike): the per-round ratios do not see it."""
  shape = decode_bench.Shape()
  slow = np.array([1.0, 3.0, 1.0])
  times = {("read", 1): 0.002 * slow, ("dense", 1): 0.004 * slow, ("dsa", 1): 0.001 * slow,
           ("read", 8): 0.016 * slow, ("dense", 8): 0.016 * slow, ("dsa", 8): 0.004 * slow}
  b1, b8 = decode_bench.cells(times, 131072, 1, (1, 8), shape)
  assert (b1["dense_over_read"], b1["dense_over_dsa"]) == (2.0, 4.0)
  assert (b8["dense_over_read"], b8["dense_over_dsa"]) == (1.0, 4.0)
  assert b1["dense_tokens_x"] == 1.0 and b8["dense_tokens_x"] == 2.0  # 8 x 4 ms / 16 ms
  assert b8["read_tokens_x"] == 1.0 and b8["dsa_tokens_x"] == 2.0
  assert b1["dense_ms"] == 4.0 and np.isclose(b1["read_gbs"], 64 * 2**20 / 0.002 / 1e9)
  text = decode_bench.table([b1])
  assert text.count("\n") == 2 and "| 131072 | 1 | 1 | 64 |" in text


def test_tiny_run_writes_rows_and_csv(tmp_path):
  shape = decode_bench.Shape(heads=2, head_dim=8, index_heads=2, index_dim=8, top_k=8)
  lines = []
  rows = decode_bench.run([32], shape, batches=(1,), kv_heads=(2,), rounds=2, calls=1,
                          working_set=20_000, workdir=str(tmp_path), echo=lines.append)
  (row,) = rows
  assert row["cache_len"] == 32 and row["cache_mib"] == 2 * 32 * 2 * 8 * 4 / 2**20
  assert all(row[f"{n}_ms"] > 0 for n in decode_bench.STEPS)
  assert lines[0].startswith("load average") and lines[1].startswith(decode_bench.HEADER)
  with open(tmp_path / "decode.csv") as f:
    assert [int(r["kv_heads"]) for r in csv.DictReader(f)] == [2]


def test_preset_runs_the_issue_grid_unless_lengths_are_given(monkeypatch):
  seen = []
  monkeypatch.setattr(decode_bench, "run", lambda lengths, shape, **kw: seen.append(
      (lengths, shape.dtype, kw["rounds"])))
  values = dict(lengths=["64"], dtype="bfloat16", repeats=1, workdir="/tmp/x")
  presets.run("decode", values)
  presets.run("decode", values, frozenset({"lengths"}))
  assert seen == [([8192, 32768, 131072], "bfloat16", 3), ([64], "bfloat16", 3)]
