"""The Hessian of any network's loss over any data, and instability under the user's own training."""
from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import StackedModel
from ..errors import ConfigError
from ..hessian import HessianOperator, HessianSettings, ProbeResult, measure
from ..maths.health import DEFAULT_CHANCE_MARGIN
from ..maths.paths import Batches, LossFn, chance_of, evaluate_pairs
from ..maths.sweep import first_stable_step, flag_curves, sweep_table
from .curves import Curve, alpha_grid, check_bn
from .networks import Network, device_of, module_with, private, resolve, same_architecture


def hessian(model: Network, data: Any, loss_fn: LossFn | None = None, top_k: int = 1, smallest: bool = False,
            trace: int = 0, density: bool = False, masks: Mapping[str, Tensor] | None = None, *,
            template: nn.Module | None = None, dtype: str = "float32", seed: int = 0, tol: float = 1e-6,
            lanczos_steps: int = 0, batch_size: int = 1000, device: str | torch.device | None = None,
            hvp: str = "auto") -> ProbeResult:
    """Top eigenvalues (Lanczos), the smallest, the trace (``trace`` Hutchinson probes) and the spectral density of
    the Hessian of the mean loss over every example of ``data``, the model in eval mode: the engine of the run-based
    probe (``stability.hessian.probe``), reading the data batch by batch for every Hessian-vector product.

    ``data``: a ``DataLoader``, an iterable of ``(x, y)`` batches or a pair of tensors. ``masks``: {parameter name:
    0/1 tensor}: the Hessian restricted to the surviving weights. ``model``: a module, or a state dict / checkpoint
    file with ``template=``. ``hvp``: how Hessian-vector products are taken (``auto``: one retained graph for a single
    batch, else double backward batch by batch; ``graph`` keeps every batch's graph: fastest, memory permitting).

    >>> stability.lmc.hessian(net, train_loader, top_k=3).eigenvalues
    """
    net_template, state = resolve(model, template, "model")
    dev = device_of(net_template, device)
    net = module_with(private(net_template, dev), {k: v.to(dev) for k, v in state.items()})
    settings = HessianSettings(top_k=top_k, smallest=smallest, trace_probes=trace, density=density, dtype=dtype,
                               seed=seed, tol=tol, lanczos_steps=lanczos_steps)
    op = HessianOperator(net, None, None, masks=dict(masks) if masks else None, dtype=dtype,  # type: ignore[arg-type]
                         batches=Batches(data, batch_size), loss_fn=loss_fn, hvp=hvp)
    if settings.top_k > op.dim:
        raise ConfigError(f"top_k: {settings.top_k} is more than the {op.dim} parameters the Hessian acts on")
    return measure(op, settings)


TrainFn = Callable[..., nn.Module]


@dataclass
class Instability:
    """Siblings trained by the user's ``train_fn`` from one network, and the curve of every pair.

    ``barrier``: the mean error barrier over pairs (the instability); ``untrained``: some sibling is at chance
    (its barrier means nothing, never stable).
    """

    noise_seeds: list[int]
    curves: dict[tuple[int, int], Curve]
    networks: list[nn.Module] = field(repr=False)

    @property
    def barriers(self) -> list[float]:
        return [c.barrier for c in self.curves.values()]

    @property
    def barrier(self) -> float:
        return statistics.fmean(self.barriers)

    @property
    def loss_barrier(self) -> float:
        return statistics.fmean(c.loss_barrier for c in self.curves.values())

    @property
    def untrained(self) -> bool:
        return any(c.untrained for c in self.curves.values())

    def rows(self, rewind_step: int | str = "", split: str = "data") -> list[dict[str, Any]]:
        """Curve rows as the suite's ``curves.csv`` holds them (rewind_step, pair, split, alpha, error, loss)."""
        return [{"rewind_step": rewind_step, "pair": f"{i}-{j}", "split": split, "alpha": alpha, "error": e,
                 "loss": loss} for (i, j), c in self.curves.items() for alpha, e, loss in zip(c.alphas, c.error, c.loss)]

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows())


def _call(train_fn: TrainFn, net: nn.Module, seed: int, step: int | None) -> nn.Module:
    """``train_fn(net, seed)``, or with the rewind step when it takes one (a third parameter, or ``step=``)."""
    try:
        params = inspect.signature(train_fn).parameters
    except (TypeError, ValueError):
        params = {}
    step_param = params.get("step")
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if step is not None and step_param is not None and step_param.kind == step_param.KEYWORD_ONLY:
        out = train_fn(net, seed, step=step)
    elif step is not None and (len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params.values())):
        out = train_fn(net, seed, step)
    else:
        out = train_fn(net, seed)
    if not isinstance(out, nn.Module):
        raise ConfigError(f"train_fn: must return the trained nn.Module (the copy it was given, trained), got "
                          f"{type(out).__name__}")
    return out


def _seeds(siblings: int, noise_seeds: Sequence[int] | None) -> list[int]:
    if noise_seeds is not None:
        seeds = [int(s) for s in noise_seeds]
        if len(seeds) < 2 or len(set(seeds)) != len(seeds):
            raise ConfigError(f"noise_seeds: need at least 2 distinct seeds, got {list(noise_seeds)}")
        return seeds
    if isinstance(siblings, bool) or not isinstance(siblings, int) or siblings < 2:
        raise ConfigError(f"siblings: need at least 2 siblings to compare, got {siblings!r}")
    return list(range(siblings))


def instability(model: Network, train_fn: TrainFn, siblings: int = 2, noise_seeds: Sequence[int] | None = None, *,
                data: Any, template: nn.Module | None = None, alphas: int | Sequence[float] = 30,
                bn: str = "interpolate", bn_data: Any = None, bn_batches: int | None = None,
                loss_fn: LossFn | None = None, device: str | torch.device | None = None, batch_size: int = 1000,
                max_members: int = 64, chance_margin: float = DEFAULT_CHANCE_MARGIN,
                step: int | None = None) -> Instability:
    """Stability to SGD noise of ``model`` under the user's own training (Frankle et al. 2020).

    ``train_fn(model, noise_seed) -> nn.Module`` trains the copy it is given (the user's loop, optimizer and loader,
    with its randomness seeded by ``noise_seed``) and returns it; it may also take the rewind ``step``. The suite
    makes one copy per noise seed (``noise_seeds``, default 0 .. siblings-1), calls ``train_fn`` on each, and measures
    every pair's curve on ``data`` in one pass, every pair's α grid stacked (``bn`` as in ``interpolate``;
    ``repair`` is not offered here).

    >>> result = stability.lmc.instability(net, my_train, siblings=2, data=test_loader)
    >>> result.barrier, result.untrained
    """
    check_bn(bn)
    if bn == "repair":
        raise ConfigError("bn: 'repair' is offered by lmc.interpolate; instability measures with interpolate or reset")
    seeds = _seeds(siblings, noise_seeds)
    grid = alpha_grid(alphas)
    net_template, state = resolve(model, template, "model")
    trained = []
    for seed in seeds:
        copy = module_with(net_template, state).train()
        trained.append(_call(train_fn, copy, seed, step))
    states = [{k: v.detach() for k, v in t.state_dict().items()} for t in trained]
    for i, s in enumerate(states):
        same_architecture(state, s, f"train_fn (noise seed {seeds[i]})")
    dev = device_of(trained[0], device)
    sm = StackedModel(private(net_template, dev))
    ends = [{k: v.to(dev) for k, v in s.items()} for s in states]
    pairs = list(combinations(range(len(seeds)), 2))
    batches = Batches(data, batch_size)
    tally: list[Tensor] = []
    losses, errors = evaluate_pairs(sm, ends, [(i, j, a) for i, j in pairs for a in grid], batches, bn=bn,
                                    bn_batches=batches if bn_data is None else Batches(bn_data, batch_size, "bn_data"),
                                    bn_limit=bn_batches, loss_fn=loss_fn, max_members=max_members, tally=tally)
    chance, n = chance_of(tally), len(grid)
    curves = {pair: Curve(grid, errors[p * n:(p + 1) * n], losses[p * n:(p + 1) * n], chance, chance_margin, bn)
              for p, pair in enumerate(pairs)}
    return Instability(seeds, curves, trained)


@dataclass
class Sweep:
    """Instability at every rewind point: the table ``instability_sweep`` writes (``sweep.csv``) and its curves."""

    table: list[dict[str, Any]]
    curves: list[dict[str, Any]] = field(repr=False)
    first_stable_step: int | None
    threshold: float
    points: dict[int, Instability] = field(repr=False, default_factory=dict)

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table)


def sweep(points: Mapping[int, Network], train_fn: TrainFn, siblings: int = 2,
          noise_seeds: Sequence[int] | None = None, *, data: Any, template: nn.Module | None = None,
          threshold: float = 0.02, chance_margin: float = DEFAULT_CHANCE_MARGIN, split: str = "test",
          **kwargs: Any) -> Sweep:
    """``instability`` at every rewind point ``{step: network}`` (modules, state dicts or checkpoint files such as
    ``integrations.lightning.RewindCheckpoints`` writes), judged as ``instability_sweep`` judges its points: the mean
    barrier over pairs per step, stable when below ``threshold`` and no endpoint is at chance, and the first stable
    step (the first below the threshold that stays below at every later step). ``train_fn`` may take the ``step``
    (``train_fn(model, noise_seed, step)``) to train the remaining steps with the schedule from there.

    >>> result = stability.lmc.sweep({0: "ckpt/step_0.safetensors", 100: ...}, my_train, data=test_loader,
    ...                              template=net)
    >>> result.first_stable_step
    """
    if not points:
        raise ConfigError("points: give at least one rewind point {step: network}")
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold: must be in (0, 1) (a fraction of examples), got {threshold}")
    steps = sorted(int(k) for k in points)
    results = {}
    rows: list[dict[str, Any]] = []
    chance = None
    for k in steps:
        result = instability(points[k], train_fn, siblings, noise_seeds, data=data, template=template,
                             chance_margin=chance_margin, step=k, **kwargs)
        results[k] = result
        rows += result.rows(k, split)
        chance = next(iter(result.curves.values())).chance
    chances = {split: chance} if chance is not None else None
    if chances:
        flag_curves(rows, chances, chance_margin)
    table = sweep_table(rows, threshold, chance=chances, margin=chance_margin)
    first = first_stable_step([r["rewind_step"] for r in table], [r["instability_mean"] for r in table], threshold,
                              [r["status"] for r in table])
    return Sweep(table, rows, first, threshold, results)
