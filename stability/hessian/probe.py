"""One Hessian probe: every quantity the settings request, by either engine.

Two engines compute the same quantities:

- ``native``: Hessian-vector products (HVPs) by double backward over a gradient
  graph built once (or forward-over-reverse ``torch.func.jvp(grad(f))`` per
  chunk when the data are chunked), Lanczos with full reorthogonalization for
  extreme eigenvalues, Hutchinson for the trace and stochastic Lanczos
  quadrature (SLQ) for the density.
- ``pyhessian``: the PyPI ``pyhessian`` 0.1 package (power iteration with
  deflation, Hutchinson), the published reference the native engine is checked
  against. Its ``density()`` calls the removed ``torch.eig``, so the density is
  native only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .density import SpectralDensity, spectral_density
from .lanczos import lanczos_eigenpairs
from .operator import HessianOperator, select_subset
from .pyhessian_adapter import _pyhessian_trace_samples, pyhessian_top_eigenvalues
from .settings import HessianSettings, resolve_dtype
from .sharpness import Sharpness, worst_case_sharpness
from .trace import hutchinson_trace


@dataclass
class ProbeResult:
    """Everything one Hessian probe measured."""

    eigenvalues: list[float]  # top-k, descending
    lambda_min: float | None  # smallest eigenvalue, if requested
    trace: float | None  # Hutchinson mean, if requested
    trace_stderr: float | None  # its standard error (NaN with one probe)
    density: SpectralDensity | None
    n_hvp: int  # Hessian-vector products used (over the whole subset)
    seconds: float  # wall time of the probe
    engine: str
    converged: bool = True  # the eigenvalues met hessian.tol before the step limit (pyhessian: not reported, True)
    dim: int = 0  # surviving parameters the Hessian acts on
    samples: int = 0  # examples the loss was averaged over
    settings: HessianSettings = field(default_factory=HessianSettings)
    sharpness: Sharpness | None = None  # worst-case sharpness, when hessian.sharpness_rho > 0

    def row(self) -> dict[str, float | int | None]:
        """A flat record for a table: lambda_1..lambda_k, lambda_min, trace, trace_stderr, n_hvp, seconds (and
        sharpness, sharpness_delta, sharpness_loss when measured)."""
        out: dict[str, float | int | None] = {f"lambda_{i + 1}": v for i, v in enumerate(self.eigenvalues)}
        out["lambda_min"] = self.lambda_min
        out["trace"] = self.trace
        out["trace_stderr"] = self.trace_stderr
        out["n_hvp"] = self.n_hvp
        out["seconds"] = self.seconds
        if self.sharpness is not None:
            out.update(self.sharpness.row())
        return out


def probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: HessianSettings,
    masks: dict[str, Tensor] | None = None,
) -> ProbeResult:
    """Run every quantity ``settings`` requests on the seeded training subset drawn from (x, y) (the worst-case
    sharpness too, on the same subset, when ``settings.sharpness_rho`` > 0)."""
    start = time.perf_counter()
    xs, ys = select_subset(x, y, settings.samples, settings.sample_seed)
    dtype = resolve_dtype(settings.dtype)
    if settings.engine == "pyhessian":
        result = _probe_pyhessian(model, xs, ys, settings, masks, dtype, start)
    else:
        op = HessianOperator(model, xs, ys, masks=masks, dtype=dtype, batch_size=settings.batch_size)
        result = measure(op, settings, start)
    if settings.sharpness_rho > 0:
        size = settings.batch_size or len(xs)
        chunks = [(xs[i:i + size], ys[i:i + size]) for i in range(0, len(xs), size)]
        result.sharpness = worst_case_sharpness(model, chunks, settings.sharpness_rho,
                                                adaptive=settings.sharpness_adaptive, steps=settings.sharpness_steps,
                                                seed=settings.seed, dtype=dtype)
        result.seconds = time.perf_counter() - start
    return result


def measure(op: HessianOperator, settings: HessianSettings, start: float | None = None) -> ProbeResult:
    """Every quantity ``settings`` requests, by the native engine, of the Hessian ``op`` stands for (the data are
    the operator's: ``settings.samples`` and ``sample_seed`` are not read here)."""
    start = time.perf_counter() if start is None else start
    eigenvalues: list[float] = []
    lambda_min = None
    converged = True
    if settings.top_k or settings.smallest:
        res = lanczos_eigenpairs(
            op,
            settings.top_k,
            smallest=settings.smallest,
            max_steps=settings.lanczos_steps or None,
            tol=settings.tol,
            seed=settings.seed,
        )
        eigenvalues = [float(v) for v in res.eigenvalues]
        lambda_min = res.smallest
        converged = res.converged
    trace = stderr = None
    if settings.trace_probes:
        trace, stderr = hutchinson_trace(op, settings.trace_probes, seed=settings.seed)
    density = None
    if settings.density:
        density = spectral_density(
            op,
            vectors=settings.density_vectors,
            steps=settings.density_steps,
            grid=settings.density_grid,
            sigma=settings.density_sigma,
            seed=settings.seed,
        )
    return ProbeResult(
        eigenvalues=eigenvalues,
        lambda_min=lambda_min,
        trace=trace,
        trace_stderr=stderr,
        density=density,
        n_hvp=op.n_hvp,
        seconds=time.perf_counter() - start,
        engine="native",
        converged=converged,
        dim=op.dim,
        samples=op.n_examples,
        settings=settings,
    )


def _probe_pyhessian(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: HessianSettings,
    masks: dict[str, Tensor] | None,
    dtype: torch.dtype,
    start: float,
) -> ProbeResult:
    eigenvalues: list[float] = []
    n_hvp = 0
    if settings.top_k:
        eigenvalues, n_hvp = pyhessian_top_eigenvalues(
            model, x, y, settings.top_k, tol=settings.tol, max_iter=settings.lanczos_steps or 1000,
            masks=masks, seed=settings.seed, dtype=dtype, batch_size=settings.batch_size,
        )
    trace = stderr = None
    if settings.trace_probes:
        # tol = 0 so pyhessian uses exactly trace_probes probes, like the native engine.
        samples = _pyhessian_trace_samples(
            model, x, y, max_iter=settings.trace_probes, tol=0.0, masks=masks, seed=settings.seed,
            dtype=dtype, batch_size=settings.batch_size,
        )
        n_hvp += len(samples)
        t = torch.tensor(samples, dtype=torch.float64)
        trace = float(t.mean())
        stderr = float(t.std(correction=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.nan
    dim = HessianOperator(model, x[:1], y[:1], masks=masks, dtype=dtype, fuse_bn=False).dim
    return ProbeResult(
        eigenvalues=eigenvalues,
        lambda_min=None,
        trace=trace,
        trace_stderr=stderr,
        density=None,
        n_hvp=n_hvp,
        seconds=time.perf_counter() - start,
        engine="pyhessian",
        converged=True,
        dim=dim,
        samples=int(x.shape[0]),
        settings=settings,
    )
