"""Test-suite setup: jaxtyping annotations of `attention` are checked at run time (beartype).

The import hook must be installed before `attention` is imported, so a wrong shape or dtype at
a function's boundary fails a test instead of being decoration. The checks run when a function
is called (under jit: once per trace), so they cost little.

Tests that feed malformed inputs on purpose, to see the functions' own `ValueError`s (they
contain `pytest.raises(ValueError`), run with the checks off: the checker would reject the
input first, with a `TypeError`, and the message under test would never be reached.

Compiled executables are shared through JAX's persistent compilation cache in a temporary
directory made for the session (by the controller under pytest-xdist, so both workers and every
subprocess a test starts use it, through the `JAX_*` environment variables): the same
computation, built again from a new Python function (a new train step per run, per test),
compiles once. Only compilation is shared; every test still traces and runs its own code.

The suite compiles fast (tests/fast_compile.py: XLA:CPU at -O0 with its classic fusion
emitters; the same HLO, fusion and buffer assignment, so the compiled memory and FLOP figures
the tests check are those users get). `JAX_DISABLE_MOST_OPTIMIZATIONS=0` tests the optimised
build. Benchmarks and experiments never set either switch.
"""

import importlib.util
import inspect
import os
import shutil
import tempfile

import pytest
from jaxtyping import config as jaxtyping_config
from jaxtyping import install_import_hook

from tests import fast_compile

_HOOK = install_import_hook(["attention"], "beartype.beartype")

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_CACHE_KEY = pytest.StashKey[str]()  # the directory this process made (and removes)
_CACHE_SETTINGS = {  # jax config name -> value; the environment variable is its upper case
    # Not the eager ops' executables (writing those cost more CPU than recompiling them).
    "jax_persistent_cache_min_compile_time_secs": 0.5,
    "jax_persistent_cache_min_entry_size_bytes": -1,
    "jax_compilation_cache_max_size": 2**34,  # a size limit makes JAX lock the directory
}                                             # (filelock), so two workers never race


def pytest_configure(config):
  """Owns the session's compilation cache directory, unless one is already set (a worker
  inherits its controller's; a user's own `JAX_COMPILATION_CACHE_DIR` is respected)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_disable_most_optimizations", fast_compile.configure())
  if importlib.util.find_spec("filelock") is None:  # the [test] extra has it; without the lock,
    return                                          # two workers could read a half-written entry
  if _CACHE_ENV not in os.environ:
    config.stash[_CACHE_KEY] = tempfile.mkdtemp(prefix="longctx_jax_cache_")
    os.environ[_CACHE_ENV] = config.stash[_CACHE_KEY]
    os.environ.update({name.upper(): str(v) for name, v in _CACHE_SETTINGS.items()})
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  for name, default in _CACHE_SETTINGS.items():
    jax.config.update(name, type(default)(os.environ.get(name.upper(), default)))


def pytest_unconfigure(config):
  path = config.stash.get(_CACHE_KEY, None)
  if path is not None:
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run first (in collection order otherwise): under pytest-xdist
  (`--dist=worksteal`, setup.cfg: an idle worker steals the end of the other's queue) the run
  then ends on short tests, so neither worker idles while the other finishes a long one."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _validation_tests_see_value_errors(request):
  fn = getattr(request, "function", None)
  expects_value_error = fn is not None and "pytest.raises(ValueError" in inspect.getsource(fn)
  if expects_value_error:
    jaxtyping_config.update("jaxtyping_disable", True)
  yield
  if expects_value_error:
    jaxtyping_config.update("jaxtyping_disable", False)
