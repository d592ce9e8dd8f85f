"""The notebooks are committed with their figures (``make notebooks``) and still run top to bottom (small
settings: STABILITY_SMALL=1)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _refresh():
    """notebooks/refresh.py, the script `make notebooks` runs: one way to execute a notebook."""
    spec = importlib.util.spec_from_file_location("notebook_refresh", NOTEBOOK_DIR / "refresh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_five_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_instability.ipynb", "02_stabilized_lottery_tickets.ipynb",
                                           "03_hessian.ipynb", "04_your_own_model.ipynb",
                                           "05_your_own_training_loop.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_shows_its_figures_without_noise(path):
    nb = nbformat.read(path, as_version=4)
    refresh = _refresh()
    assert refresh.figures(nb) > 0, f"run `make notebooks`: {path.name} is committed without its figures"
    assert not refresh.errors(nb)
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code"), "every cell was run"
    text = path.read_text()
    assert str(NOTEBOOK_DIR.parent) not in text and "/tmp/" not in text, "absolute paths in outputs"
    assert all("execution" not in c.metadata for c in nb.cells), "cell timings"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    refresh = _refresh()
    nb = refresh.execute(path, tmp_path / "results", small=True, timeout=300)
    assert not refresh.errors(nb)
    assert refresh.figures(nb) > 0, "the notebook should draw its figures"
