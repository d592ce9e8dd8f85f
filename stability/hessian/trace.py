"""Hutchinson estimate of the Hessian trace."""
from __future__ import annotations

import math

import torch

from .operator import HessianOperator
from .settings import _check_int


def hutchinson_trace(op: HessianOperator, probes: int, *, seed: int = 0) -> tuple[float, float]:
    """Hutchinson estimate of tr(H) with Rademacher probes: (mean, standard error; NaN for one probe)."""
    _check_int("hessian.trace_probes", probes, low=1)
    gen = torch.Generator().manual_seed(int(seed))
    samples = torch.empty(probes, dtype=torch.float64)
    for i in range(probes):
        v = op._rademacher(gen)
        samples[i] = float(torch.dot(v, op.matvec(v)))
    mean = float(samples.mean())
    stderr = float(samples.std(correction=1) / math.sqrt(probes)) if probes > 1 else math.nan
    return mean, stderr
