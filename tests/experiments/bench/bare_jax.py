"""Runs a module as `__main__` on a simulated bare JAX image: imports beyond JAX are blocked.

    python -m tests.experiments.bench.bare_jax experiments.bench.gpu_check --allow_cpu --interpret ...

The GPU image has python3, jax (CUDA), numpy, absl and jaxtyping, but e.g. no ml_collections,
so the GPU scripts may import nothing else. Allowed top-level modules: the standard library,
`attention` and `experiments` (this repository), jax, jaxlib, numpy, absl, jaxtyping, the
packages these four declare as requirements, and whatever importing them (Pallas Triton
included) loaded. Any other import raises ModuleNotFoundError naming the module, which a test
sees as a failed run. The blocker checks itself first (ml_collections must not import).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import runpy
import sys

ALLOWED_PACKAGES = ("jax", "jaxlib", "numpy", "absl-py", "jaxtyping")
ALLOWED_IMPORTS = {"jax", "jaxlib", "numpy", "absl", "jaxtyping", "attention", "experiments"}


def _requirements(distribution: str) -> set[str]:
  """Import names of a distribution's unconditional requirements (dashes -> underscores)."""
  try:
    requires = importlib.metadata.requires(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    return set()
  names = set()
  for req in requires:
    if ";" in req and "extra" in req.split(";", 1)[1]:
      continue
    names.add(re.split(r"[\s<>=!~\[;(]", req, 1)[0].replace("-", "_").lower())
  return names


class Blocker:
  """A meta-path finder refusing every top-level module outside `allowed`."""

  def __init__(self, allowed: set[str]):
    self.allowed = allowed
    self.blocked = []

  def find_spec(self, name, path=None, target=None):
    del path, target
    top = name.partition(".")[0]
    if top in self.allowed:
      return None  # let the normal finders look
    self.blocked.append(name)
    raise ModuleNotFoundError(f"bare_jax: {name!r} is not on the bare JAX image (allowed: "
                              f"stdlib, {sorted(ALLOWED_IMPORTS)} and their dependencies)",
                              name=name)


def install() -> Blocker:
  for module in ("jax", "jax.numpy", "numpy", "absl.app", "absl.flags", "absl.logging",
                 "jaxtyping", "jax.experimental.pallas", "jax.experimental.pallas.triton"):
    importlib.import_module(module)
  allowed = set(sys.stdlib_module_names) | ALLOWED_IMPORTS
  for distribution in ALLOWED_PACKAGES:
    allowed |= _requirements(distribution)
  allowed |= {name.partition(".")[0] for name in sys.modules}
  blocker = Blocker(allowed)
  sys.meta_path.insert(0, blocker)
  try:
    importlib.import_module("ml_collections")
  except ModuleNotFoundError:
    pass
  else:
    raise SystemExit("bare_jax: the import blocker is not active (ml_collections imported)")
  blocker.blocked.clear()
  return blocker


def main():
  module, sys.argv = sys.argv[1], sys.argv[1:]
  install()
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
