"""What a Hessian probe computes: ``HessianSettings``, its validation, and ``hessian_settings`` from a TOML table."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import settings_from_table
from ..errors import ConfigError
from .sharpness import check_sharpness

ENGINES = ("native", "pyhessian")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class HessianSettings:
    """What a Hessian probe computes, on which data, and how."""

    samples: int = 1000  # size of the fixed, seeded subset of training examples (all if fewer exist)
    sample_seed: int = 0  # seeds the choice of that subset
    top_k: int = 1  # number of largest eigenvalues; 0 = none
    smallest: bool = False  # also the smallest (most negative) eigenvalue, lambda_min
    trace_probes: int = 0  # Hutchinson Rademacher probes for the trace; 0 = no trace
    density: bool = False  # spectral density by stochastic Lanczos quadrature (native engine only)
    density_vectors: int = 1  # SLQ random (Rademacher) starting vectors, averaged
    density_steps: int = 100  # Lanczos steps per SLQ vector (capped at the dimension)
    # Gaussian broadening (standard deviation, in eigenvalue units) of each Ritz value;
    # 0 = auto: 1e-2 x (largest - smallest Ritz value over all vectors)
    density_sigma: float = 0.0
    density_grid: int = 500  # points of the grid the density is evaluated on
    # Lanczos: most steps (HVPs) for the eigenvalues; 0 = auto: min(dim, max(200, 2*top_k + 20)).
    # With engine = pyhessian: power-iteration iterations per eigenvalue (0 = 1000).
    lanczos_steps: int = 0
    # relative tolerance on the requested eigenvalues (Lanczos: estimated error of each
    # Ritz value; pyhessian: change between iterations); 0 = always run lanczos_steps
    tol: float = 1e-6
    dtype: str = "float32"  # float32 | float64 (model and data are cast on a private copy)
    seed: int = 0  # seeds Lanczos start vectors and Hutchinson / SLQ probes
    batch_size: int = 0  # chunk the subset into batches of this size to bound memory; 0 = all at once
    engine: str = "native"  # native | pyhessian
    # worst-case sharpness on the same subset (hessian.sharpness): the radius rho; 0 = not measured
    sharpness_rho: float = 0.0
    sharpness_adaptive: bool = True  # adaptive (delta = |theta| * eps, ||eps|| <= rho) or plain (||delta|| <= rho)
    sharpness_steps: int = 10  # projected gradient ascent steps (each one pass over the subset)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> HessianSettings:
        """Check every value (run on construction, as for every stage's settings); returns self."""
        _check_int("hessian.samples", self.samples, low=1)
        _check_int("hessian.top_k", self.top_k, low=0)
        _check_int("hessian.trace_probes", self.trace_probes, low=0)
        _check_int("hessian.density_vectors", self.density_vectors, low=1)
        _check_int("hessian.density_steps", self.density_steps, low=1)
        _check_int("hessian.density_grid", self.density_grid, low=2)
        _check_int("hessian.lanczos_steps", self.lanczos_steps, low=0)
        _check_int("hessian.batch_size", self.batch_size, low=0)
        if not (self.density_sigma >= 0 and math.isfinite(self.density_sigma)):
            raise ConfigError(f"hessian.density_sigma must be >= 0 (0 = auto), got {self.density_sigma!r}")
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ConfigError(f"hessian.tol must be >= 0 (0 = run all steps), got {self.tol!r}")
        resolve_dtype(self.dtype)
        _check_engine(self.engine)
        check_sharpness(self.sharpness_rho, self.sharpness_steps, "hessian.sharpness_rho", "hessian.sharpness_steps")
        if not isinstance(self.sharpness_adaptive, bool):
            raise ConfigError(f"hessian.sharpness_adaptive must be true or false, got {self.sharpness_adaptive!r}")
        if not self.sharpness_rho:
            # refused rather than ignored: a setting that changes nothing would still rename the run
            for name in ("sharpness_adaptive", "sharpness_steps"):
                if getattr(self, name) != HessianSettings.__dataclass_fields__[name].default:
                    raise ConfigError(f"hessian.{name} applies only with hessian.sharpness_rho > 0 (the radius of "
                                      "the sharpness; 0 = not measured)")
        if not (self.top_k or self.smallest or self.trace_probes or self.density or self.sharpness_rho):
            raise ConfigError(
                "hessian: nothing to compute; set hessian.top_k >= 1, hessian.smallest, "
                "hessian.trace_probes >= 1, hessian.density or hessian.sharpness_rho > 0"
            )
        if self.engine == "pyhessian" and (self.smallest or self.density):
            name = "hessian.smallest" if self.smallest else "hessian.density"
            raise ConfigError(
                f"{name} is available only with hessian.engine='native' "
                "(pyhessian has no smallest eigenvalue, and its density() needs the removed torch.eig)"
            )
        return self


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"hessian.engine must be one of {' | '.join(ENGINES)}, got {engine!r}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or the torch dtypes) as a torch dtype; anything else is a ConfigError."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"hessian.dtype must be one of {' | '.join(DTYPES)}, got {dtype!r}")


def hessian_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> HessianSettings:
    """HessianSettings from a TOML ``[hessian]`` table plus keyword overrides (None = not given)."""
    return settings_from_table(HessianSettings, "hessian", table, **overrides)
