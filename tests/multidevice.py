"""Runs a test worker in a subprocess that sees N host CPU devices.

`XLA_FLAGS=--xla_force_host_platform_device_count=N` only takes effect before jax creates its
CPU backend, and pytest runs every test file in the same processes. So multi-device tests
call `run_worker("tests.attention.test_ring", "forward_cases", devices=8)`: a fresh
`python -m tests.multidevice` process sets the flag, imports the module, calls the function
and prints its JSON result, which the test then checks. The other tests keep one device (and
their compile times): nothing global changes.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from tests import fast_compile

_MARKER = "MULTIDEVICE_RESULT "
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(module: str, function: str, devices: int = 8, timeout: float = 600,
               optimised: bool = False) -> object:
  """`module.function()` in a subprocess with `devices` CPU devices; returns its JSON result.
  `optimised`: compiled as users run it, not in the suite's fast-compile mode
  (tests/fast_compile.py)."""
  env = fast_compile.optimised(dict(os.environ)) if optimised else dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  proc = subprocess.run([sys.executable, "-m", "tests.multidevice", module, function],
                        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_MARKER)]
  if proc.returncode or not lines:
    raise AssertionError(f"worker {module}.{function} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(lines[-1][len(_MARKER):])


def main(argv: list[str]) -> None:
  module, function = argv[1], argv[2]
  result = getattr(importlib.import_module(module), function)()
  print(_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv)
