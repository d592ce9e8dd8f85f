"""The demo's landscape section: planes through the LeNet-5 trunk and two of its siblings, unstable (rewind step
0) and stable (the sweep's first stable step), and Bezier curves between siblings at step 0 and between
independently trained networks of both presets, with the line's barriers beside the curve's.

The siblings and the independent networks are the instability sweeps' (reused, not retrained); each plane and
each curve is a record of its own (``plane_<hash>``, ``curve_<hash>``), reused by a rerun.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..stages.curve import CurveSweep, curve_settings, curve_sweep
from ..stages.instability import SweepResult
from ..stages.plane import PlaneResult, plane_settings, plane_siblings
from ..steps import INDEPENDENT, INDEPENDENT_STEP, point_name

__all__ = ["landscape_jobs", "landscape_lines"]


def _stable_point(sweep: SweepResult) -> int | None:
    """The sweep's first stable step when it is after 0; else its last point (the most stable it measured)."""
    fss = sweep.first_stable_step
    if fss not in (None, 0):
        return fss
    later = [k for k in sweep.rewind_steps if k > 0]
    return later[-1] if later else None


def landscape_jobs(configs: dict[str, Any], sweeps: dict[str, SweepResult], sweep_settings: dict[str, Any],
                   plane_grid: int, curve_steps: str, curve_points: int, stage: Any) -> dict[str, Any]:
    """Planes of ``lenet5_mnist5k`` at step 0 and at its stable point; curves at ``independent`` and 0 for both."""
    out: dict[str, Any] = {"planes": {}, "curves": {}}
    conv = "lenet5_mnist5k"
    if conv in sweeps:
        siblings = sweep_settings[conv].siblings
        grid = plane_settings(grid=plane_grid, splits=["test"])
        points = [0] + [k for k in (_stable_point(sweeps[conv]),) if k is not None]
        for k in points:
            with stage(f"{conv}: loss plane through the trunk at {k}it and two of its siblings "
                       f"({plane_grid}x{plane_grid} grid)"):
                out["planes"][k] = plane_siblings(configs[conv], grid, k, siblings=siblings)
    fit = curve_settings(steps=curve_steps, points=curve_points, splits=["test"])
    for name in sweeps:
        base = sweep_settings[name]
        rewind = tuple(p for p in (INDEPENDENT, "0it") if p in base.rewind_points or p == "0it")
        with stage(f"{name}: Bezier curves between the networks of {', '.join(rewind)} ({curve_steps})"):
            out["curves"][name] = curve_sweep(configs[name], fit, replace(base, rewind_points=rewind, splits=("test",)))
    return out


def landscape_lines(landscape: dict[str, Any], rel: Any) -> list[str]:
    """summary.md's section: the planes' records and the barriers of each line and curve."""
    lines = ["## Planes and curves", "",
             ("Bezier curves (Garipov et al. 2018): the middle point trained on the training loss with t drawn "
              "uniformly per step, the ends fixed, BatchNorm statistics recomputed along the curve. The line is "
              "measured on the curve's t grid. Test error barrier (and loss barrier)."), ""]
    rows = []
    for name, result in landscape.get("curves", {}).items():
        result: CurveSweep
        for r in result.table:
            rows.append({"network": name, "pair": "independent" if r["rewind_step"] == INDEPENDENT_STEP
                         else f"siblings at {point_name(r['rewind_step'])}",
                         "line": r["line_barrier"], "curve": r["curve_barrier"],
                         "line_loss": r["line_loss_barrier"], "curve_loss": r["curve_loss_barrier"], "run": r["run"]})
    head = "| network | pair | line | curve | line loss | curve loss | record |\n|---|---|---|---|---|---|---|\n"
    lines.append(head + "".join(f"| {r['network']} | {r['pair']} | {r['line']:.4f} | {r['curve']:.4f} | "
                                f"{r['line_loss']:.4f} | {r['curve_loss']:.4f} | `{r['run']}` |\n" for r in rows))
    planes: dict[int, PlaneResult] = landscape.get("planes", {})
    if planes:
        lines += [("Loss planes of lenet5_mnist5k through sibling 0 (origin), sibling 1 (on the u axis) and the "
                   "trunk at the rewind step, test error and loss on a grid around the three:"), ""]
        for k, plane in planes.items():
            grid = [r for r in plane.rows if r["split"] == "test"]
            worst = max(r["error"] for r in grid) if grid else float("nan")
            lines.append(f"- rewind {point_name(k)}: `{rel(plane.run_dir)}` ({len(grid)} grid points, highest test "
                         f"error on the grid {worst:.4f})")
        lines.append("")
    return lines

