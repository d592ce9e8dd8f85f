"""Planes in weight space: their bases and directions, as pure functions on tensor dicts.

A plane is θ(u, v) = Σ_k (m_k0 + m_k1·u + m_k2·v)·θ_k over K base tensor dicts θ_k (networks, or directions), the
[K, 3] matrix m mapping a grid point (1, u, v) to one coefficient per base (``PlaneBasis``), so that
``paths.evaluate_combinations`` evaluates every grid point with the bases' own input-layer outputs.

- ``plane_basis(a, b, c)``: the plane through three networks, orthonormal coordinates by Gram-Schmidt of b − a and
  c − a (as dnn-mode-connectivity's ``plane.py``): a at (0, 0), b at (|b − a|, 0), c at (⟨c − a, e₁⟩, |r|) with r the
  part of c − a orthogonal to e₁. The geometry (inner products, norms) is over the tensors ``names`` (the callers
  pass the model's parameters); every other float tensor (BatchNorm running statistics) is combined with the same
  coefficients, which sum to 1 at every grid point: the buffers are interpolated as the parameters (``bn =
  interpolate``) or recomputed afterwards (``bn = reset``).
- ``filter_normalized_direction``: a Gaussian direction around one network with every filter (the output rows of
  a Linear or convolution weight) rescaled to the norm of the network's filter (Li et al. 2018); 1-D tensors
  (biases, BatchNorm weights) zeroed (``ignore = "biasbn"``) or set to the network's own values (``ignore =
  None``, as Li et al.'s ``normalize_directions_for_weights``); buffers zero. Bases [θ, d₁, d₂], identity matrix.
- ``pca_directions``: the top two principal directions of a trajectory's offsets from its last point (Li et al.'s
  ``setup_PCA_directions``: the offsets centred as scikit-learn's PCA does), and each point's projection on them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError

State = Mapping[str, Tensor]
IGNORE_OPTIONS = ("biasbn", None)
_EPS = 1e-10  # Li et al.'s guard against a zero filter of the direction


@dataclass(frozen=True)
class PlaneBasis:
    """θ(u, v) = Σ_k (matrix[k, 0] + matrix[k, 1]·u + matrix[k, 2]·v)·bases[k]; ``points``: the bases' own plane
    coordinates where they are networks (the three networks of ``plane_basis``; the centre of a direction plane)."""

    matrix: Tensor  # [K, 3] float64
    points: tuple[tuple[float, float], ...]

    def coefficients(self, u: Tensor | Sequence[float], v: Tensor | Sequence[float]) -> Tensor:
        """``[M, K]`` coefficients over the bases of the points (u_m, v_m)."""
        u = torch.as_tensor(u, dtype=torch.float64)
        v = torch.as_tensor(v, dtype=torch.float64)
        rows = torch.stack([torch.ones_like(u), u, v], 1)
        return rows @ self.matrix.to(torch.float64).T

    def vector(self, bases: Sequence[State], column: int, names: Sequence[str]) -> dict[str, Tensor]:
        """The plane's axis ``column`` (1: e₁, 2: e₂; 0: the origin) as a tensor dict over ``names``, in float64."""
        return {k: sum(float(self.matrix[i, column]) * b[k].double() for i, b in enumerate(bases)) for k in names}


def float_names(state: State) -> list[str]:
    """The floating-point tensors of a state dict (every parameter, and the BatchNorm running statistics)."""
    return [k for k, v in state.items() if v.is_floating_point()]


def dot(x: State, y: State, names: Sequence[str]) -> float:
    """⟨x, y⟩ over the tensors ``names`` flattened, in float64."""
    return float(sum((x[k].double() * y[k].double()).sum() for k in names))


def plane_basis(a: State, b: State, c: State, names: Sequence[str] | None = None) -> PlaneBasis:
    """The orthonormal plane through networks a, b, c (Gram-Schmidt of b − a, then c − a), over bases [a, b, c].

    ``names``: the tensors whose inner product defines the geometry (default every float tensor; the callers pass
    the model's parameters). ConfigError when the three networks lie on one line.
    """
    names = float_names(a) if names is None else list(names)
    db = {k: b[k].double() - a[k].double() for k in names}
    dc = {k: c[k].double() - a[k].double() for k in names}
    n1 = dot(db, db, names) ** 0.5
    if n1 == 0.0:
        raise ConfigError("plane: networks a and b are identical; three distinct networks span a plane")
    proj = dot(dc, db, names) / n1
    n2 = max(dot(dc, dc, names) - proj * proj, 0.0) ** 0.5
    scale = max(dot(dc, dc, names) ** 0.5, n1)
    if n2 <= 1e-5 * scale:  # float32 networks on one line leave a residual of rounding
        raise ConfigError("plane: the three networks lie on one line (c − a is parallel to b − a); they span no "
                          "plane")
    # e1 = (b − a)/n1; e2 = (c − a − proj·e1)/n2. θ = a + u·e1 + v·e2 = (1 − β − γ)·a + β·b + γ·c with
    # β = u/n1 − v·proj/(n1·n2) and γ = v/n2.
    matrix = torch.tensor([[1.0, -1.0 / n1, proj / (n1 * n2) - 1.0 / n2],
                           [0.0, 1.0 / n1, -proj / (n1 * n2)],
                           [0.0, 0.0, 1.0 / n2]], dtype=torch.float64)
    return PlaneBasis(matrix, ((0.0, 0.0), (n1, 0.0), (proj, n2)))


def direction_basis() -> PlaneBasis:
    """θ(u, v) = θ₀ + u·d₁ + v·d₂ over bases [θ₀, d₁, d₂]; θ₀ at (0, 0)."""
    return PlaneBasis(torch.eye(3, dtype=torch.float64), ((0.0, 0.0),))


def _check_ignore(ignore: str | None) -> None:
    if ignore not in IGNORE_OPTIONS:
        raise ConfigError(f"ignore: unknown option {ignore!r}; choose biasbn (zero biases and BatchNorm parameters "
                          "in the direction) or None (keep them)")


def filter_normalized_direction(state: State, generator: torch.Generator, names: Sequence[str] | None = None,
                                ignore: str | None = "biasbn") -> dict[str, Tensor]:
    """A random direction around ``state`` (Li et al. 2018), drawn from ``generator`` (a CPU generator: the same
    seed gives the same direction on every device).

    Over the tensors ``names`` (default every float tensor; pass the parameters): each tensor of two or more
    dimensions is Gaussian, each filter (slice along its first axis) rescaled to that filter's norm in ``state``;
    a tensor of one dimension (or none) is zero (``ignore = "biasbn"``) or the network's own values (``None``).
    Every other tensor (BatchNorm running statistics, counters) is zero.
    """
    _check_ignore(ignore)
    chosen = set(float_names(state) if names is None else names)
    out: dict[str, Tensor] = {}
    for k, w in state.items():
        if k not in chosen or not w.is_floating_point():
            out[k] = torch.zeros_like(w)
            continue
        if w.dim() <= 1:
            out[k] = torch.zeros_like(w) if ignore == "biasbn" else w.detach().clone()
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device, torch.float64)
        rows_d, rows_w = d.reshape(len(d), -1), w.detach().double().reshape(len(w), -1)
        scale = rows_w.norm(dim=1) / (rows_d.norm(dim=1) + _EPS)
        out[k] = (rows_d * scale[:, None]).reshape(w.shape).to(w.dtype)
    return out


@dataclass(frozen=True)
class TrajectoryPCA:
    """The top two principal directions of a trajectory around its centre, and the points' projections."""

    directions: tuple[dict[str, Tensor], dict[str, Tensor]]  # unit vectors over the chosen tensors; others zero
    points: list[tuple[float, float]]  # each trajectory point's (⟨θ_i − θ_c, d₁⟩, ⟨θ_i − θ_c, d₂⟩)
    explained: tuple[float, float]  # the fraction of the offsets' variance along each direction


def pca_directions(trajectory: Sequence[State], centre: State | None = None, names: Sequence[str] | None = None,
                   ignore: str | None = None) -> TrajectoryPCA:
    """PCA directions of the offsets θ_i − θ_c of a trajectory from its centre (default its last point).

    As Li et al.'s ``plot_trajectory``: the offsets over ``names`` (default every float tensor; pass the
    parameters), 1-D tensors zeroed with ``ignore = "biasbn"``; the offset matrix centred (scikit-learn's PCA);
    the directions are its top two right singular vectors, each signed so that its largest entry is positive; a
    point's coordinates are the plain projections of its offset (not centred). ConfigError with fewer than two
    independent offsets.
    """
    _check_ignore(ignore)
    if len(trajectory) < 3:
        raise ConfigError(f"trajectory: PCA directions need at least 3 points (two independent offsets from the "
                          f"centre), got {len(trajectory)}")
    centre = trajectory[-1] if centre is None else centre
    chosen = float_names(centre) if names is None else list(names)
    used = [k for k in chosen if not (ignore == "biasbn" and centre[k].dim() <= 1)]
    rows = torch.stack([torch.cat([(p[k].double() - centre[k].double()).reshape(-1) for k in used])
                        for p in trajectory])
    centred = rows - rows.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    if len(s) < 2 or s[1] <= 1e-12 * max(float(s[0]), 1e-30):
        raise ConfigError("trajectory: its offsets span fewer than two directions; PCA needs points that move in "
                          "two independent directions")
    total = float((s ** 2).sum())
    out = []
    for i in range(2):
        vec = vh[i]
        if vec[vec.abs().argmax()] < 0:
            vec = -vec
        d: dict[str, Tensor] = {}
        at = 0
        for k, w in centre.items():
            if k in used:
                n = w.numel()
                d[k] = vec[at:at + n].reshape(w.shape).to(w.dtype)
                at += n
            else:
                d[k] = torch.zeros_like(w)
        out.append((d, vec))
    coords = rows @ torch.stack([out[0][1], out[1][1]], 1)
    return TrajectoryPCA((out[0][0], out[1][0]), [(float(x), float(y)) for x, y in coords.tolist()],
                         (float(s[0] ** 2) / total, float(s[1] ** 2) / total))


def grid_axis(lo: float, hi: float, count: int, what: str) -> list[float]:
    """``count`` evenly spaced values from ``lo`` to ``hi`` (both included); ConfigError naming ``what``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ConfigError(f"{what}: need at least 2 grid points per axis, got {count!r}")
    if not lo < hi:
        raise ConfigError(f"{what}: the range must be increasing (low < high), got ({lo}, {hi})")
    return torch.linspace(float(lo), float(hi), count, dtype=torch.float64).tolist()


def bounding_range(values: Sequence[float], margin: float) -> tuple[float, float]:
    """[min − margin·span, max + margin·span] of ``values`` (span = max − min; 1 when all are equal)."""
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else 1.0
    return lo - margin * span, hi + margin * span


__all__ = ["IGNORE_OPTIONS", "PlaneBasis", "TrajectoryPCA", "bounding_range", "direction_basis", "dot",
           "filter_normalized_direction", "float_names", "grid_axis", "pca_directions", "plane_basis"]
