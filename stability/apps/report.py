"""What each ``stability`` command prints: tables and lines for people, JSON for programs.

Results go to stdout, warnings to stderr. The printers take the result objects the stages return
and compute nothing that is not already in them.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any


def print_json(data: Any) -> None:
    """A result as indented JSON (values JSON cannot hold, such as paths, as text)."""
    print(json.dumps(data, indent=2, default=str))


def warn(text: str) -> None:
    """One warning line on stderr."""
    print(f"warning: {text}", file=sys.stderr)


def presets(table: dict[str, dict[str, Any]]) -> None:
    """``stability presets``: each name and its description."""
    width = max(len(n) for n in table)
    for name, tables in table.items():
        print(f"{name:<{width}}  {tables.get('description', '')}")


def train(summary: dict[str, Any], reused: bool) -> None:
    """``stability train``: the run, its final accuracy and checkpoints (and the method's own figures)."""
    if reused:
        print(f"already complete: nothing to do; results are in {summary['run_dir']}")
    print(f"run directory       {summary['run_dir']}")
    print(f"final step          {summary['final_step']}it")
    print(f"final test accuracy {summary['final_test_accuracy']:.4f}")
    print(f"rewind checkpoints  {', '.join(summary['checkpoints'])}")
    if summary.get("mask_density") is not None:  # strong tickets: the evaluation mask's density
        print(f"mask density        {summary['mask_density']:.4f} ({summary['method']}: weights the evaluation keeps)")
    if summary.get("neq", {}).get("evaluations"):  # training.method = neq
        neq = summary["neq"]
        print(f"NEq                 {neq['evaluations']} evaluations; frozen neurons {neq['mean_frozen_fraction']:.2%} "
              f"on average ({neq['final_frozen_fraction']:.2%} at the last); backward FLOPs saved "
              f"{neq['backward_flops_saved_fraction']:.2%}")
    print(f"time                {summary['seconds']:.1f} s")
    if summary["untrained"]:
        print(f"warning: the final test error is within {summary['chance_margin']} of chance "
              f"({summary['chance_test_error']:.3f}): the network did not learn", file=sys.stderr)


def instability(result: Any, settings: Any) -> None:
    """``stability instability``: one row per rewind point and split, and the first stable step."""
    from ..steps import point_name

    print(f"instability sweep: {settings.siblings.siblings} siblings, noise={settings.siblings.noise}, "
          f"bn={settings.curve.bn}, {len(settings.curve.grid())} alphas, threshold {settings.threshold}, "
          f"alignment {settings.curve.alignment()}")
    print(f"{'rewind':>11} {'split':>6} {'instability':>14} {'loss barrier':>14} {'stable':>7} {'status':>9}")
    for row in result.table:
        print(f"{point_name(row['rewind_step']):>11} {row['split']:>6} "
              f"{row['instability_mean']:>7.4f}±{row['instability_std']:<6.4f}"
              f" {row['loss_barrier_mean']:>7.4f}±{row['loss_barrier_std']:<6.4f} {row['stable']!s:>7}"
              f" {row['status']:>9}")
    for split, step in result.first_stable_step_by_split.items():
        shown = f"{step}it" if step is not None else "none (not stable at any swept step)"
        print(f"first stable step ({split}): {shown}")
    print(f"results: {result.run_dir}")
    for warning in result.summary["warnings"]:
        warn(warning)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def imp(result: Any, settings: Any) -> None:
    """``stability imp``: one row per replicate, level and kind, then the ticket summary and the flagged rows."""
    info = result.summary["rewind"]
    how = f" (auto: first stable step {info.get('first_stable_step')})" if info.get("rewind") == "auto" else ""
    print(f"IMP: {settings.levels} levels, {settings.strategy} pruning {settings.prune_fraction:.0%} per level, "
          f"rewind to {result.rewind_step}it{how}")
    source = result.summary.get("mask_source", "own")
    print(f"criterion {settings.criterion if source == 'own' else '-'}, mask-1 {settings.mask1}, mask-0 {settings.mask0}, "
          f"masks {'found here' if source == 'own' else 'from ' + str(source.get('run_dir'))}")
    print(f"{'rep':>3} {'level':>5} {'kind':>7} {'density':>8} {'final acc':>9} {'early-stop acc':>14} {'at':>7} "
          f"{'instability':>11} {'status':>9} {'updated':>7} {'untrained':>9}")
    for row in result.levels:
        print(f"{row['replicate']:>3} {row['level']:>5} {row['kind']:>7} {row['density']:>8.4f} "
              f"{row['final_test_accuracy']:>9.4f} {row['early_stop_test_accuracy']:>14.4f} "
              f"{row['early_stop_step']:>5}it {_number(row['instability']):>11} {row.get('status', 'ok'):>9} "
              f"{_number(row.get('updated_fraction')):>7} {_number(row.get('supermask_test_accuracy')):>9}")
    tickets = result.summary["tickets"]
    agg = tickets["aggregate"]
    print(f"dense accuracy {tickets['dense_accuracy']:.4f}, matching tolerance {tickets['tolerance']:.4f}")
    for key, label in (("best_sparse", "best sparse"), ("sparsest_matching", "sparsest matching")):
        point = agg.get(key)
        if point is None:
            print(f"{label:<18} none")
        else:
            print(f"{label:<18} level {point['level']} density {point['density']:.4f} accuracy {point['accuracy']:.4f} "
                  f"A_gain {point['a_gain']:+.2f}% LTS {point['lts_score']:.1f}")
    print(f"success rate {tickets['success_rate']:.0f}%  matching levels {agg['matching_levels']}")
    print(f"results: {result.run_dir}")
    for item in result.summary.get("flagged", []):
        what = ("diverged: no result" if item["status"] == "diverged" else
                "untrained (accuracy within the chance margin): never matching")
        warn(f"replicate {item['replicate']} level {item['level']} {item['kind']}: {what}")


def hessian(track: Any, where: str) -> None:
    """``stability hessian``: one row per probed point (``where``: ``step``, ``alpha``, or ``network``: a file's
    digest)."""
    keys = [k for k in track.rows[0] if k.startswith("lambda_") and k != "lambda_min"] if track.rows else []
    cols = keys + ["lambda_min", "trace", "trace_stderr", "n_hvp", "seconds"]
    labels = [f"{row[where]}it" if where == "step" else f"{row[where]:.3f}" if where == "alpha" else str(row[where])
              for row in track.rows]
    width = max([8, *map(len, labels)])
    print(f"{where:>{width}} " + " ".join(f"{c:>12}" for c in cols))
    for row, label in zip(track.rows, labels):
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{v:>12.5g}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>12}")
        print(f"{label:>{width}} " + " ".join(cells))
    print(f"results: {track.run_dir}")


def connect(result: Any, settings: Any) -> None:
    """``stability connect``: the two ends, and the error and loss barrier per split."""
    print(f"a: {result.summary['a']}")
    print(f"b: {result.summary['b']}")
    print(f"alignment {result.summary['alignment']}, {settings.curve.alphas} alphas")
    for split, barrier in result.barriers.items():
        print(f"{split:>6}: error barrier {barrier:.4f}, loss barrier {result.loss_barriers[split]:.4f}")
    print(f"results: {result.run_dir}")
    for split in result.summary["untrained"]:
        warn(f"{split}: an endpoint's error is near chance: the barrier is not a result")


def grid(result: Any, grid_hash: str) -> None:
    """``stability grid``: what ran, then one row per grid point and stage; failures on stderr."""
    frame = result.dataframe()
    print(f"grid {grid_hash}: {len(result.outcomes)} units run, {len(result.skipped)} already complete, "
          f"{len(result.failed)} failed, {len(result.blocked)} blocked by a failed dependency")
    print(frame.drop(columns=[c for c in frame.columns if c.endswith(("_dir", "_dirs"))]).to_string(index=False))
    for uid in result.failed:
        print(f"failed: {uid}: {result.outcomes[uid]['error']}", file=sys.stderr)
    if result.failed or result.blocked:
        print("rerun the same command to run what is missing (see `stability status`)", file=sys.stderr)


def status(grids: list[dict[str, Any]], root: str) -> None:
    """``stability status``: per grid, how many units of each kind are in each state; failed and running ones."""
    if not grids:
        print(f"no grid has been planned under {root} (run `stability grid GRID.toml` first)")
        return
    for g in grids:
        states: dict[str, dict[str, int]] = {}
        for u in g["units"]:
            states.setdefault(u["kind"], {}).setdefault(u["state"], 0)
            states[u["kind"]][u["state"]] += 1
        print(f"grid {g['grid']} ({g['plan']})")
        for kind, counts in states.items():
            print(f"  {kind:<12} " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
        for u in g["units"]:
            if u["state"] == "failed":
                print(f"  failed  {u['id']} {u['point']}: {u['error']}")
            elif u["state"] == "running":
                print(f"  running {u['id']} (pid {u['holder']['pid']} on {u['holder']['host']})")


def earlybird(result: Any) -> None:
    """``stability earlybird``: the mask distances, the early-bird step and the ticket against IMP's cost."""
    s = result.summary
    if result.reused:
        print(f"already complete: nothing to do; results are in {result.run_dir}")
    print(f"early-bird search: {s['mask']} masks at density {s['target_density']:.4f}, threshold {s['threshold']}, "
          f"window {s['window']} ({s['rule']} distances), {len(result.steps)} mask points every {s['every']}it")
    print(f"{'step':>9} {'distance':>9} {'window max':>10}")
    for row in result.points:
        cells = [f"{row[k]:.4f}" if isinstance(row[k], float) else "-" for k in ("distance_previous", "window_max")]
        mark = "  <- early bird" if row["detected"] is True else ""
        print(f"{row['step']:>7}it {cells[0]:>9} {cells[1]:>10}{mark}")
    if not s["detected"]:
        print(s["note"])
        print(f"dense trunk test accuracy {s['dense_final_test_accuracy']:.4f}")
        print(f"results: {result.run_dir}")
        return
    ticket, cost = s["ticket"], s["cost"]
    print(f"early-bird step: {s['detected_step']}it")
    extra = f", channels {ticket['channel_density']:.4f}" if "channel_density" in ticket else ""
    print(f"ticket: weight density {ticket['weight_density']:.4f}{extra}; rewound to {ticket['rewind_step']}it, "
          f"trained to {s['final_step']}it")
    print(f"test accuracy: ticket {ticket['final_test_accuracy']:.4f} (early stop {ticket['early_stop_test_accuracy']:.4f} "
          f"at {ticket['early_stop_step']}it), dense trunk {s['dense_final_test_accuracy']:.4f}")
    if ticket.get("status") == "untrained":
        print("warning: the ticket's final test error is within the chance margin of chance: it did not learn, "
              "and its accuracy is not a result", file=sys.stderr)
    print(f"iterations: early bird {cost['early_bird_iterations']} ({cost['search_iterations']} to draw + "
          f"{cost['ticket_iterations']} to train the ticket) vs IMP {cost['imp_iterations']} (dense + "
          f"{cost['imp_levels']} level{'s' if cost['imp_levels'] != 1 else ''} at prune fraction {cost['prune_fraction']} to density "
          f"{cost['imp_density']:.4f}); IMP / early bird = {cost['imp_over_early_bird']:.2f}")
    print(f"results: {result.run_dir}")
