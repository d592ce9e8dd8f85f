from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Ray (tests/test_grid.py) stays on loopback: Ray reads this when it is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def results_root(tmp_path):
    """A fresh results root for one test."""
    root = tmp_path / "results"
    root.mkdir()
    return root


@pytest.fixture
def one_torch_thread():
    """Tiny models: one torch thread is faster than two, much faster when the two cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def registries_as_they_were():
    """Models and datasets a test registers (a plugin, register_model) do not outlive it: later tests see the
    documented registries, and a plugin imported again registers again."""
    from stability import plugins
    from stability.data.sources import DATASETS
    from stability.models.build import MODELS

    saved = [(r, dict(r._entries)) for r in (MODELS, DATASETS)]
    loaded = set(plugins._loaded)
    yield
    for registry, entries in saved:
        registry._entries.clear()
        registry._entries.update(entries)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
