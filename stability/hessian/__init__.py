"""Hessian probe: top eigenvalues, trace and spectral density of the training loss.

Where each thing lives:

- ``settings``: ``HessianSettings`` (what a probe computes), ``hessian_settings``
  (from a TOML ``[hessian]`` table), ``resolve_dtype``.
- ``operator``: ``HessianOperator`` (H·v over a fixed data subset, eval mode,
  restricted to surviving coordinates), ``select_subset``, masks.
- ``fusion``: torch.fx conv/BatchNorm folding that makes eval-mode BatchNorm
  cheap to differentiate twice.
- ``lanczos``: Lanczos eigenpairs, ``top_eigenvalues``, ``smallest_eigenvalue``.
- ``density``: spectral density by stochastic Lanczos quadrature.
- ``trace``: ``hutchinson_trace``.
- ``probe``: ``probe`` and ``ProbeResult``, the native engine and the dispatch to pyhessian.
- ``pyhessian_adapter``: everything that talks to the ``pyhessian`` package.
"""
from __future__ import annotations

from .density import SpectralDensity, spectral_density
from .lanczos import LanczosResult, lanczos_eigenpairs, smallest_eigenvalue, top_eigenvalues
from .operator import HessianOperator, select_subset
from .probe import ProbeResult, measure, probe
from .pyhessian_adapter import pyhessian_top_eigenvalues, pyhessian_trace
from .settings import HessianSettings, hessian_settings, resolve_dtype
from .trace import hutchinson_trace

__all__ = [
    "HessianOperator",
    "HessianSettings",
    "LanczosResult",
    "ProbeResult",
    "SpectralDensity",
    "hessian_settings",
    "hutchinson_trace",
    "lanczos_eigenpairs",
    "measure",
    "probe",
    "pyhessian_top_eigenvalues",
    "pyhessian_trace",
    "resolve_dtype",
    "select_subset",
    "smallest_eigenvalue",
    "spectral_density",
    "top_eigenvalues",
]
