"""The notebooks execute top to bottom on CPU and are committed with outputs cleared."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def test_both_notebooks_exist():
    assert [path.name for path in NOTEBOOKS] == ["01_quickstart.ipynb", "02_compare.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_runs_again(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Top to bottom, twice in the same folder ("Restart & Run All"): each execution trains into its own run folders."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(2):
        notebook = nbformat.read(path, as_version=4)
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
                  if output.output_type == "error"]
        assert not errors
    executions = [folder for folder in (tmp_path / "notebook_runs" / path.stem).iterdir() if folder.name != "data"]
    assert len(executions) == 2
