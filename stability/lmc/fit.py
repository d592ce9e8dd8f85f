"""Curves of low loss between two networks (Garipov et al. 2018): the middle point fitted, the curve beside the line.

``fit_curve`` joins networks A and B by a quadratic Bezier curve (or a polygonal chain with one bend) through a
middle point θ_m (``maths.bezier``). θ_m starts at the midpoint of A and B, where the Bezier curve is the
straight line, and is trained on the training loss of θ(t) with t ~ U(0, 1) drawn afresh at every step; the
endpoints stay fixed, so the gradient reaches θ_m alone (scaled by its coefficient at t). θ(t) is built from the
three tensor dicts and run with ``torch.func.functional_call``, the model in train mode (BatchNorm uses batch
statistics). The curve is then measured at evenly spaced t with BatchNorm statistics recomputed at every t
(``bn="reset"``, their ``update_bn``), and the straight line beside it on the same grid and data.

Randomness is a function of (seed, step): t, the epoch's order of the training examples and dropout masks are
drawn from generators seeded by the step, so a fit resumed from a checkpoint (the middle point, the optimizer's
state and the step; ``checkpoint=``) finishes bit-identical to one that never stopped.

>>> curve = stability.lmc.fit_curve(net_a, net_b, (x_train, y_train), eval_data=test_loader, steps=1000)
>>> curve.barrier, curve.line_barrier                       # error barriers along the curve and the line
>>> curve.plot()
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..engine import StackedModel
from ..engine.precision import compute_dtype
from ..errors import ConfigError
from ..maths.bezier import (
    check_kind,
    curve_coefficients,
    line_coefficients,
    midpoint,
    point_on_curve,
    t_grid,
)
from ..maths.health import DEFAULT_CHANCE_MARGIN
from ..maths.paths import Batches, LossFn, chance_of, evaluate_combinations
from ..steps import Step, format_step
from ..store.files import load_tensors, save_tensors, short_digest
from .curves import ALIGN_OPTIONS, Curve, EndpointBarriers, check_bn
from .curves import align as align_networks
from .networks import Network, device_of, private, resolve_pair

OPTIMIZERS = ("sgd", "adam")
INITS = ("midpoint",)
# constant: lr throughout; garipov: lr for the first half, then linearly down to lr/100 at 90%, then lr/100
# (dnn-mode-connectivity's learning_rate_schedule)
SCHEDULES = ("constant", "garipov")


@dataclass(frozen=True)
class FitSettings:
    """How the middle point is fitted (a ``curve`` run's table names these flat: ``curve.steps``, ``curve.lr``)."""

    kind: str = "bezier"  # bezier | polychain
    steps: str = "1000it"  # fitting iterations (or epochs of the training data: 5ep)
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9  # sgd only
    batch_size: int = 128
    seed: int = 0  # draws t, the order of the training examples and dropout masks, step by step
    init: str = "midpoint"  # where θ_m starts: the midpoint of A and B (the straight line)
    schedule: str = "constant"  # constant | garipov

    def __post_init__(self) -> None:
        try:  # one spelling per number of steps (200, "200" and "200it" name one run); validate names a bad one
            object.__setattr__(self, "steps", str(Step.parse(self.steps)))
        except ConfigError:
            pass

    def validate(self, prefix: str = "") -> FitSettings:
        """Check every setting; errors name ``prefix + <field>`` (``curve.steps``)."""
        check_kind(self.kind, f"{prefix}kind")
        if Step.parse(self.steps, f"{prefix}steps").to_iterations(1) < 1:
            raise ConfigError(f"{prefix}steps: the curve needs at least 1 fitting step, got {self.steps!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("init", INITS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{prefix}{name}: unknown {name} {getattr(self, name)!r}; choose one of "
                                  f"{', '.join(allowed)}")
        if not self.lr >= 0:
            raise ConfigError(f"{prefix}lr: the learning rate must be at least 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{prefix}momentum: must be in [0, 1), got {self.momentum}")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}batch_size: must be at least 1, got {self.batch_size}")
        return self

    def iterations(self, iterations_per_epoch: int, prefix: str = "") -> int:
        """The fitting steps in iterations (at least 1)."""
        steps = Step.parse(self.steps, f"{prefix}steps").to_iterations(iterations_per_epoch)
        if steps < 1:
            raise ConfigError(f"{prefix}steps: the curve needs at least 1 fitting step, got {self.steps!r}")
        return steps

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of fitting step ``step`` of ``total``."""
        if self.schedule == "constant":
            return self.lr
        done = step / total
        factor = 1.0 if done <= 0.5 else 1.0 - 0.99 * (done - 0.5) / 0.4 if done <= 0.9 else 0.01
        return self.lr * factor


# ---------------------------------------------------------------- randomness as a function of (seed, step)
_T, _ORDER, _DROPOUT = 0, 1, 2  # streams


def _seed(seed: int, stream: int, index: int) -> int:
    return ((seed * 1_000_003 + index) * 3 + stream) % (2**63)


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, stream, index))


def draw_t(seed: int, step: int) -> float:
    """The t of fitting step ``step``, uniform in [0, 1)."""
    return float(torch.rand((), generator=_generator(seed, _T, step), dtype=torch.float64))


class TrainBatches:
    """The fitting batch of each step: from a pair of tensors, the epoch's seeded permutation cut into batches
    (a last partial batch dropped); from any other batches (a DataLoader), the batches as they come, cycled."""

    def __init__(self, data: Any, batch_size: int, seed: int):
        self.seed, self.batch_size = seed, batch_size
        self.source = Batches(data, batch_size, "train_data")
        self.pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Tensor) for d in data)
        if self.pair:
            self.x, self.y = data
            if batch_size > len(self.y):
                raise ConfigError(f"batch_size: {batch_size} exceeds the {len(self.y)} training examples")
            self.per_epoch = len(self.y) // batch_size
        self._epoch, self._perm = -1, None
        self._iter: Any = None
        self._next = 0

    def iterations_per_epoch(self) -> int:
        if self.pair:
            return self.per_epoch
        return sum(1 for _ in self.source)

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        if self.pair:
            epoch, i = divmod(step, self.per_epoch)
            if epoch != self._epoch:
                perm = torch.randperm(len(self.y), generator=_generator(self.seed, _ORDER, epoch))
                self._epoch, self._perm = epoch, perm.to(self.y.device)
            idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
            return self.x[idx], self.y[idx]
        if step != self._next:  # a resumed fit: the batches before ``step`` are read again, and skipped
            self._iter, self._next = None, 0
            while self._next < step:
                self._batch()
                self._next += 1
        self._next = step + 1
        return self._batch()

    def _batch(self) -> tuple[Tensor, Tensor]:
        for _ in range(2):
            if self._iter is not None:
                for batch in self._iter:
                    return batch
            self._iter = iter(self.source)
        raise ConfigError("train_data: holds no batches")


# ---------------------------------------------------------------- fitting
def _train_step(net: nn.Module, coeffs: Sequence[float], a: Mapping[str, Tensor], m: Mapping[str, Tensor],
                b: Mapping[str, Tensor], names: Sequence[str], x: Tensor, y: Tensor, loss_fn: LossFn,
                opt: torch.optim.Optimizer) -> float:
    """One step on θ_m: the loss of θ(t) on a batch (train mode), its gradient into θ_m, the optimizer's step."""
    tensors = point_on_curve(coeffs, a, m, b, names)  # buffers are fresh copies: BatchNorm updates them in place
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(functional_call(net, tensors, (x,)), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _optimizer(settings: FitSettings, params: list[Tensor]) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)


def _optimizer_tensors(opt: torch.optim.Optimizer, names: Sequence[str]) -> dict[str, Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if value is not None:
                out[f"optimizer/{key}/{names[i]}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, names: Sequence[str], tensors: Mapping[str, Tensor]) -> None:
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, entry, name = key.split("/", 2)
            state.setdefault(index[name], {})[entry] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


@dataclass
class Fit:
    """A fitted (or partly fitted) middle point: θ_m's full state dict, and (t, loss) of every step so far."""

    middle: dict[str, Tensor]
    trace: list[tuple[float, float]] = field(default_factory=list)


def fit_middle(net: nn.Module, a: Mapping[str, Tensor], b: Mapping[str, Tensor], batches: TrainBatches,
               settings: FitSettings, steps: int, *, loss_fn: LossFn | None = None,
               checkpoint: str | Path | None = None, checkpoint_every: int = 100,
               identity: Mapping[str, Any] | None = None) -> Fit:
    """Train θ_m for ``steps`` iterations between the fixed ends ``a`` and ``b`` (tensor dicts on ``net``'s device).

    ``checkpoint``: a safetensors file the state (θ_m, the optimizer's state, the step and the trace so far) is
    written to every ``checkpoint_every`` steps and resumed from when it exists (ConfigError when it was written
    for other networks or settings: ``identity``, with the ends' digests, must match).
    """
    loss_fn = loss_fn or F.cross_entropy
    device = next(iter(a.values())).device
    names = [n for n, _ in net.named_parameters()]
    tensor_names = list(a)  # parameters and buffers, in the state dict's order
    m = midpoint(a, b)
    params = {n: m[n].clone().requires_grad_(True) for n in names}
    opt = _optimizer(settings, list(params.values()))
    trace: list[tuple[float, float]] = []
    start = 0
    identity = {**(identity or {}), "settings": asdict(settings), "steps": steps,
                "ends": [short_digest(a), short_digest(b)]}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        tensors, meta = load_tensors(path, device)
        if meta.get("identity") != json.loads(json.dumps(identity)):
            raise ConfigError(f"checkpoint: {str(path)!r} holds a fit of other networks or settings; remove it or "
                              "give another path")
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[f"middle/{n}"])
        _load_optimizer(opt, names, tensors)
        start = int(meta["step"])
        trace = [(float(t), float(v)) for t, v in tensors["trace"].tolist()] if start else []

    def save(step: int) -> None:
        if path is None:
            return
        tensors = {**{f"middle/{n}": p.detach() for n, p in params.items()}, **_optimizer_tensors(opt, names),
                   "trace": torch.tensor(trace, dtype=torch.float64).reshape(-1, 2)}
        save_tensors(path, tensors, {"step": step, "identity": identity})

    net.train()
    forked = [device.index or 0] if device.type == "cuda" else []
    for step in range(start, steps):
        t = draw_t(settings.seed, step)
        coeffs = curve_coefficients(settings.kind, t)[0].tolist()
        x, y = batches(step)
        for group in opt.param_groups:
            group["lr"] = settings.lr_at(step, steps)
        with torch.random.fork_rng(devices=forked):  # dropout masks drawn from the step's seed
            torch.manual_seed(_seed(settings.seed, _DROPOUT, step))
            value = _train_step(net, coeffs, a, {**m, **params}, b, tensor_names, x.to(device), y.to(device),
                                loss_fn, opt)
        trace.append((t, value))
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
    net.eval()
    middle = {k: (params[k].detach().clone() if k in params else m[k]) for k in a}
    return Fit(middle, trace)


# ---------------------------------------------------------------- measuring
def measure_curve(net: nn.Module, a: Mapping[str, Tensor], middle: Mapping[str, Tensor], b: Mapping[str, Tensor],
                  kind: str, grid: Sequence[float], data: Any, *, bn: str = "reset", bn_data: Any = None,
                  bn_batches: int | None = None, loss_fn: LossFn | None = None, batch_size: int = 1000,
                  max_members: int = 64, chance_margin: float = DEFAULT_CHANCE_MARGIN,
                  precision: str = "fp32") -> tuple[Curve, Curve]:
    """The curve through ``middle`` and the straight line from ``a`` to ``b``, on ``data`` at every t of ``grid``
    (one pass: both paths stacked as members over the three bases). ``precision``: ``fp32`` or ``bf16`` (the
    forward passes in bf16 autocast; BatchNorm statistics, losses and the combination of the bases stay float32)."""
    check_bn(bn)
    if bn == "repair":
        raise ConfigError("bn: 'repair' is not available along a curve; choose interpolate or reset")
    batches = Batches(data, batch_size)
    bn_source = batches if bn_data is None else Batches(bn_data, batch_size, "bn_data")
    coeffs = torch.cat([curve_coefficients(kind, grid), line_coefficients(grid)])
    tally: list[Tensor] = []
    sm = StackedModel(net)
    sm.eval_dtype = compute_dtype(precision)
    losses, errors = evaluate_combinations(sm, [a, middle, b], coeffs, batches, bn=bn,
                                           bn_batches=bn_source, bn_limit=bn_batches, loss_fn=loss_fn,
                                           max_members=max_members, tally=tally)
    n, chance = len(grid), chance_of(tally)
    meta = {"loss": "cross_entropy" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__)}
    return (Curve(list(grid), errors[:n], losses[:n], chance, chance_margin, bn, {**meta, "path": kind}),
            Curve(list(grid), errors[n:], losses[n:], chance, chance_margin, bn, {**meta, "path": "line"}))


@dataclass
class FittedCurve(EndpointBarriers):
    """A fitted curve from A to B and the straight line beside it, on the same t grid, data and BatchNorm mode.

    ``error`` (fraction misclassified) and ``loss`` along the curve at ``t``; ``line``: the straight line's
    ``Curve``. ``barrier`` = max_t error(t) − ½·(error(0) + error(1)), the line's definition (``line_barrier``);
    ``loss_barrier`` likewise. ``middle``: θ_m's state dict (BatchNorm buffers: the midpoint's). ``trace``: (t,
    training loss) of every fitting step. ``settings``: how it was fitted (the seed included).
    """

    kind: str
    t: list[float]
    error: list[float]
    loss: list[float]
    line: Curve
    middle: dict[str, Tensor] = field(repr=False)
    ends: tuple[dict[str, Tensor], dict[str, Tensor]] = field(repr=False)
    chance: float | None = None
    margin: float = DEFAULT_CHANCE_MARGIN
    bn: str = "reset"
    settings: dict[str, Any] = field(default_factory=dict)
    trace: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def line_barrier(self) -> float:
        return self.line.barrier

    @property
    def line_loss_barrier(self) -> float:
        return self.line.loss_barrier

    def state_at(self, t: float) -> dict[str, Tensor]:
        """θ(t) as a state dict (BatchNorm buffers combined like the parameters, not recomputed)."""
        a, b = self.ends
        return {k: v.detach().clone() for k, v in point_on_curve(curve_coefficients(self.kind, t)[0].tolist(), a,
                                                                 self.middle, b, list(a)).items()}

    def dataframe(self):
        """Columns path (``curve`` or ``line``), t, error, loss (pandas)."""
        import pandas as pd

        rows = [{"path": "curve", "t": t, "error": e, "loss": v} for t, e, v in zip(self.t, self.error, self.loss)]
        rows += [{"path": "line", "t": t, "error": e, "loss": v}
                 for t, e, v in zip(self.line.alphas, self.line.error, self.line.loss)]
        return pd.DataFrame(rows)

    def plot(self, ax=None, metric: str = "error", **kwargs: Any):
        """The curve and the line against t on ``ax`` (a new figure's when None); returns the axes."""
        if metric not in ("error", "loss"):
            raise ConfigError(f"metric: must be error or loss, got {metric!r}")
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(4, 3))
        scale = 100.0 if metric == "error" else 1.0
        ax.plot(self.t, [scale * v for v in getattr(self, metric)], marker="o", ms=3, label=self.kind, **kwargs)
        ax.plot(self.line.alphas, [scale * v for v in getattr(self.line, metric)], ls="--", label="line")
        ax.set_xlabel("t")
        ax.set_ylabel("error (%)" if metric == "error" else "loss")
        ax.legend()
        return ax


def fit_curve(model_a: Network, model_b: Network, train_data: Any, *, kind: str = "bezier",
              steps: int | str = 1000, lr: float = 0.05, optimizer: str = "sgd", momentum: float = 0.9,
              batch_size: int = 128, seed: int = 0, init: str = "midpoint", schedule: str = "constant",
              loss_fn: LossFn | None = None, model: nn.Module | None = None, eval_data: Any = None,
              points: int = 21, bn: str = "reset", bn_batches: int | None = None, align: str | None = None,
              device: str | torch.device | None = None, eval_batch_size: int = 1000, max_members: int = 64,
              chance_margin: float = DEFAULT_CHANCE_MARGIN, checkpoint: str | Path | None = None,
              checkpoint_every: int = 100) -> FittedCurve:
    """A curve of low training loss from A to B (Garipov et al. 2018), measured beside the straight line.

    ``train_data``: a pair of tensors ``(x, y)`` (batches drawn from a seeded permutation per epoch) or any
    batches (a ``DataLoader``: taken as they come). ``kind``: ``bezier`` or ``polychain``; ``steps``: fitting
    iterations (or ``"5ep"``); ``schedule``: ``constant`` or ``garipov``. ``eval_data``: where the curve is measured
    (default ``train_data``) at ``points`` evenly spaced t; ``bn``: ``reset`` (BatchNorm statistics recomputed at
    every t on ``train_data``, the first ``bn_batches`` batches) or ``interpolate``. ``align``: ``weights`` or
    ``activations`` aligns B to A first (``lmc.align``; Tatro et al. 2020). ``checkpoint``: a file to save the fit
    to every ``checkpoint_every`` steps and resume from.
    """
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = format_step(steps) if steps >= 0 else str(steps)
    settings = FitSettings(kind, str(steps), float(lr), optimizer, float(momentum), int(batch_size), int(seed), init,
                           schedule).validate()
    grid = t_grid(points)
    check_bn(bn)
    if align is not None and align not in ALIGN_OPTIONS:
        raise ConfigError(f"align: unknown alignment {align!r}; choose one of {', '.join(ALIGN_OPTIONS)} (or None)")
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every: must be at least 1 step, got {checkpoint_every}")
    template, a, b = resolve_pair(model_a, model_b, model)
    batches = TrainBatches(train_data, settings.batch_size, settings.seed)
    total = settings.iterations(batches.iterations_per_epoch() if Step.parse(settings.steps).epochs else 1)
    if align is not None:
        aligned, _ = align_networks(a, b, align, train_data, model=template, batch_size=eval_batch_size)
        b = {k: v.detach() for k, v in aligned.state_dict().items()}
    dev = device_of(template, device)
    net = private(template, dev)
    a = {k: v.to(dev) for k, v in a.items()}
    b = {k: v.to(dev) for k, v in b.items()}
    fit = fit_middle(net, a, b, batches, settings, total, loss_fn=loss_fn, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every, identity={"align": align})
    curve, line = measure_curve(net, a, fit.middle, b, settings.kind, grid,
                                train_data if eval_data is None else eval_data, bn=bn, bn_data=train_data,
                                bn_batches=bn_batches, loss_fn=loss_fn, batch_size=eval_batch_size,
                                max_members=max_members, chance_margin=chance_margin)
    return FittedCurve(settings.kind, grid, curve.error, curve.loss, line, fit.middle, (a, b), curve.chance,
                       chance_margin, bn, {**asdict(settings), "iterations": total, "align": align}, fit.trace)


__all__ = ["INITS", "OPTIMIZERS", "SCHEDULES", "Fit", "FitSettings", "FittedCurve", "TrainBatches", "draw_t",
           "fit_curve", "fit_middle", "measure_curve"]
