"""The stages a grid plans, by run kind, and what a unit of each costs (iterations, FLOPs).

The planner knows no stage's rules: it walks ``Stage.needs`` from the stages a grid asks for (see
``plan.make_plan``). What it adds is the size of the work, for executors and ``--dry-run``: training
iterations summed over members and estimated forward + backward FLOPs (3 x forward per trained example,
4 x forward per Hessian-vector product, forward only for evaluation and interpolation curves).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config.nested import flat_settings
from ..maths.flops import layer_costs
from ..stages.base import Stage
from ..stages.context import Context
from ..stages.imp import IMP_STAGE, resolve_rewind_step
from ..stages.instability import SWEEP_STAGE, sweep_steps
from ..stages.landscape import TRACK_STAGE, track_steps
from ..stages.siblings import SIBLINGS_STAGE
from ..stages.trunk import TRUNK_STAGE
from ..steps import to_iterations
from ..store.schema import HESSIAN, IMP, INSTABILITY, SIBLINGS, TRAIN

__all__ = ["GRID_STAGES", "flops_per_example", "unit_args", "unit_cost"]

# run kind -> the stage that makes its runs (a grid's Hessian units are tracks of the trunk)
GRID_STAGES: dict[str, Stage] = {TRAIN: TRUNK_STAGE, SIBLINGS: SIBLINGS_STAGE, INSTABILITY: SWEEP_STAGE,
                                 IMP: IMP_STAGE, HESSIAN: TRACK_STAGE}


def unit_args(settings: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's settings and arguments as a unit ships them (JSON-able: settings as their flat tables)."""
    out = {} if settings is None else {"settings": flat_settings(settings)}
    for name, value in args.items():
        out[name] = flat_settings(value) if hasattr(value, "__dataclass_fields__") else value
    return out


def flops_per_example(ctx: Context) -> float:
    """Forward FLOPs (2 x multiply-adds) of one example through the model's linear and convolution layers."""
    return 2.0 * sum(c.forward for c in layer_costs(ctx.new_model(), ctx.data.input_shape))


def unit_cost(kind: str, ctx: Context, flops: float, settings: Any, args: Mapping[str, Any]) -> tuple[int, float]:
    """(training iterations summed over members, estimated FLOPs) of one unit; ``flops``: per example forward."""
    B, T = ctx.cfg.training.batch_size, ctx.total_steps
    if kind == TRAIN:
        return T, 3 * flops * B * T + _eval_flops(ctx, flops, T)
    if kind == SIBLINGS:
        iters = settings.siblings * (T - args["rewind_step"])
        return iters, 3 * flops * B * iters
    if kind == INSTABILITY:
        n = settings.siblings.siblings
        examples = sum(len(ctx.data.split(s)[1]) for s in settings.splits)
        curves = n * (n - 1) // 2 * len(sweep_steps(ctx, settings, sparse=False))
        return 0, flops * len(settings.curve.grid()) * curves * examples
    if kind == IMP:
        rewind = 0 if settings.rewind == "auto" else resolve_rewind_step(ctx, settings)
        iters = settings.replicates * settings.levels * (1 + len(settings.baselines)) * (T - rewind)
        return iters, 3 * flops * B * iters
    if kind == HESSIAN:
        at = args.get("at", "all")
        steps = track_steps(ctx, at if isinstance(at, str) else list(at), args.get("every"))
        hvps = len(steps) * (max(settings.lanczos_steps, 2 * settings.top_k + 20) * bool(settings.top_k)
                             + settings.trace_probes + settings.density_steps * settings.density)
        return 0, 4 * flops * min(settings.samples, ctx.data.n_train) * hvps
    raise ValueError(f"no cost model for run kind {kind!r}")


def _eval_flops(ctx: Context, flops: float, T: int) -> float:
    """Forward FLOPs of a trunk's evaluations (every ``eval_every`` steps, the first and the last)."""
    evals = T // max(to_iterations(ctx.cfg.training.eval_every, ctx.ipe), 1) + 2
    n = ctx.data.n_train + len(ctx.data.split("val")[1]) + len(ctx.data.split("test")[1])
    return flops * n * evals
