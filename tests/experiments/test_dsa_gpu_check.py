"""experiments/dsa_gpu_check.py runs end to end on CPU in interpret mode (tiny sizes)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_dsa_gpu_check_smoke():
  cmd = [sys.executable, "-m", "experiments.dsa_gpu_check", "--interpret", "--lengths=128",
         "--top_k=16", "--check_len=32", "--heads=2"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "correctness: ALL PASS" in out, out
  assert "| 128 |" in out and "DSA fwd (top-k + sparse) vs causal flash" in out, out
  assert "ERROR" not in out, out
