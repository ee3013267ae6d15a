"""Test-suite setup: jaxtyping annotations of `attention` are checked at run time (beartype).

The import hook must be installed before `attention` is imported, so a wrong shape or dtype at
a function's boundary fails a test instead of being decoration. The checks run when a function
is called (under jit: once per trace), so they cost little.

Tests that feed malformed inputs on purpose, to see the functions' own `ValueError`s (they
contain `pytest.raises(ValueError`), run with the checks off: the checker would reject the
input first, with a `TypeError`, and the message under test would never be reached.
"""

import inspect

import pytest
from jaxtyping import config as jaxtyping_config
from jaxtyping import install_import_hook

_HOOK = install_import_hook(["attention"], "beartype.beartype")


@pytest.fixture(autouse=True)
def _validation_tests_see_value_errors(request):
  fn = getattr(request, "function", None)
  expects_value_error = fn is not None and "pytest.raises(ValueError" in inspect.getsource(fn)
  if expects_value_error:
    jaxtyping_config.update("jaxtyping_disable", True)
  yield
  if expects_value_error:
    jaxtyping_config.update("jaxtyping_disable", False)
