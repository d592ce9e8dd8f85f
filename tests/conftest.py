from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def results_root(tmp_path):
    """A fresh results root for one test."""
    root = tmp_path / "results"
    root.mkdir()
    return root
