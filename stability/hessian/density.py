"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .lanczos import _lanczos
from .operator import HessianOperator
from .settings import _check_int

# Auto broadening of the density: this fraction of the Ritz-value range.
_AUTO_SIGMA_FRACTION = 1e-2
# The density grid extends this many sigma past the extreme Ritz values, so the
# Gaussian tails beyond the grid hold < 1e-6 of the mass.
_GRID_PAD_SIGMAS = 5.0


@dataclass
class SpectralDensity:
    """An SLQ estimate of the eigenvalue density, Gaussian-broadened, on a grid."""

    grid: Tensor  # [grid] eigenvalue axis, float64
    density: Tensor  # [grid], integrates to 1 over the grid (trapezoid)
    ritz_values: Tensor  # [vectors, steps] Lanczos Ritz values per starting vector
    weights: Tensor  # [vectors, steps] squared first components of the Ritz vectors (each row sums to 1)
    sigma: float  # Gaussian broadening (standard deviation) used

    def integral(self) -> float:
        """Trapezoid integral of the density over the grid (1 up to discretization)."""
        return float(torch.trapezoid(self.density, self.grid))


def spectral_density(
    op: HessianOperator,
    *,
    vectors: int = 1,
    steps: int = 100,
    grid: int = 500,
    sigma: float = 0.0,
    seed: int = 0,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: Gaussian-broadened Ritz values weighted by squared first Ritz-vector components, averaged over Rademacher starts."""
    _check_int("hessian.density_vectors", vectors, low=1)
    _check_int("hessian.density_steps", steps, low=1)
    _check_int("hessian.density_grid", grid, low=2)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ConfigError(f"hessian.density_sigma must be >= 0 (0 = auto), got {sigma!r}")
    if op.dim == 0:
        raise ConfigError("hessian: the model has no surviving trainable parameters")
    gen = torch.Generator().manual_seed(int(seed))
    ritz, weights = [], []
    for _ in range(vectors):
        # No early stop: quadrature wants the whole Krylov space of `steps`.
        T, _, _ = _lanczos(op, steps, start=op._rademacher(gen), gen=gen)
        theta, S = torch.linalg.eigh(T)
        ritz.append(theta)
        weights.append(S[0] ** 2)
    ritz_t = torch.stack(ritz)
    w_t = torch.stack(weights)
    lo, hi = float(ritz_t.min()), float(ritz_t.max())
    if sigma == 0.0:
        span = hi - lo
        sigma = _AUTO_SIGMA_FRACTION * (span if span > 0 else max(abs(hi), 1.0))
    pad = _GRID_PAD_SIGMAS * sigma
    axis = torch.linspace(lo - pad, hi + pad, grid, dtype=torch.float64)
    spacing = float(axis[1] - axis[0])
    if spacing > sigma:
        # Sampling a Gaussian coarser than its width loses the trapezoid's accuracy.
        warnings.warn(
            f"hessian.density_grid={grid} spaces points {spacing:.3g} apart, wider than "
            f"hessian.density_sigma={sigma:.3g}; the density is under-resolved (raise the grid or sigma)",
            stacklevel=2,
        )
    z = (axis[None, None, :] - ritz_t[:, :, None]) / sigma
    gauss = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    dens = (w_t[:, :, None] * gauss).sum(dim=1).mean(dim=0)
    return SpectralDensity(grid=axis, density=dens, ritz_values=ritz_t, weights=w_t, sigma=sigma)
