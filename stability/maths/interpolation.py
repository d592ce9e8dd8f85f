"""Linear interpolation between trained networks, and the barrier (instability) formulas.

θ(α) = (1 − α)·θ_a + α·θ_b for α on a grid that includes 0 and 1. Only parameters
are interpolated; BatchNorm running statistics follow the ``bn`` option:
``interpolate`` (the buffers too, as open_lth's instability analysis does, so
results are comparable with Frankle et al. 2020; the default) or ``reset``
(recomputed for each θ(α) in train mode with a cumulative average over a fixed,
seeded set of training batches, as REPAIR and dnn-mode-connectivity do).
The whole α grid is evaluated as stacked members in one batched pass.

Before interpolating, sibling b can be aligned to sibling a (``align``: ``weights`` = Git Re-Basin's
weight matching, ``activations`` = activation matching on a fixed, seeded subset of training data;
see ``stability.align``), and each θ(α) can be renormalized by REPAIR (``repair``), whose BatchNorm
statistics then replace the ``bn`` option's. The default (``none``, no REPAIR) is Frankle et al.'s
plain interpolation.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor, nn

from ..engine import Members, StackedModel
from ..errors import ConfigError
from .paths import Batches, evaluate_pairs, evaluate_stream, reset_bn

BN_MODES = ("interpolate", "reset")
ALIGN_METHODS = ("none", "weights", "activations")


@dataclass(frozen=True)
class CurveSettings:
    """How interpolation curves are measured (held by a sweep's and a connect run's settings, whose tables name
    these fields flat: ``instability.alphas``, ``connect.align``)."""

    alphas: int = 30  # evenly spaced values in [0, 1], both ends included
    alpha_grid: tuple[float, ...] = ()  # explicit grid (overrides alphas); must include 0 and 1
    bn: str = "interpolate"  # interpolate | reset
    bn_batches: int = 20  # training batches for recomputing BatchNorm statistics (bn = reset)
    align: str = "none"  # none | weights | activations: permute sibling b's hidden units to match a's first
    repair: bool = False  # REPAIR every θ(α) (Jordan et al. 2023)
    align_examples: int = 1000  # training examples (fixed, seeded subset) for activation matching and REPAIR
    align_seed: int = 0  # seeds weight matching's order and the subset
    bn_batch_size: int = 128
    bn_seed: int = 0
    eval_batch_size: int = 1000
    max_members: int = 64  # α values evaluated at once (memory bound)

    # Not settings of a stage (``config.nested``): fixed, or (eval_batch_size) the run's runtime.eval_batch_size.
    FIXED = ("bn_batch_size", "bn_seed", "eval_batch_size", "max_members")

    def grid(self, section: str = "instability") -> list[float]:
        """The α grid, checked (errors name ``section.alphas``: the table these settings were read from)."""
        if self.alpha_grid:
            grid = [float(a) for a in self.alpha_grid]
            if sorted(grid) != grid or grid[0] != 0.0 or grid[-1] != 1.0 or any(not 0 <= a <= 1 for a in grid):
                raise ConfigError(f"{section}.alphas: the α grid must be increasing in [0, 1] and include both ends "
                                  f"0 and 1, got {grid}")
            return grid
        if self.alphas < 2:
            raise ConfigError(f"{section}.alphas: need at least 2 values (both ends 0 and 1), got {self.alphas}")
        return torch.linspace(0, 1, self.alphas, dtype=torch.float64).tolist()

    def validate(self, section: str = "instability") -> CurveSettings:
        """Check every field; errors name ``section.<field>`` (the table these settings were read from)."""
        self.grid(section)
        if self.bn not in BN_MODES:
            raise ConfigError(f"{section}.bn: unknown mode {self.bn!r}; choose one of {', '.join(BN_MODES)}")
        if self.align not in ALIGN_METHODS:
            raise ConfigError(f"{section}.align: unknown method {self.align!r}; choose one of "
                              f"{', '.join(ALIGN_METHODS)}")
        if not isinstance(self.repair, bool):
            raise ConfigError(f"{section}.repair: must be true or false, got {self.repair!r}")
        if self.bn_batches < 1:
            raise ConfigError(f"{section}.bn_batches: must be at least 1 (training batches for BatchNorm "
                              f"statistics), got {self.bn_batches}")
        if self.align_examples < 1:
            raise ConfigError(f"{section}.align_examples: must be at least 1 training example, got "
                              f"{self.align_examples}")
        return self

    @property
    def aligned(self) -> bool:
        """Whether pairs are aligned or repaired before their curves are measured."""
        return self.align != "none" or self.repair

    @property
    def needs_align_subset(self) -> bool:
        """Whether the training subset of ``alignment_subset`` is used (activation matching, REPAIR)."""
        return self.align == "activations" or self.repair

    def alignment(self) -> str:
        """'none', 'weights', 'activations', or one of them followed by '+repair'."""
        return self.align + ("+repair" if self.repair else "")


def error_barrier(values: Sequence[float]) -> float:
    """max_α v(α) − ½·(v(0) + v(1)) for values along a grid whose ends are α = 0 and α = 1."""
    values = list(values)
    return max(values) - 0.5 * (values[0] + values[-1])


def interpolate_stacks(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alphas: Tensor) -> dict[str, Tensor]:
    """Stacked θ(α) for every α: ``{name: [A, ...]}`` from two unstacked tensor dicts."""
    out = {}
    for k, va in a.items():
        vb = b[k]
        if not va.is_floating_point():
            out[k] = va.expand(len(alphas), *va.shape).clone()
            continue
        w = alphas.to(va.dtype).view(-1, *([1] * va.dim()))
        out[k] = (1 - w) * va + w * vb
    return out


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def seeded_bn_batches(x_train: Tensor, settings: CurveSettings) -> list[tuple[Tensor, Tensor]]:
    """The ``bn_batches`` fixed, seeded training batches (of ``bn_batch_size``, drawn with replacement across
    batches) that ``bn = reset`` recomputes BatchNorm statistics on; targets are not needed (empty)."""
    g = torch.Generator().manual_seed(settings.bn_seed)
    out = []
    for _ in range(settings.bn_batches):
        idx = torch.randint(len(x_train), (min(settings.bn_batch_size, len(x_train)),), generator=g)
        xb = x_train[idx.to(x_train.device)]  # a tensor, also when x_train is a streamed split
        out.append((xb, xb.new_zeros(0)))
    return out


@torch.no_grad()
def reset_bn_stats(sm: StackedModel, params: Mapping[str, Tensor], buffers: dict[str, Tensor], x_train: Tensor,
                   settings: CurveSettings) -> None:
    """Recompute BatchNorm running statistics in place for every stacked member on the seeded training batches
    (``paths.reset_bn``: cumulative average, momentum 1/(j+1) at batch j for every member)."""
    if _bn_modules(sm.model):
        reset_bn(sm, params, buffers, seeded_bn_batches(x_train, settings), max_members=settings.max_members)


def evaluate_path(sm: StackedModel, a: Mapping[str, Tensor], b: Mapping[str, Tensor], alphas: Sequence[float],
                  x: Tensor, y: Tensor, settings: CurveSettings, x_train: Tensor | None = None) -> tuple[list[float], list[float]]:
    """Error and loss of θ(α) at each α (``paths.evaluate_pairs``: every α stacked, one pass over the data)."""
    errs, losses = evaluate_curves(sm, [a, b], [(0, 1)], alphas, x, y, settings, x_train)
    return errs[0], losses[0]


def evaluate_curves(sm: StackedModel, ends: Sequence[Mapping[str, Tensor]], pairs: Sequence[tuple[int, int]],
                    alphas: Sequence[float], x: Tensor, y: Tensor, settings: CurveSettings,
                    x_train: Tensor | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """Errors and losses along the path of every pair (i, j) of ``ends``: all pairs' α stacked in one evaluation."""
    if settings.bn == "reset" and sm.buffer_names and x_train is None:
        raise ConfigError("instability.bn: 'reset' needs training data to recompute BatchNorm statistics")
    members = [(i, j, float(alpha)) for i, j in pairs for alpha in alphas]
    names = sm.param_names + sm.buffer_names
    ends = [{k: e[k] for k in names} for e in ends]
    bn_batches = seeded_bn_batches(x_train, settings) if settings.bn == "reset" and x_train is not None else None
    losses, errs = evaluate_pairs(sm, ends, members, Batches((x, y), settings.eval_batch_size), bn=settings.bn,
                                  bn_batches=bn_batches, max_members=settings.max_members)
    n = len(alphas)
    return ([errs[p * n:(p + 1) * n] for p in range(len(pairs))], [losses[p * n:(p + 1) * n] for p in range(len(pairs))])


def alignment_subset(x_train: Tensor, settings: CurveSettings) -> Tensor:
    """The fixed, seeded training inputs that activation matching and REPAIR measure units on."""
    g = torch.Generator().manual_seed(settings.align_seed)
    n = min(settings.align_examples, len(x_train))
    idx = torch.randperm(len(x_train), generator=g)[:n].sort().values
    return x_train[idx.to(x_train.device)]


def align_pair(model: nn.Module, a: Mapping[str, Tensor], b: Mapping[str, Tensor], settings: CurveSettings,
               x_align: Tensor | None) -> dict[str, Tensor]:
    """Network b with its hidden units permuted to match a's (``settings.align``; ``none`` = b as it is)."""
    from ..align import activation_matching, apply_permutation, permutation_spec, weight_matching

    if settings.align == "none":
        return dict(b)
    spec = permutation_spec(model)
    if settings.align == "weights":
        perms = weight_matching(spec, a, b, seed=settings.align_seed)
    else:
        assert x_align is not None
        perms = activation_matching(model, spec, a, b, x_align)
    return apply_permutation(spec, perms, b)


def repaired_path(sm: StackedModel, a: Mapping[str, Tensor], b: Mapping[str, Tensor], alphas: Sequence[float],
                  x_align: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stacked parameters and buffers of θ(α) after REPAIR, every α renormalized on its own.

    REPAIR's statistics come from ``x_align``, whichever split the path is then evaluated on (its
    BatchNorm reset replaces the ``bn`` option's).
    """
    from ..align import repair, repair_endpoints

    ends = repair_endpoints(sm.model, a, b, x_align)
    w = torch.tensor(list(alphas), dtype=torch.float64, device=x_align.device)
    mids = interpolate_stacks(a, b, w)
    states = [repair(sm.model, a, b, {k: v[j] for k, v in mids.items()}, float(alpha), x_align, endpoints=ends)
              for j, alpha in enumerate(alphas)]
    params = {k: torch.stack([st[k] for st in states]) for k in sm.param_names}
    buffers = {k: torch.stack([st[k] for st in states]) for k in sm.buffer_names}
    return params, buffers


def evaluate_stacked(sm: StackedModel, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor,
                     y: Tensor, settings: CurveSettings) -> tuple[list[float], list[float]]:
    """Error and loss of stacked networks ``{name: [A, ...]}`` (``paths.evaluate_stream``)."""
    losses, errs = evaluate_stream(sm, params, buffers, Batches((x, y), settings.eval_batch_size),
                                   max_members=settings.max_members)
    return errs, losses


def evaluate_aligned_path(sm: StackedModel, a: Mapping[str, Tensor], b: Mapping[str, Tensor], alphas: Sequence[float],
                          x: Tensor, y: Tensor, settings: CurveSettings, x_train: Tensor | None = None,
                          x_align: Tensor | None = None) -> tuple[list[float], list[float]]:
    """``evaluate_path`` after aligning b to a and, with ``repair``, REPAIR at every α."""
    if x_align is None and settings.needs_align_subset:
        if x_train is None:
            raise ConfigError("instability.align: activation matching and REPAIR need training data")
        x_align = alignment_subset(x_train, settings)
    b = align_pair(sm.model, a, b, settings, x_align)
    if not settings.repair:
        return evaluate_path(sm, a, b, alphas, x, y, settings, x_train)
    return evaluate_stacked(sm, *repaired_path(sm, a, b, alphas, x_align), x, y, settings)


def pairs(n: int) -> list[tuple[int, int]]:
    """Every unordered pair of n siblings."""
    return list(combinations(range(n), 2))


def curve_rows(sm: StackedModel, members: Members, splits: Iterable[str], data, settings: CurveSettings,
               rewind_step: int) -> list[dict]:
    """Rows (rewind_step, pair, split, alpha, error, loss) for every pair of members and split.

    Every pair's α grid is evaluated in one stacked pass per split (``evaluate_curves``); with REPAIR, pair by pair.
    """
    alphas = settings.grid()
    x_align = alignment_subset(data.x_train, settings) if settings.needs_align_subset else None
    splits = list(splits)
    ends = [members.member_state_dict(i) for i in range(members.n)]
    ends_of = {}
    repaired = {}
    for i, j in pairs(members.n):
        # aligned, and repaired, once per pair: the same networks are evaluated on every split
        b = align_pair(sm.model, ends[i], ends[j], settings, x_align) if settings.align != "none" else ends[j]
        if settings.repair:
            repaired[i, j] = repaired_path(sm, ends[i], b, alphas, x_align)
        elif b is not ends[j]:
            ends.append(b)
            ends_of[i, j] = (i, len(ends) - 1)
        else:
            ends_of[i, j] = (i, j)
    measured: dict[tuple[int, int, str], tuple[list[float], list[float]]] = {}
    for split in splits:
        x, y = data.split(split)
        if ends_of:
            keys = list(ends_of)
            errs, losses = evaluate_curves(sm, ends, [ends_of[k] for k in keys], alphas, x, y, settings, data.x_train)
            for k, e, loss in zip(keys, errs, losses):
                measured[(*k, split)] = (e, loss)
        for k, stacks in repaired.items():
            measured[(*k, split)] = evaluate_stacked(sm, *stacks, x, y, settings)
    rows = []
    for i, j in pairs(members.n):
        for split in splits:
            errs, losses = measured[i, j, split]
            for alpha, e, loss in zip(alphas, errs, losses):
                rows.append({"rewind_step": rewind_step, "pair": f"{i}-{j}", "split": split, "alpha": alpha,
                             "error": e, "loss": loss})
    return rows
