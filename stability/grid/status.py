"""What a grid has done, read from disk: the per-point table, every unit's state, the printed plan."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import RecordError
from ..store.files import RunDir, read_json
from ..store.schema import (
    GRIDS,
    HESSIAN,
    IMP,
    IMP_SUMMARY,
    INSTABILITY,
    INSTABILITY_SUMMARY,
    PLAN,
    SUMMARY,
    TRAIN,
    failure_name,
)
from .plan import WAVES, Plan, Unit

__all__ = ["grid_frame", "grid_status", "print_plan"]


def grid_frame(plan: Plan):
    """One row per grid point: its axis values and each stage's headline results (from the records)."""
    import pandas as pd

    from ..steps import point_name

    root = plan.grid.root
    rows = []
    by_point: dict[str, list[Unit]] = {}
    for unit in plan.units:
        by_point.setdefault(json.dumps(unit.point, sort_keys=True), []).append(unit)
    for key, units in by_point.items():
        row: dict[str, Any] = dict(json.loads(key))
        for unit in units:
            run = unit.run_dir(root)
            status = run.status() or "missing"
            if unit.kind == TRAIN and "independent_of" in unit.args:
                continue  # another seed's network for the independent point, not this point's trunk
            if unit.kind == TRAIN:
                row["train_status"] = status
                summary = _maybe_json(run / SUMMARY)
                row["final_test_accuracy"] = summary.get("final_test_accuracy", math.nan)
            elif unit.kind == INSTABILITY:
                row["instability_status"] = status
                summary = _maybe_json(run / INSTABILITY_SUMMARY)
                row["first_stable_step"] = summary.get("first_stable_step")
                for point in summary.get("per_split", {}).get(summary.get("primary_split", "test"), []):
                    row[f"instability@{point_name(point['rewind_step'])}"] = point["instability_mean"]
            elif unit.kind == IMP:
                row["imp_status"] = status
                summary = _maybe_json(run / IMP_SUMMARY)
                tickets = summary.get("tickets", {})
                row["success_rate"] = tickets.get("success_rate", math.nan)
                sparsest = (tickets.get("aggregate") or {}).get("sparsest_matching") or {}
                row["sparsest_matching_density"] = sparsest.get("density", math.nan)
            elif unit.kind == HESSIAN:
                row["hessian_status"] = status
            if unit.kind == "siblings":
                row.setdefault("siblings_dirs", []).append(str(run.path))
            else:
                row[f"{unit.kind}_dir"] = str(run.path)
        rows.append(row)
    return pd.DataFrame(rows)



def _maybe_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path) if path.is_file() else {}
    except RecordError:  # a damaged summary shows as missing values in the table (status says why)
        return {}



def grid_status(root: str | Path) -> list[dict[str, Any]]:
    """Every grid planned under ``root``: each unit's state on disk and the failure message of failed ones."""
    from ..store.lock import live_holder

    root = Path(root)
    out = []
    for plan_path in sorted((root / GRIDS).glob(f"*/{PLAN}")):
        plan = read_json(plan_path)
        failures = plan_path.parent
        units = []
        for u in plan["units"]:
            kind, _, run_hash = u["id"].rpartition("_")
            run = RunDir(root, kind, run_hash)
            status = run.status()
            lock = live_holder(run.path) if run.path.is_dir() else None  # a dead holder's lock: interrupted
            failure_path = failures / failure_name(u["id"])
            if status in ("complete", "diverged"):
                state = status
            elif lock:
                state = "running"
            elif failure_path.is_file():
                state = "failed"
            else:
                state = "missing" if status is None else "interrupted"
            entry = {"id": u["id"], "kind": u["kind"], "point": u["point"], "state": state}
            if state == "failed":
                entry["error"] = read_json(failure_path).get("error")
            if lock:
                entry["holder"] = {k: lock.get(k) for k in ("pid", "host", "started")}
            units.append(entry)
        out.append({"grid": plan["grid"], "plan": str(plan_path), "units": units})
    return out



# The rate print_plan turns FLOPs into GPU-hours at: an assumption (about a third of an A100's 312 TFLOP/s
# dense bf16 peak), printed beside the figure it gives.
GPU_RATE_FLOPS = 100e12


def print_plan(plan: Plan, file: Any = None) -> None:
    """Units per stage, what is complete, and the work they need (iterations, FLOPs)."""
    file = file or sys.stdout
    root = plan.grid.root
    print(f"grid {plan.grid.hash}: {len(plan.points)} points x stages {', '.join(plan.grid.stages) or '(trunks)'}; "
          f"results root {root}", file=file)
    print(f"{'stage':<12} {'units':>6} {'complete':>9} {'to run':>7} {'iterations':>12} {'TFLOPs':>9}", file=file)
    total_flops, total_iters = 0.0, 0
    for wave in WAVES:
        units = [u for u in plan.units if u.kind == wave]
        if not units:
            continue
        done = [u for u in units if u.run_dir(root).is_complete()]
        todo = [u for u in units if u not in done]
        iters = sum(u.iterations for u in todo)
        flops = sum(u.flops for u in todo)
        total_iters += iters
        total_flops += flops
        print(f"{wave:<12} {len(units):>6} {len(done):>9} {len(todo):>7} {iters:>12,} {flops / 1e12:>9.3f}", file=file)
    print(f"{'total':<12} {len(plan.units):>6} {'':>9} {'':>7} {total_iters:>12,} {total_flops / 1e12:>9.3f}",
          file=file)
    print(f"about {total_flops / GPU_RATE_FLOPS / 3600:,.1f} GPU-hours of arithmetic at a sustained "
          f"{GPU_RATE_FLOPS / 1e12:g} TFLOP/s (a stated rate, not a measurement: a lower bound, as small networks are "
          "bound by per-step overhead and data loading, which are not counted)", file=file)
