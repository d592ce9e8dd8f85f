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


@torch.no_grad()
def reset_bn_stats(sm: StackedModel, params: Mapping[str, Tensor], buffers: dict[str, Tensor], x_train: Tensor,
                   settings: CurveSettings) -> None:
    """Recompute BatchNorm running statistics in place for every stacked member.

    Cumulative average over ``bn_batches`` fixed, seeded batches: at batch j the momentum is
    1/(j+1), the same for all members, so no data-dependent Python runs under vmap.
    """
    bns = _bn_modules(sm.model)
    if not bns:
        return
    for name, buf in buffers.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_mean" or leaf == "num_batches_tracked":
            buf.zero_()
        elif leaf == "running_var":
            buf.fill_(1.0)
    g = torch.Generator().manual_seed(settings.bn_seed)
    old = [m.momentum for m in bns]
    try:
        for j in range(settings.bn_batches):
            idx = torch.randint(len(x_train), (min(settings.bn_batch_size, len(x_train)),), generator=g)
            for m in bns:
                m.momentum = 1.0 / (j + 1)
            sm.logits(params, buffers, x_train[idx.to(x_train.device)], train=True, shared_input=True)
    finally:
        for m, mom in zip(bns, old):
            m.momentum = mom


def evaluate_path(sm: StackedModel, a: Mapping[str, Tensor], b: Mapping[str, Tensor], alphas: Sequence[float],
                  x: Tensor, y: Tensor, settings: CurveSettings, x_train: Tensor | None = None) -> tuple[list[float], list[float]]:
    """Error and loss of θ(α) at each α (batched over α in chunks of ``max_members``)."""
    errors: list[float] = []
    losses: list[float] = []
    params_a = {k: a[k] for k in sm.param_names}
    params_b = {k: b[k] for k in sm.param_names}
    bufs_a = {k: a[k] for k in sm.buffer_names}
    bufs_b = {k: b[k] for k in sm.buffer_names}
    for start in range(0, len(alphas), settings.max_members):
        chunk = torch.tensor(alphas[start : start + settings.max_members], dtype=torch.float64, device=x.device)
        params = interpolate_stacks(params_a, params_b, chunk)
        buffers = interpolate_stacks(bufs_a, bufs_b, chunk)
        if settings.bn == "reset" and sm.buffer_names:
            if x_train is None:
                raise ConfigError("instability.bn: 'reset' needs training data to recompute BatchNorm statistics")
            reset_bn_stats(sm, params, buffers, x_train, settings)
        loss, err = sm.evaluate(params, buffers, x, y, settings.eval_batch_size)
        errors.extend(err.tolist())
        losses.extend(loss.tolist())
    return errors, losses


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
    """Error and loss of stacked networks ``{name: [A, ...]}``, in chunks of ``max_members``."""
    errors: list[float] = []
    losses: list[float] = []
    n = next(iter(params.values())).shape[0]
    for start in range(0, n, settings.max_members):
        part = slice(start, start + settings.max_members)
        loss, err = sm.evaluate({k: v[part] for k, v in params.items()}, {k: v[part] for k, v in buffers.items()},
                                x, y, settings.eval_batch_size)
        errors.extend(err.tolist())
        losses.extend(loss.tolist())
    return errors, losses


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
    """Rows (rewind_step, pair, split, alpha, error, loss) for every pair of members and split."""
    alphas = settings.grid()
    x_align = alignment_subset(data.x_train, settings) if settings.needs_align_subset else None
    rows = []
    for i, j in pairs(members.n):
        a, b = members.member_state_dict(i), members.member_state_dict(j)
        # aligned, and repaired, once per pair: the same networks are evaluated on every split
        b = align_pair(sm.model, a, b, settings, x_align)
        repaired = repaired_path(sm, a, b, alphas, x_align) if settings.repair else None
        for split in splits:
            x, y = data.split(split)
            if repaired is not None:
                errs, losses = evaluate_stacked(sm, *repaired, x, y, settings)
            else:
                errs, losses = evaluate_path(sm, a, b, alphas, x, y, settings, data.x_train)
            for alpha, e, loss in zip(alphas, errs, losses):
                rows.append({"rewind_step": rewind_step, "pair": f"{i}-{j}", "split": split, "alpha": alpha,
                             "error": e, "loss": loss})
    return rows
