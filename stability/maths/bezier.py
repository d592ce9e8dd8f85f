"""Curves between two networks through a third point: the coefficients of θ(t) over the bases [θ_a, θ_m, θ_b].

Garipov et al. (2018) join two networks θ_a and θ_b by a curve of low loss with one trained point θ_m:

- ``bezier`` (quadratic Bezier): θ(t) = (1 − t)²·θ_a + 2t(1 − t)·θ_m + t²·θ_b;
- ``polychain`` (polygonal chain with one bend): θ(t) = (1 − 2t)·θ_a + 2t·θ_m for t < ½,
  (2 − 2t)·θ_m + (2t − 1)·θ_b for t ≥ ½.

Both pass through θ_a at t = 0 and θ_b at t = 1. With θ_m the midpoint ½(θ_a + θ_b), the Bezier curve is the
straight line (1 − t)·θ_a + t·θ_b and the chain is the line too. The coefficients feed
``maths.paths.evaluate_combinations`` (every t of a grid at once) and, one t at a time, the fitting step.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

CURVE_KINDS = ("bezier", "polychain")


def check_kind(kind: str, setting: str = "kind") -> str:
    """``kind`` if it is a known curve, else ConfigError naming ``setting``."""
    if kind not in CURVE_KINDS:
        raise ConfigError(f"{setting}: unknown curve {kind!r}; choose one of {', '.join(CURVE_KINDS)}")
    return kind


def curve_coefficients(kind: str, t: float | Sequence[float] | Tensor) -> Tensor:
    """``[M, 3]`` (float64): row m holds the coefficients of θ_a, θ_m, θ_b at t_m; each row sums to 1."""
    check_kind(kind)
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if kind == "bezier":
        return torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], dim=1)
    first = t < 0.5
    zero = torch.zeros_like(t)
    return torch.stack([torch.where(first, 1 - 2 * t, zero), torch.where(first, 2 * t, 2 - 2 * t),
                        torch.where(first, zero, 2 * t - 1)], dim=1)


def line_coefficients(t: float | Sequence[float] | Tensor) -> Tensor:
    """``[M, 3]``: the straight line (1 − t)·θ_a + t·θ_b over the same bases (θ_m's coefficient 0)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    return torch.stack([1 - t, torch.zeros_like(t), t], dim=1)


def t_grid(points: int, setting: str = "points") -> list[float]:
    """``points`` evenly spaced values of t in [0, 1], both ends included."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"{setting}: need at least 2 points along the curve (both ends t = 0 and 1), got {points!r}")
    return torch.linspace(0, 1, points, dtype=torch.float64).tolist()


def midpoint(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """½(θ_a + θ_b) for float tensors; the others (BatchNorm's ``num_batches_tracked``) are θ_a's."""
    return {k: (0.5 * (v + b[k])).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in a.items()}


def point_on_curve(coefficients: Sequence[float], a: Mapping[str, Tensor], m: Mapping[str, Tensor],
                   b: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """θ(t) = c_a·θ_a + c_m·θ_m + c_b·θ_b for the float tensors ``names`` (differentiable in θ_m: the fitting
    step's gradient reaches the middle point scaled by c_m); the others are θ_a's, copied."""
    ca, cm, cb = (float(c) for c in coefficients)
    out = {}
    for k in names:
        if not a[k].is_floating_point():
            out[k] = a[k].clone()
            continue
        out[k] = ca * a[k] + cm * m[k] + cb * b[k]
    return out


__all__ = ["CURVE_KINDS", "check_kind", "curve_coefficients", "line_coefficients", "midpoint", "point_on_curve",
           "t_grid"]
