"""Test-suite setup: jaxtyping annotations are checked at run time (beartype).

The import hook must be installed before `attention` is imported, so a wrong shape
or dtype at a public function's boundary fails a test instead of being decoration. The checks
run at trace time (once per compilation), so they cost little.
"""

from jaxtyping import install_import_hook

_HOOK = install_import_hook(["attention"], "beartype.beartype")
