"""Interpolation curves, barriers, alignment and REPAIR between any two networks, over any data."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import StackedModel
from ..errors import ConfigError
from ..maths.health import DEFAULT_CHANCE_MARGIN, is_untrained
from ..maths.interpolation import error_barrier
from ..maths.paths import Batches, LossFn, chance_of, evaluate_pairs, evaluate_stream
from .networks import Network, device_of, module_with, private, resolve_pair

BN_OPTIONS = ("interpolate", "reset", "repair")
ALIGN_OPTIONS = ("weights", "activations")


class EndpointBarriers:
    """``barrier``, ``loss_barrier`` and ``untrained`` of a path with ``error`` and ``loss`` along it from network A
    (first) to network B (last), ``chance`` and ``margin`` (``Curve``, ``FittedCurve``)."""

    error: list[float]
    loss: list[float]
    chance: float | None
    margin: float

    @property
    def barrier(self) -> float:
        return error_barrier(self.error)

    @property
    def loss_barrier(self) -> float:
        return error_barrier(self.loss)

    @property
    def untrained(self) -> bool:
        """An endpoint is within the chance margin of chance error: its barriers mean nothing."""
        return self.chance is not None and any(is_untrained(e, self.chance, self.margin)
                                               for e in (self.error[0], self.error[-1]))


@dataclass
class Curve(EndpointBarriers):
    """Error and loss along θ(α) = (1 − α)·θ_a + α·θ_b.

    ``error`` is the fraction misclassified (NaN when the targets are not class labels), ``loss`` the mean
    loss. ``barrier`` = max_α error(α) − ½·(error(0) + error(1)) (Frankle et al. 2020's instability), and
    ``loss_barrier`` the same on the loss. ``untrained``: an endpoint's error is within the chance margin of
    the data's chance error (always predicting the most frequent class): a small barrier then means nothing.
    """

    alphas: list[float]
    error: list[float]
    loss: list[float]
    chance: float | None = None
    margin: float = DEFAULT_CHANCE_MARGIN
    bn: str = "interpolate"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def dataframe(self):
        """Columns alpha, error, loss (pandas)."""
        import pandas as pd

        return pd.DataFrame({"alpha": self.alphas, "error": self.error, "loss": self.loss})

    def plot(self, ax=None, metric: str = "error", **kwargs: Any):
        """The curve against α on ``ax`` (a new figure's when None); returns the axes."""
        if metric not in ("error", "loss"):
            raise ConfigError(f"metric: must be error or loss, got {metric!r}")
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(4, 3))
        values = [100 * v for v in self.error] if metric == "error" else self.loss
        ax.plot(self.alphas, values, marker="o", ms=3, **kwargs)
        ax.set_xlabel("α")
        ax.set_ylabel("error (%)" if metric == "error" else "loss")
        return ax


def alpha_grid(alphas: int | Sequence[float]) -> list[float]:
    """``alphas`` evenly spaced values in [0, 1], or an explicit increasing grid that includes 0 and 1."""
    if isinstance(alphas, bool):
        raise ConfigError(f"alphas: expected a count or a list of values in [0, 1], got {alphas!r}")
    if isinstance(alphas, int):
        if alphas < 2:
            raise ConfigError(f"alphas: need at least 2 values (both ends 0 and 1), got {alphas}")
        return torch.linspace(0, 1, alphas, dtype=torch.float64).tolist()
    grid = [float(a) for a in alphas]
    if len(grid) < 2 or sorted(grid) != grid or grid[0] != 0.0 or grid[-1] != 1.0:
        raise ConfigError(f"alphas: the grid must be increasing in [0, 1] and include both ends 0 and 1, got {grid}")
    return grid


def check_bn(bn: str) -> str:
    if bn not in BN_OPTIONS:
        raise ConfigError(f"bn: unknown option {bn!r}; choose one of {', '.join(BN_OPTIONS)}")
    return bn


def _loss_name(loss_fn: LossFn | None) -> str:
    return "cross_entropy" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__)


def interpolate(model_a: Network, model_b: Network, data: Any, alphas: int | Sequence[float] = 30,
                bn: str = "interpolate", loss_fn: LossFn | None = None, device: str | torch.device | None = None, *,
                model: nn.Module | None = None, bn_data: Any = None, bn_batches: int | None = None,
                batch_size: int = 1000, max_members: int = 64, chance_margin: float = DEFAULT_CHANCE_MARGIN,
                repair_examples: int = 1000) -> Curve:
    """The error and loss of θ(α) = (1 − α)·θ_a + α·θ_b at every α, on ``data``.

    ``data``: a ``DataLoader``, any iterable of ``(x, y)`` batches, or a pair of tensors ``(x, y)`` (cut into
    batches of ``batch_size``). It is read batch by batch, once; every α is evaluated on each batch at once
    (stacked, ``max_members`` at a time). ``bn``: ``interpolate`` (BatchNorm running statistics interpolated
    like the parameters, as Frankle et al. 2020), ``reset`` (recomputed for each α on ``bn_data``, default
    ``data``, over its first ``bn_batches`` batches, default all) or ``repair`` (REPAIR, Jordan et al. 2023: every
    hidden unit of θ(α) renormalized to the interpolation of the endpoints' statistics, measured on the first
    ``repair_examples`` examples of ``bn_data``). ``loss_fn(logits, y)``: the mean loss of a batch (default
    cross-entropy). ``model_a``/``model_b``: modules, or state dicts / checkpoint files with ``model=``.

    >>> curve = stability.lmc.interpolate(net_a, net_b, test_loader)
    >>> curve.barrier, curve.loss_barrier
    """
    check_bn(bn)
    grid = alpha_grid(alphas)
    template, a, b = resolve_pair(model_a, model_b, model)
    dev = device_of(template, device)
    net = private(template, dev)
    sm = StackedModel(net)
    a = {k: v.to(dev) for k, v in a.items()}
    b = {k: v.to(dev) for k, v in b.items()}
    batches = Batches(data, batch_size)
    bn_source = batches if bn_data is None else Batches(bn_data, batch_size, "bn_data")
    tally: list[Tensor] = []
    if bn == "repair":
        params, buffers = _repaired(sm, a, b, grid, bn_source, repair_examples, dev)
        losses, errors = evaluate_stream(sm, params, buffers, batches, loss_fn=loss_fn, max_members=max_members,
                                         tally=tally)
    else:
        losses, errors = evaluate_pairs(sm, [a, b], [(0, 1, alpha) for alpha in grid], batches, bn=bn,
                                        bn_batches=bn_source, bn_limit=bn_batches, loss_fn=loss_fn,
                                        max_members=max_members, tally=tally)
    return Curve(grid, errors, losses, chance_of(tally), chance_margin, bn,
                 {"loss": _loss_name(loss_fn), "examples": sum(int(t.sum()) for t in tally) or None})


def _repaired(sm: StackedModel, a: dict[str, Tensor], b: dict[str, Tensor], grid: list[float], data: Batches,
              examples: int, device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    from ..maths.interpolation import repaired_path

    x, _ = data.take(examples)
    return repaired_path(sm, a, b, grid, x.to(device))


def barrier(model_a: Network, model_b: Network, data: Any, **kwargs: Any) -> float:
    """The error barrier of ``interpolate(model_a, model_b, data, **kwargs)``: one number."""
    return interpolate(model_a, model_b, data, **kwargs).barrier


def align(model_a: Network, model_b: Network, method: str = "weights", data: Any = None, *,
          model: nn.Module | None = None, examples: int = 1000, seed: int = 0, batch_size: int = 1000,
          example_input: Tensor | None = None) -> tuple[nn.Module, dict[str, Tensor]]:
    """Network B with its hidden units permuted to match A's, and the permutation (``{name: LongTensor}``, new unit
    j = old unit ``perm[j]``). B computes the same function before and after.

    ``method``: ``weights`` (Git Re-Basin weight matching, data-free) or ``activations`` (correlation of units'
    activations on the first ``examples`` examples of ``data``). The permutation spec is the zoo's, or traced
    with torch.fx for any other model (and checked: a random permutation must leave the outputs unchanged).

    >>> aligned_b, perm = stability.lmc.align(net_a, net_b)
    >>> stability.lmc.barrier(net_a, aligned_b, test_loader)
    """
    from ..align import activation_matching, apply_permutation, permutation_spec, weight_matching

    if method not in ALIGN_OPTIONS:
        raise ConfigError(f"method: unknown alignment {method!r}; choose one of {', '.join(ALIGN_OPTIONS)}")
    template, a, b = resolve_pair(model_a, model_b, model)
    net = private(template, device_of(template, None)).eval()
    x = None
    if method == "activations" or example_input is None:
        if data is not None:
            x, _ = Batches(data, batch_size).take(examples)
        elif method == "activations":
            raise ConfigError("align: method 'activations' needs data=<batches the units are observed on>")
    spec = _spec(permutation_spec, net, example_input if example_input is not None else x)
    if method == "weights":
        perms = weight_matching(spec, a, b, seed=seed)
    else:
        perms = activation_matching(net, spec, a, b, x)
    return module_with(template, apply_permutation(spec, perms, b)), perms


def _spec(permutation_spec: Any, net: nn.Module, x: Tensor | None) -> Any:
    try:
        return permutation_spec(net, example_input=None if x is None else x[:2])
    except TypeError:  # a spec that takes no example input
        return permutation_spec(net)


def repair(model_a: Network, model_b: Network, data: Any, alpha: float = 0.5, *, model: nn.Module | None = None,
           examples: int = 1000, batch_size: int = 1000) -> nn.Module:
    """θ(α) after REPAIR (Jordan et al. 2023): each hidden unit's mean and standard deviation on the first
    ``examples`` examples of ``data`` set to the interpolation of the endpoints'. Align B first (``align``)."""
    from ..align import repair as repair_state

    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha: must lie in [0, 1], got {alpha}")
    template, a, b = resolve_pair(model_a, model_b, model)
    net = private(template, device_of(template, None))
    x, _ = Batches(data, batch_size).take(examples)
    mid = {k: (1 - alpha) * a[k] + alpha * b[k] if a[k].is_floating_point() else a[k] for k in a}
    return module_with(template, repair_state(net, a, b, mid, float(alpha), x))
