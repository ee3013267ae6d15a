"""How the suite compiles fast: two switches of XLA's CPU backend, on unless a user says 0.

The suite's programs are tiny and compiled once each, so most of its CPU time is XLA
compiling, not running. With `JAX_DISABLE_MOST_OPTIMIZATIONS=1` (the default here; `0` tests
the build users run) the suite

1. sets JAX's own `jax_disable_most_optimizations` (XLA's LLVM backend at -O0, no expensive
   LLVM passes), and
2. adds `--xla_cpu_use_fusion_emitters=false` to `XLA_FLAGS`: XLA:CPU then generates each
   fusion's loops with its classic elemental IR emitter instead of the newer MLIR fusion
   emitters, which take about twice the CPU time to compile a small program
   (tests/attention/test_band.py: 45 s -> 25 s; the whole suite 16 min 38 s -> 9 min 57 s on
   2 cores). Only when the installed jaxlib knows the
   flag: XLA aborts on an unknown one, so a subprocess tries it first (once per session).

Neither changes the HLO passes, fusion decisions or buffer assignment, so the compiled memory
and FLOP figures the tests check are those users get; numerics follow the same HLO and every
comparison is within its dtype's tolerance either way. The one check of float32 summation
order (tests/experiments/training/test_sharding.py) runs in a worker with `optimised(env)`.
"""

from __future__ import annotations

import os
import subprocess
import sys

ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"  # jax's own flag, read from the environment
XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"
_REFUSED = "LONGCTX_TESTS_XLA_FLAG_REFUSED"  # set when this jaxlib rejected XLA_FLAG


def enabled(environ=os.environ) -> bool:
  return environ.get(ENV, "1").strip().lower() in ("1", "true", "yes", "on")


def xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA:CPU starts with `flag` in XLA_FLAGS (it aborts on unknown ones)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                         capture_output=True, timeout=300, check=False)
  return probe.returncode == 0


def configure(environ=os.environ) -> bool:
  """Sets both switches in `environ` (inherited by pytest-xdist workers, the subprocesses tests
  start and notebook kernels) unless the user chose `ENV=0` or set the XLA flag themselves;
  returns whether compiling is in the fast mode."""
  environ.setdefault(ENV, "1")
  flags = environ.get("XLA_FLAGS", "")
  if enabled(environ) and "xla_cpu_use_fusion_emitters" not in flags and (
      environ.get(_REFUSED) != "1"):
    if xla_accepts(XLA_FLAG):
      environ["XLA_FLAGS"] = f"{flags} {XLA_FLAG}".strip()
    else:
      environ[_REFUSED] = "1"  # the workers and subprocesses do not try again
  return enabled(environ)


def optimised(env: dict[str, str]) -> dict[str, str]:
  """`env` for a subprocess that compiles as users run (neither switch)."""
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != XLA_FLAG)
  return dict(env, **{ENV: "0", "XLA_FLAGS": flags})
