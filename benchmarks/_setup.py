"""What every benchmark does before anything else: import it first (``import _setup``).

Thread settings that must be in place before torch is imported (one OpenBLAS thread, so torch's own
threads are the only ones: with 2 cores, oversubscription halves speed), the suite on the path when it
is not installed, the lines that say which machine and threads a benchmark ran with, the matmul rate they
compare against (a user's own training loop is ``stability.testing.reference.train_plain``).
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

try:
    import stability  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine_lines() -> list[str]:
    """torch, python, CPU and cores; torch's threads now and the BLAS/OpenMP settings."""
    import torch

    return [(f"torch {torch.__version__}  python {platform.python_version()}  "
             f"cpu: {platform.processor() or platform.machine()}  cores: {os.cpu_count()}"),
            (f"torch.get_num_threads() = {torch.get_num_threads()}  OPENBLAS_NUM_THREADS = "
             f"{os.environ['OPENBLAS_NUM_THREADS']}  OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS')}")]


def matmul_rate(size: int = 2048, repeats: int = 7, dtype=None) -> float:
    """Best ``torch.mm`` rate (FLOP/s) for size x size matrices of ``dtype`` (default float32)."""
    import time

    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best
