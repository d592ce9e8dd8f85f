"""The rows of ``levels.csv``: one builder for every row (a diverged network's too), and what a row measures
beyond training's own metrics (trajectory length, a supermask's accuracy, a sparse network's instability)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from ...config import Config
from ...engine import Members, StackedModel
from ...maths.health import is_untrained
from ...maths.metrics import trajectory_length
from ...steps import format_step
from ..context import Context
from ..instability import InstabilitySettings, instability_sweep

_NAN = float("nan")
# A diverged network has no accuracy (so it never matches and is never best) and no measurements.
_DIVERGED = {"final_test_accuracy": _NAN, "final_test_loss": _NAN, "early_stop_step": "",
             "early_stop_test_accuracy": _NAN, "early_stop_val_loss": _NAN, "trajectory_length": _NAN,
             "instability": ""}


@dataclass(frozen=True)
class RowHead:
    """What every row of one replicate shares, and how its networks are judged against chance."""

    replicate: int
    rewind_step: int
    chance: float  # the test split's chance error
    margin: float  # imp.chance_margin

    def status(self, row: Mapping[str, Any]) -> str:
        """ok, or untrained when the final test error is within the margin of chance."""
        return "untrained" if is_untrained(1 - row["final_test_accuracy"], self.chance, self.margin) else "ok"


def level_row(head: RowHead, level: int, kind: str, density: float,
              measured: Mapping[str, Any] | None) -> dict[str, Any]:
    """One row of ``levels.csv``, its status last; ``measured`` None: the network diverged."""
    row = {"replicate": head.replicate, "level": level, "kind": kind, "density": density,
           "rewind_step": head.rewind_step}
    if measured is None:
        return {**row, **_DIVERGED, "status": "diverged"}
    row.update(measured)
    row["status"] = head.status(row)
    return row


def trajectory(ctx: Context, state: Mapping[str, Tensor]) -> float:
    """Trajectory length of the network's logits on a circle through two fixed test inputs."""
    model = ctx.new_model()
    model.load_state_dict(dict(state))
    model.eval()
    x = ctx.data.x_test
    return trajectory_length(model, x[0], x[1], n_points=500)


def untrained_accuracy(ctx: Context, start: Members, masks: Mapping[str, Tensor] | None) -> float:
    """Test accuracy of the ticket's start state under its mask, before any training (a supermask's).

    ``masks`` None: the start state as it is (frozen removed weights: the network that is trained)."""
    sm = StackedModel(ctx.model).configure_evaluation(ctx.cfg.runtime)  # runtime.eval_precision
    params = {k: v * masks[k].to(v) if masks and k in masks else v for k, v in start.params.items()}
    x, y = ctx.data.split("test")
    _, err = sm.evaluate(params, start.buffers, x, y, ctx.cfg.runtime.eval_batch_size)
    return 1.0 - float(err[0])


def sparse_instability(cfg: Config, ctx: Context, sweep: InstabilitySettings, start: Members,
                       masks: Mapping[str, Tensor] | None, step: int, label: str, freeze: bool = False) -> float:
    """Mean test-error barrier of siblings of the (sparse) network rewound to ``step``."""
    settings = replace(sweep, rewind_points=(format_step(step),), splits=("test",))
    if masks is None:
        result = instability_sweep(cfg, settings, ctx=ctx)
    else:
        result = instability_sweep(cfg, settings, ctx=ctx, masks=masks, start_states={step: start}, label=label,
                                   freeze=freeze)
    return result.table[0]["instability_mean"]


__all__ = ["RowHead", "level_row", "sparse_instability", "trajectory", "untrained_accuracy"]
