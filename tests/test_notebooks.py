"""Every notebook in notebooks/ runs top to bottom (deselect with -m "not notebooks").

The notebooks run in their quick mode here (`LONGCTX_QUICK=1`: fewer lengths or training
steps, the same code and plots); run by hand, they show the full sizes.
"""

from __future__ import annotations

import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:  # committed notebooks carry no outputs
    assert not cell.get("outputs"), f"{path.name}: strip outputs before committing"
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("LONGCTX_QUICK", "1")
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()


def test_notebooks_exist():
  assert NOTEBOOKS, "notebooks/ has no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_opens_with_a_title_and_what_it_shows(path):
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    first = json.load(f)["cells"][0]
  lines = "".join(first["source"]).strip().splitlines()
  assert first["cell_type"] == "markdown" and lines[0].startswith("# "), path.name
  assert len(lines) >= 3, f"{path.name}: a title and at least two lines on what it shows"
