"""Layer-wise barriers (Adilova et al. 2024): interpolate one layer, or one block, at a time with the rest of the
network held at A, and cumulatively from the input (groups 1..i interpolated, the rest at A).

A *group* is a set of tensors interpolated together:

- ``layers``: every module that owns parameters itself (a Linear, a convolution, an embedding, ...), with a
  normalization layer that follows it (BatchNorm, LayerNorm, GroupNorm: the next tensor-owning module in the model's
  registration order) merged into it, so ``features.0`` holds a convolution and its BatchNorm;
- ``blocks``: the model's top-level children, a container child (``nn.Sequential``, ``nn.ModuleList``,
  ``nn.ModuleDict``) opened one level: the zoo ResNet gives ``conv`` (with ``bn``), ``blocks.0`` .. ``blocks.k``,
  ``fc``; torchvision's ResNet ``conv1`` (with ``bn1``), ``layer1.0`` ..., ``fc``; an MLP its layers. A
  normalization child merges into the group before it, as for ``layers``.

Tensors the model holds on its root module form a group ``<root>``. The barrier of a path is the suite's formula
on its own ends: max_α E(α) − ½·(E(0) + E(1)) (``maths.interpolation.error_barrier``), where the path of one
group ends at A with that group from B (``end_error``: that hybrid's error). The cumulative path through every
group is the plain line from A to B, so its barrier is ``lmc.barrier``'s. Where the hybrid is much worse than A
(independently trained networks, unaligned: a layer of B does not fit A's other layers) that formula is dominated by
the hybrid's error; ``chord_barrier`` = max_α E(α) − ((1 − α)·E(0) + α·E(1)), the height above the chord between the
path's ends (Entezari et al. 2022's barrier, the layer-wise barrier of Adilova et al.: 0 when the error is convex
along the layer), measures the bump alone. Every (group, α) member, single and cumulative, is evaluated in one stacked pass
over the data (members that coincide, such as every α = 0, are evaluated once); memory: the stacked members'
parameters, at most ``2·groups·alphas`` copies of the network.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import StackedModel
from ..errors import ConfigError
from ..maths.interpolation import error_barrier
from ..maths.paths import Batches, LossFn, chance_of, evaluate_stream, input_layer, reset_bn
from .curves import alpha_grid
from .networks import Network, device_of, private, resolve_pair

GROUPINGS = ("layers", "blocks")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
ROOT = "<root>"


def _own(module: nn.Module) -> list[str]:
    """The leaf names of the tensors a module holds itself (parameters, then buffers)."""
    return [n for n, p in module._parameters.items() if p is not None] + \
        [n for n, b in module._buffers.items() if b is not None]


def layer_groups(model: nn.Module, groups: str = "layers") -> list[tuple[str, list[str]]]:
    """``[(group name, [tensor names])]`` from the input side, every parameter and buffer in exactly one group
    (see the module's docstring for the two rules)."""
    if groups not in GROUPINGS:
        raise ConfigError(f"groups: unknown grouping {groups!r}; choose one of {', '.join(GROUPINGS)}")
    out: list[tuple[str, list[str]]] = []
    root = _own(model)
    if groups == "layers":
        units = [(name, m) for name, m in model.named_modules() if name and _own(m)]
    else:
        units = []
        for name, child in model.named_children():
            if isinstance(child, _CONTAINERS):
                units += [(f"{name}.{n}", c) for n, c in child.named_children()]
            else:
                units.append((name, child))
    for name, module in units:
        if groups == "layers":
            names = [f"{name}.{leaf}" for leaf in _own(module)]
        else:
            names = [f"{name}.{n}" for n, _ in (*module.named_parameters(), *module.named_buffers())]
        if not names:
            continue
        if isinstance(module, _NORMS) and out:
            out[-1][1].extend(names)
        else:
            out.append((name, names))
    if root:
        out.insert(0, (ROOT, root))
    return out


@dataclass
class LayerBarriers:
    """Error and loss along every group's path and every cumulative path, and their barriers.

    ``error[g]``/``loss[g]``: group g interpolated alone, along ``alphas``; ``cumulative_error[g]``: groups 0..g
    interpolated (the last is the plain line from A to B). ``parameters[g]``: the group's parameter count.
    """

    groups: list[str]
    tensors: list[list[str]] = field(repr=False)
    parameters: list[int]
    alphas: list[float]
    error: list[list[float]] = field(repr=False)
    loss: list[list[float]] = field(repr=False)
    cumulative_error: list[list[float]] = field(repr=False)
    cumulative_loss: list[list[float]] = field(repr=False)
    grouping: str = "layers"
    bn: str = "interpolate"
    chance: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def barriers(self) -> list[float]:
        return [error_barrier(e) for e in self.error]

    @property
    def loss_barriers(self) -> list[float]:
        return [error_barrier(v) for v in self.loss]

    @property
    def cumulative_barriers(self) -> list[float]:
        return [error_barrier(e) for e in self.cumulative_error]

    @property
    def cumulative_loss_barriers(self) -> list[float]:
        return [error_barrier(v) for v in self.cumulative_loss]

    @property
    def chord_barriers(self) -> list[float]:
        """max_α E(α) − ((1 − α)·E(0) + α·E(1)) of each group's own path."""
        return [chord_barrier(self.alphas, e) for e in self.error]

    @property
    def end_errors(self) -> list[float]:
        """The error with the whole group from B (the rest at A): each group's path at α = 1."""
        return [e[-1] for e in self.error]

    @property
    def barrier(self) -> float:
        """The plain barrier from A to B (the cumulative path through every group)."""
        return self.cumulative_barriers[-1]

    def rows(self, **label: Any) -> list[dict[str, Any]]:
        """One row per group (``label``, e.g. rewind_step, pair and split, first): group, position, parameters,
        barrier, loss_barrier, cumulative_barrier, cumulative_loss_barrier, chord_barrier, end_error."""
        columns = zip(self.groups, self.parameters, self.barriers, self.loss_barriers, self.cumulative_barriers,
                      self.cumulative_loss_barriers, self.chord_barriers, self.end_errors)
        return [{**label, "group": g, "position": i, "parameters": n, "barrier": b, "loss_barrier": lb,
                 "cumulative_barrier": cb, "cumulative_loss_barrier": clb, "chord_barrier": chord, "end_error": end}
                for i, (g, n, b, lb, cb, clb, chord, end) in enumerate(columns)]

    def dataframe(self):
        """The rows as a pandas DataFrame (one row per group)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def heatmap(self, ax=None, metric: str = "error", **kwargs: Any):
        """Barrier per group (x) for the single-group and cumulative paths (y), on ``ax``; returns the axes."""
        if metric not in ("error", "loss"):
            raise ConfigError(f"metric: must be error or loss, got {metric!r}")
        import numpy as np

        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(self.groups) + 2), 2.4))
        scale = 100.0 if metric == "error" else 1.0
        values = np.array([self.barriers if metric == "error" else self.loss_barriers,
                           self.cumulative_barriers if metric == "error" else self.cumulative_loss_barriers]) * scale
        image = ax.imshow(values, aspect="auto", cmap=kwargs.pop("cmap", "magma"), **kwargs)
        ax.set_xticks(range(len(self.groups)), self.groups, rotation=60, ha="right")
        ax.set_yticks([0, 1], ["alone", "cumulative"])
        ax.figure.colorbar(image, ax=ax, label="error barrier (%)" if metric == "error" else "loss barrier")
        return ax


def chord_barrier(alphas: Sequence[float], values: Sequence[float]) -> float:
    """max_α v(α) − ((1 − α)·v(0) + α·v(1)) along a grid whose ends are α = 0 and α = 1 (0 for a convex path)."""
    return max(v - ((1 - a) * values[0] + a * values[-1]) for a, v in zip(alphas, values))


def _member_weights(n_groups: int, grid: Sequence[float]) -> tuple[list[tuple[float, ...]], list[int], list[int]]:
    """The distinct members (a weight per group) and, per (group, α), the index of its single and cumulative one."""
    members: dict[tuple[float, ...], int] = {}

    def index(w: tuple[float, ...]) -> int:
        return members.setdefault(w, len(members))

    single = [index(tuple(a if h == g else 0.0 for h in range(n_groups))) for g in range(n_groups) for a in grid]
    cumulative = [index(tuple(a if h <= g else 0.0 for h in range(n_groups))) for g in range(n_groups) for a in grid]
    return list(members), single, cumulative


def _stack(a: Mapping[str, Tensor], b: Mapping[str, Tensor], names: Sequence[str], group_of: Mapping[str, int],
           weights: Tensor) -> dict[str, Tensor]:
    """``{name: [M, ...]}``: member m's tensor = (1 − w)·a + w·b with w its group's weight (non-float: a's)."""
    out = {}
    for k in names:
        va = a[k]
        if not va.is_floating_point():
            out[k] = va.unsqueeze(0).expand(len(weights), *va.shape).clone()
            continue
        w = weights[:, group_of[k]].to(va.dtype).view(-1, *([1] * va.dim()))
        out[k] = va.unsqueeze(0) * (1 - w) + b[k].unsqueeze(0) * w
    return out


def layer_curves(sm: StackedModel, a: Mapping[str, Tensor], b: Mapping[str, Tensor],
                 groups: Sequence[tuple[str, Sequence[str]]], grid: Sequence[float], batches: Batches, *,
                 bn: str = "interpolate", bn_batches: Any = None, bn_limit: int | None = None,
                 loss_fn: LossFn | None = None, max_members: int = 64,
                 tally: list[Tensor] | None = None) -> tuple[list[list[float]], ...]:
    """``(error, loss, cumulative_error, cumulative_loss)``, each ``[group][α]``, of the layer-wise paths of ``a``
    and ``b`` (state dicts on ``sm``'s device), in one pass over ``batches``. ``bn``: ``interpolate`` (a group's
    BatchNorm buffers follow it) or ``reset`` (recomputed per member on ``bn_batches``, the first ``bn_limit``)."""
    group_of = {k: g for g, (_, names) in enumerate(groups) for k in names}
    missing = [k for k in (*sm.param_names, *sm.buffer_names) if k not in group_of]
    if missing:
        raise ConfigError(f"groups: tensor {missing[0]!r} is in no group")
    distinct, single, cumulative = _member_weights(len(groups), grid)
    device = next(iter(a.values())).device
    weights = torch.tensor(distinct, dtype=torch.float64, device=device)
    layer = None
    reset = bn == "reset" and bool(sm.buffer_names)
    for x, _ in batches:
        layer = input_layer(sm.model, x.to(device))
        break
    if layer is not None and sm._fc is not None and layer.name != "fc.0":
        layer = None
    if layer is not None and (len({group_of[k] for k in sm.param_names if k.startswith(layer.prefix)}) != 1
                              or all(k.startswith(layer.prefix) for k in sm.param_names)):
        layer = None  # the input layer in several groups, or the whole network: each member computes it
    # the input layer's own parameters are not needed at every member when its output is formed from A's and B's
    names = [k for k in sm.param_names if reset or layer is None or not k.startswith(layer.prefix)]
    params = _stack(a, b, names, group_of, weights)
    buffers = _stack(a, b, sm.buffer_names, group_of, weights)
    if reset:
        if bn_batches is None:
            raise ConfigError("bn: 'reset' needs data to recompute BatchNorm statistics on")
        reset_bn(sm, params, buffers, bn_batches, max_members=max_members, limit=bn_limit)
    members = None
    if layer is not None:
        g = group_of[next(k for k in sm.param_names if k.startswith(layer.prefix))]
        members = [(0, 1, w[g]) for w in distinct]
    losses, errors = evaluate_stream(sm, params, buffers, batches, loss_fn=loss_fn, max_members=max_members,
                                     ends=[a, b] if layer is not None else None, members=members, layer=layer,
                                     tally=tally)
    n = len(grid)

    def table(values: list[float], index: list[int]) -> list[list[float]]:
        return [[values[index[g * n + i]] for i in range(n)] for g in range(len(groups))]

    return table(errors, single), table(losses, single), table(errors, cumulative), table(losses, cumulative)


def layer_barriers(model_a: Network, model_b: Network, data: Any, alphas: int | Sequence[float] = 30,
                   groups: str = "layers", bn: str = "interpolate", loss_fn: LossFn | None = None,
                   device: str | torch.device | None = None, *, model: nn.Module | None = None, bn_data: Any = None,
                   bn_batches: int | None = None, batch_size: int = 1000, max_members: int = 64) -> LayerBarriers:
    """Barriers of interpolating one group of layers at a time (the rest at A), and cumulatively from the input.

    ``groups``: ``layers`` or ``blocks`` (see the module's docstring); ``data``, ``bn`` (``interpolate`` or
    ``reset`` on ``bn_data``, default ``data``), ``loss_fn`` and the networks as for ``lmc.interpolate``.

    >>> result = stability.lmc.layer_barriers(net_a, net_b, test_loader)
    >>> result.dataframe()            # group, position, parameters, barrier, loss_barrier, cumulative_barrier, ...
    >>> result.heatmap()
    """
    if bn not in ("interpolate", "reset"):
        raise ConfigError(f"bn: unknown option {bn!r}; choose one of interpolate, reset")
    grid = alpha_grid(alphas)
    template, a, b = resolve_pair(model_a, model_b, model)
    dev = device_of(template, device)
    sm = StackedModel(private(template, dev))
    found = layer_groups(sm.model, groups)
    a = {k: v.to(dev) for k, v in a.items()}
    b = {k: v.to(dev) for k, v in b.items()}
    batches = Batches(data, batch_size)
    bn_source = batches if bn_data is None else Batches(bn_data, batch_size, "bn_data")
    tally: list[Tensor] = []
    err, loss, cum_err, cum_loss = layer_curves(sm, a, b, found, grid, batches, bn=bn, bn_batches=bn_source,
                                                bn_limit=bn_batches, loss_fn=loss_fn, max_members=max_members,
                                                tally=tally)
    sizes = dict(sm.model.named_parameters())
    parameters = [sum(sizes[k].numel() for k in names if k in sizes) for _, names in found]
    return LayerBarriers([g for g, _ in found], [list(n) for _, n in found], parameters, grid, err, loss, cum_err,
                         cum_loss, groups, bn, chance_of(tally))


__all__ = ["GROUPINGS", "LayerBarriers", "chord_barrier", "layer_barriers", "layer_curves", "layer_groups"]
