"""Loss-landscape planes around any networks, over any data: through three networks, along two filter-normalized
random directions around one, or along the top two PCA directions of a trajectory.

Every grid point is θ(u, v) = Σ_k c_k(u, v)·θ_k over three bases θ_k (``maths.directions``), evaluated with
``paths.evaluate_combinations``: all points of a batch stacked, and, where the input layer is a Linear or a wide
convolution, its output formed from the three bases' outputs (three products per batch, however many grid points).

>>> p = stability.lmc.plane(net_a, net_b, net_c, test_loader)                   # the plane through three networks
>>> p = stability.lmc.plane(net, data=test_loader, directions="random", seed=0)  # Li et al. 2018 around one
>>> p = stability.lmc.plane(final, data=test_loader, directions="pca", trajectory=checkpoints)
>>> p.networks, p.at_networks, p.dataframe(), p.plot(metric="loss")
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import StackedModel
from ..errors import ConfigError
from ..maths.directions import (
    PlaneBasis,
    bounding_range,
    direction_basis,
    filter_normalized_direction,
    grid_axis,
    pca_directions,
    plane_basis,
)
from ..maths.health import DEFAULT_CHANCE_MARGIN, is_untrained
from ..maths.paths import Batches, LossFn, chance_of, evaluate_combinations, input_layer
from .networks import Network, device_of, private, resolve, same_architecture

PLANE_BN = ("interpolate", "reset")
DIRECTIONS = ("random", "pca")
State = dict[str, Tensor]


@dataclass
class Plane:
    """Error and loss on a grid of a plane in weight space.

    ``u``, ``v``: the grid's coordinates (along e₁ and e₂); ``error[j][i]`` and ``loss[j][i]`` at (u[i], v[j])
    (error: fraction misclassified, NaN when the targets are not class labels). ``networks``: each network's exact
    coordinates; ``at_networks``: its (error, loss) evaluated there. ``kind``: networks | random | pca |
    directions. ``trajectory``: a PCA plane's projected trajectory. ``untrained``: a network's error is within the
    chance margin of the data's chance error.
    """

    u: list[float]
    v: list[float]
    error: list[list[float]]
    loss: list[list[float]]
    networks: dict[str, tuple[float, float]]
    at_networks: dict[str, tuple[float, float]]
    kind: str = "networks"
    trajectory: list[tuple[float, float]] = field(default_factory=list)
    chance: float | None = None
    margin: float = DEFAULT_CHANCE_MARGIN
    bn: str = "interpolate"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def untrained(self) -> bool:
        if self.chance is None:
            return False
        return any(is_untrained(e, self.chance, self.margin) for e, _ in self.at_networks.values())

    def dataframe(self):
        """Columns u, v, error, loss: one row per grid point (pandas)."""
        import pandas as pd

        return pd.DataFrame([{"u": u, "v": v, "error": self.error[j][i], "loss": self.loss[j][i]}
                             for j, v in enumerate(self.v) for i, u in enumerate(self.u)])

    def plot(self, ax=None, metric: str = "loss", line: bool = True, levels: int = 20, **kwargs: Any):
        """A filled contour of ``metric`` (loss: log-spaced levels; error: in percent) with the networks marked,
        the straight line between the first two drawn (``line``) and the trajectory of a PCA plane; returns the
        axes (a new figure's when ``ax`` is None)."""
        import numpy as np
        from matplotlib.colors import LogNorm

        if metric not in ("error", "loss"):
            raise ConfigError(f"metric: must be error or loss, got {metric!r}")
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(4.5, 3.6))
        z = np.asarray(self.loss if metric == "loss" else self.error, dtype=float) * (100 if metric == "error" else 1)
        if metric == "loss" and np.nanmin(z) > 0:
            edges = np.geomspace(np.nanmin(z), np.nanmax(z) * (1 + 1e-9), levels)
            filled = ax.contourf(self.u, self.v, z, levels=edges, norm=LogNorm(), **kwargs)
        else:
            filled = ax.contourf(self.u, self.v, z, levels=levels, **kwargs)
        ax.figure.colorbar(filled, ax=ax, label="loss" if metric == "loss" else "error (%)")
        points = list(self.networks.items())
        if line and len(points) >= 2:
            (_, p), (_, q) = points[:2]
            ax.plot([p[0], q[0]], [p[1], q[1]], color="white", linestyle="--", linewidth=1)
        if self.trajectory:
            ax.plot(*zip(*self.trajectory), color="white", marker=".", linewidth=1)
        for name, (pu, pv) in points:
            ax.plot(pu, pv, marker="o", color="black", markerfacecolor="white")
            ax.annotate(name, (pu, pv), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("u")
        ax.set_ylabel("v")
        return ax


@dataclass
class PlaneGeometry:
    """A plane before it is evaluated: its three bases, the map from (u, v) to coefficients over them, the
    networks' coordinates, the grid, and (PCA) the projected trajectory."""

    kind: str
    bases: list[State]
    basis: PlaneBasis
    networks: dict[str, tuple[float, float]]
    u: list[float]
    v: list[float]
    trajectory: list[tuple[float, float]] = field(default_factory=list)
    explained: tuple[float, float] | None = None

    def rows(self, rows: Sequence[int]) -> tuple[list[float], list[float]]:
        """The grid points of the rows ``rows`` (indices into ``v``), row by row: (u's, v's)."""
        us = [u for _ in rows for u in self.u]
        vs = [self.v[j] for j in rows for _ in self.u]
        return us, vs


def grid_counts(grid: int | Sequence[int]) -> tuple[int, int]:
    """(points along u, points along v) from ``grid`` = n or (nu, nv); ConfigError below 2 per axis."""
    counts = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if len(counts) != 2 or any(isinstance(c, bool) or not isinstance(c, int) or c < 2 for c in counts):
        raise ConfigError(f"grid: need at least 2 points per axis (an integer or a pair (nu, nv)), got {grid!r}")
    return counts  # type: ignore[return-value]


def _range(given: Any, default: tuple[float, float], what: str) -> tuple[float, float]:
    if given is None:
        return default
    try:
        lo, hi = (float(x) for x in given)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected (low, high), got {given!r}") from None
    return lo, hi


def plane_geometry(states: Sequence[State], param_names: Sequence[str], *, directions: Any = None,
                   trajectory: Sequence[State] | None = None, grid: int | Sequence[int] = 21, margin: float = 0.2,
                   ranges: Any = None, seed: int = 0, ignore: str | None = "biasbn",
                   labels: Sequence[str] | None = None) -> PlaneGeometry:
    """The plane of ``plane`` over checked tensor dicts. ``directions``: None (``states``: three networks),
    ``random`` or ``pca`` (``states``: the centre), ``given`` (``states``: the centre, then two directions).
    ``param_names``: the tensors whose geometry counts (the model's parameters). ``ranges``: ((u_min, u_max), (v_min, v_max)); default the networks' (or the
    trajectory's) bounding box widened by ``margin`` of its span on each side, or [-1, 1]² around one network."""
    nu, nv = grid_counts(grid)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
        raise ConfigError(f"margin: must be a number >= 0 (a fraction of the span on each side), got {margin!r}")
    ranges = (None, None) if ranges is None else ranges
    if not isinstance(ranges, (tuple, list)) or len(ranges) != 2:
        raise ConfigError(f"ranges: expected ((u_min, u_max), (v_min, v_max)), got {ranges!r}")
    traj: list[tuple[float, float]] = []
    explained = None
    if directions is None:
        kind = "networks"
        basis = plane_basis(states[0], states[1], states[2], param_names)
        bases = [dict(s) for s in states[:3]]
        names = list(labels or ("a", "b", "c"))
        spread = basis.points
    elif directions == "random":
        kind, centre = "random", states[0]
        g = torch.Generator().manual_seed(int(seed))
        d1 = filter_normalized_direction(centre, g, param_names, ignore)
        d2 = filter_normalized_direction(centre, g, param_names, ignore)
        bases, basis, names, spread = [dict(centre), d1, d2], direction_basis(), list(labels or ("a",)), None
    elif directions == "pca":
        kind, centre = "pca", states[0]
        if not trajectory:
            raise ConfigError("trajectory: directions='pca' needs the trajectory (a list of networks ending at the "
                              "centre, e.g. a run's saved checkpoints)")
        pca = pca_directions(trajectory, centre, param_names)
        bases, basis, names = [dict(centre), *pca.directions], direction_basis(), list(labels or ("a",))
        traj, explained = pca.points, pca.explained
        spread = [(0.0, 0.0), *traj]
    else:
        kind = "directions"
        bases, basis, names, spread = [dict(s) for s in states[:3]], direction_basis(), list(labels or ("a",)), None
    networks = {n: p for n, p in zip(names, basis.points)}
    if spread is None:
        u_default = v_default = (-1.0, 1.0)
    else:
        u_default = bounding_range([p[0] for p in spread], float(margin))
        v_default = bounding_range([p[1] for p in spread], float(margin))
    u = grid_axis(*_range(ranges[0], u_default, "ranges (u)"), nu, "grid (u)")
    v = grid_axis(*_range(ranges[1], v_default, "ranges (v)"), nv, "grid (v)")
    return PlaneGeometry(kind, bases, basis, networks, u, v, traj, explained)


# Forming the input layer's output from the bases' costs K multiply-adds per output element (and the memory traffic
# of K outputs) where computing it costs its fan-in: worth it for a Linear on the input (784 for MNIST), not for a
# first convolution over few channels (fan-in 9: Conv-4 on MNIST runs ~30% slower with it).
FAN_IN_PER_BASE = 16


def forms_input_layer(sm: StackedModel, batches: Any, bases: int) -> bool:
    """Whether the input layer's output is worth forming from the bases' (its fan-in >= FAN_IN_PER_BASE x bases)."""
    device = next(iter(sm.model.parameters())).device
    for x, _ in batches:
        layer = input_layer(sm.model, x[:2].to(device))
        if layer is None:
            return False
        weight = sm.model.get_submodule(layer.name).weight
        return weight[0].numel() >= FAN_IN_PER_BASE * bases
    return False


def evaluate_points(sm: StackedModel, geometry: PlaneGeometry, u: Sequence[float], v: Sequence[float],
                    batches: Any, *, bn: str = "interpolate", bn_batches: Any = None, bn_limit: int | None = None,
                    loss_fn: LossFn | None = None, max_members: int = 64, tally: list[Tensor] | None = None,
                    input_layer_outputs: bool | None = None) -> tuple[list[float], list[float]]:
    """(losses, errors) at the plane's points (u_m, v_m), every point stacked, in one pass over ``batches``.
    ``input_layer_outputs``: form the input layer's output from the bases' (None: when ``forms_input_layer``)."""
    batches = batches if isinstance(batches, (Batches, list)) else Batches(batches)
    if input_layer_outputs is None:
        input_layer_outputs = forms_input_layer(sm, batches, len(geometry.bases))
    coeffs = geometry.basis.coefficients(list(u), list(v))
    return evaluate_combinations(sm, geometry.bases, coeffs, batches, bn=bn, bn_batches=bn_batches,
                                 bn_limit=bn_limit, loss_fn=loss_fn, max_members=max_members, tally=tally,
                                 input_layer_outputs=input_layer_outputs)


def check_plane_bn(bn: str) -> str:
    if bn not in PLANE_BN:
        raise ConfigError(f"bn: unknown option {bn!r}; choose one of {', '.join(PLANE_BN)}")
    return bn


def _resolve_all(networks: Sequence[tuple[Network, str]], model: nn.Module | None) -> tuple[nn.Module, list[State]]:
    """The template and every network's tensors, all checked against the first's architecture."""
    (first, what), rest = networks[0], networks[1:]
    template, state = resolve(first, model, what)
    states = [state]
    for net, name in rest:
        _, s = resolve(net, model if model is not None else (None if isinstance(net, nn.Module) else template), name)
        same_architecture(state, s, name)
        states.append(s)
    return template, states


def plane(model_a: Network, model_b: Network | None = None, model_c: Network | None = None, data: Any = None, *,
          directions: Any = None, trajectory: Sequence[Network] | None = None, grid: int | Sequence[int] = 21,
          margin: float = 0.2, ranges: Any = None, bn: str = "interpolate", bn_data: Any = None,
          bn_batches: int | None = None, seed: int = 0, ignore: str | None = "biasbn", loss_fn: LossFn | None = None,
          device: str | torch.device | None = None, model: nn.Module | None = None, batch_size: int = 1000,
          max_members: int = 64, chance_margin: float = DEFAULT_CHANCE_MARGIN,
          names: Sequence[str] | None = None, input_layer_outputs: bool | None = None) -> Plane:
    """The error and loss on a ``grid`` (n, or (nu, nv)) of a plane in weight space, on ``data``.

    - three networks (``directions=None``): the plane through a, b and c, orthonormal coordinates by
      Gram-Schmidt of b − a and c − a (a at (0, 0), b on the u axis), over the parameters;
    - ``directions="random"``: around ``model_a`` along two filter-normalized Gaussian directions drawn from
      ``seed`` (Li et al. 2018; ``ignore="biasbn"`` zeroes their biases and BatchNorm parameters, None keeps the
      network's); grid over [-1, 1]² unless ``ranges`` says otherwise;
    - ``directions="pca"``: around ``model_a`` (the trajectory's end) along the top two PCA directions of the
      offsets of ``trajectory`` (networks, e.g. checkpoints, ending at ``model_a``), projected on the plane;
    - ``directions=(d1, d2)``: θ(u, v) = θ_a + u·d₁ + v·d₂ for two given direction state dicts or modules.

    The grid spans the networks' (or the trajectory's) bounding box widened by ``margin`` of its span on each side,
    or ``ranges`` = ((u_min, u_max), (v_min, v_max)). ``bn``: ``interpolate`` (BatchNorm running statistics
    combined with the parameters' coefficients) or ``reset`` (recomputed at every grid point on ``bn_data``,
    default ``data``, its first ``bn_batches`` batches). Networks: modules, or state dicts / checkpoint files with
    ``model=``. Grid points are evaluated ``max_members`` at a time on each batch; the input layer's output at every
    point is formed from the three bases' outputs when that is cheaper (``input_layer_outputs``: None = decide by
    its fan-in, ``forms_input_layer``; True/False to force).
    """
    if data is None:
        raise ConfigError("data: give the data to evaluate the plane on (a DataLoader, batches or (x, y))")
    check_plane_bn(bn)
    grid_counts(grid)
    if directions is None:
        if model_b is None or model_c is None:
            raise ConfigError("model_b, model_c: a plane through networks needs three of them; or pass "
                              "directions='random' or 'pca' to draw a plane around model_a")
        given = [(model_a, "model_a"), (model_b, "model_b"), (model_c, "model_c")]
    else:
        if model_b is not None or model_c is not None:
            raise ConfigError(f"directions: a plane along directions is drawn around model_a alone; model_b and "
                              f"model_c must not be given (directions={directions!r})")
        given = [(model_a, "model_a")]
        if isinstance(directions, str):
            if directions not in DIRECTIONS:
                raise ConfigError(f"directions: unknown {directions!r}; choose None (three networks), "
                                  f"{', '.join(DIRECTIONS)}, or a pair of direction state dicts")
        elif isinstance(directions, (tuple, list)) and len(directions) == 2:
            given += [(directions[0], "directions[0]"), (directions[1], "directions[1]")]
        else:
            raise ConfigError("directions: expected None, 'random', 'pca' or a pair (d1, d2) of direction state "
                              f"dicts, got {type(directions).__name__}")
    if directions == "pca":
        if not trajectory:
            raise ConfigError("trajectory: directions='pca' needs the trajectory (a list of networks)")
        given += [(t, f"trajectory[{i}]") for i, t in enumerate(trajectory)]
    elif trajectory is not None:
        raise ConfigError("trajectory: only with directions='pca'")
    template, states = _resolve_all(given, model)
    dev = device_of(template, device)
    states = [{k: v.to(dev) for k, v in s.items()} for s in states]
    sm = StackedModel(private(template, dev))
    mode = directions if directions is None or isinstance(directions, str) else "given"
    geometry = plane_geometry(states[:1] if mode == "pca" else states, sm.param_names, directions=mode,
                              trajectory=states[1:] if mode == "pca" else None, grid=grid, margin=margin,
                              ranges=ranges, seed=seed, ignore=ignore, labels=names)
    batches = Batches(data, batch_size)
    bn_source = batches if bn_data is None else Batches(bn_data, batch_size, "bn_data")
    us, vs = geometry.rows(range(len(geometry.v)))
    at = list(geometry.networks.values())
    tally: list[Tensor] = []
    losses, errors = evaluate_points(sm, geometry, [*us, *(p[0] for p in at)], [*vs, *(p[1] for p in at)], batches,
                                     bn=bn, bn_batches=bn_source, bn_limit=bn_batches, loss_fn=loss_fn,
                                     max_members=max_members, tally=tally, input_layer_outputs=input_layer_outputs)
    n, nu = len(us), len(geometry.u)
    at_networks = {name: (errors[n + i], losses[n + i]) for i, name in enumerate(geometry.networks)}
    return Plane(geometry.u, geometry.v, [errors[j:j + nu] for j in range(0, n, nu)],
                 [losses[j:j + nu] for j in range(0, n, nu)], geometry.networks, at_networks, geometry.kind,
                 geometry.trajectory, chance_of(tally), chance_margin, bn,
                 {"explained": geometry.explained, "examples": sum(int(t.sum()) for t in tally) or None})


__all__ = ["DIRECTIONS", "FAN_IN_PER_BASE", "PLANE_BN", "Plane", "PlaneGeometry", "check_plane_bn", "evaluate_points",
           "forms_input_layer", "grid_counts", "plane", "plane_geometry"]
