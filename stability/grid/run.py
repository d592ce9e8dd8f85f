"""Run a grid: every unit not complete on its results root, wave by wave, on an executor."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..store.files import write_json
from ..store.schema import FAILURES, failure_name
from .plan import WAVES, Grid, Plan, load_grid, make_plan
from .status import grid_frame

__all__ = ["GridResult", "run_grid"]


@dataclass
class GridResult:
    plan: Plan
    outcomes: dict[str, dict[str, Any]]  # unit id -> outcome (units run by this call)
    skipped: list[str]  # complete before this call
    blocked: list[str]  # not run: a dependency failed

    @property
    def failed(self) -> list[str]:
        return [i for i, o in self.outcomes.items() if o["status"] == "failed"]

    def dataframe(self):
        return grid_frame(self.plan)



def run_grid(grid: Grid | str | Path, executor: Any = "local", **executor_options: Any) -> GridResult:
    """Run every unit of a grid that is not complete on its results root, wave by wave.

    ``executor``: ``local`` | ``ray`` | ``slurm`` or an ``executors.Executor``. Returns the outcomes;
    ``GridResult.dataframe()`` is one row per grid point and stage with the results.
    """
    from .executors import make_executor

    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    plan = make_plan(grid)
    plan.save()
    runner = make_executor(executor, grid.resources, plan.folder, distributed=grid.base.runtime.distributed,
                           **executor_options) \
        if isinstance(executor, str) else executor
    failures = plan.folder / FAILURES
    outcomes: dict[str, dict[str, Any]] = {}
    skipped, blocked = [], []
    try:
        for wave in WAVES:
            todo = []
            for unit in (u for u in plan.units if u.kind == wave):
                # settled: complete, or diverged (a result of its own; its dependents record it, e.g. a
                # sweep marks the point diverged, so they still run)
                if unit.run_dir(grid.root).status() in ("complete", "diverged"):
                    skipped.append(unit.id)
                elif any(outcomes.get(d, {}).get("status") == "failed" or d in blocked for d in unit.deps):
                    blocked.append(unit.id)
                else:
                    todo.append({**asdict(unit), "failures": str(failures)})
            if todo:
                for outcome in runner.run(todo):
                    outcomes[outcome["id"]] = outcome
                    record = plan.folder / failure_name(outcome["id"])
                    if outcome["status"] == "failed" and not record.is_file():
                        # the unit could not report itself (its worker or job died): record it here
                        write_json(record, {**outcome, "traceback": None, "time": time.time()})
    finally:
        runner.close()
    return GridResult(plan, outcomes, skipped, blocked)
