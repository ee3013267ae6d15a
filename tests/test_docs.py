"""Every command and config path the docs name exists: README, the folder READMEs, docstrings,
`--help` texts (flag help lives in the modules) and notebooks.

Greps `python -m experiments.X[.Y]` (the module must exist) and `experiments/...py` /
`experiments/configs/NAME.py` paths (the file must exist) in every .md, .py and .ipynb file of
the repository, so a move that forgets a reference fails here.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULE = re.compile(r"python3? (?:-u )?-m (experiments(?:\.\w+)+)")
PLACEHOLDER = re.compile(r"\b[A-Z]+\b")  # `experiments/configs/NAME.py`: a pattern, not a path
PATH = re.compile(r"(?<![\w/.])((?:experiments|attention|models|notebooks|tests)/[\w/]+\.(?:py|md|ipynb))")


def _documents():
  for suffix in ("*.md", "*.py", "*.ipynb"):
    for path in sorted(ROOT.rglob(suffix)):
      if not any(part.startswith(".") for part in path.relative_to(ROOT).parts):
        yield path


def test_commands_and_paths_named_in_the_docs_exist():
  missing = []
  for doc in _documents():
    text = doc.read_text()
    for module in set(MODULE.findall(text)):
      if not PLACEHOLDER.search(module) and not (ROOT / module.replace(".", "/")).with_suffix(
          ".py").exists():
        missing.append(f"{doc.relative_to(ROOT)}: python -m {module}")
    for path in set(PATH.findall(text)):
      if not (ROOT / path).exists() and not PLACEHOLDER.search(path):
        missing.append(f"{doc.relative_to(ROOT)}: {path}")
  assert not missing, "named in the docs but missing:\n" + "\n".join(sorted(missing))


def test_the_docs_name_commands():  # the test above would pass vacuously if the regex broke
  readme = (ROOT / "README.md").read_text()
  assert "python -m experiments.train" in readme and MODULE.search(readme)
  assert PATH.search(readme)
