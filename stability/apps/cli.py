"""The ``stability`` command: a thin layer over the same functions a notebook calls.

Bad input exits with code 2 and a message naming the setting; nothing is written.
"""
from __future__ import annotations

import os

# Two BLAS thread pools (torch's and OpenBLAS's) on a small machine halve speed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from ..config import STRONG_METHODS, Config, settings_help
from ..errors import ConfigError, StabilityError, TrainingDiverged

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1  # grid: some units failed (recorded for `stability status`; a rerun finishes them)
EXIT_DIVERGED = 3  # training went non-finite: recorded as diverged, never reported as a result


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """Config from CONFIG.toml or --preset, then --set, --out, --device, --threads, --quiet.

    Returns the run config and the stage tables (the preset's, overridden by the file's).
    """
    from ..presets import get_preset, load_toml, stage_tables

    preset = getattr(args, "preset", None)
    if args.config and preset:
        raise ConfigError("give either CONFIG.toml or --preset, not both")
    if args.config:
        cfg, extra = load_toml(args.config)
    elif preset:
        cfg, extra = get_preset(preset), stage_tables(preset)
    else:
        raise ConfigError("give a CONFIG.toml or --preset NAME (see `stability presets`)")
    overrides: dict[str, Any] = _parse_sets(args.set or [])
    if getattr(args, "out", None):
        overrides["runtime.results_root"] = args.out
    if getattr(args, "device", None):
        overrides["runtime.device"] = args.device
    if getattr(args, "threads", None) is not None:
        overrides["runtime.threads"] = str(args.threads)
    if getattr(args, "quiet", False):
        overrides["runtime.quiet"] = "true"
    if getattr(args, "plugin", None):
        overrides["runtime.plugins"] = list(args.plugin)
    return cfg.with_overrides(overrides), extra


def add_common(p: argparse.ArgumentParser) -> None:
    """CONFIG / --preset / --set / --out / --json and runtime flags, shared by the run commands."""
    p.add_argument("config", nargs="?", help="a TOML config file (or, for hessian, a train run directory; sections [dataset] [model] [optimizer] [schedule] [training] [runtime])")
    p.add_argument("--preset", help="start from a named preset (see `stability presets`)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--out", metavar="DIR", help="results root (default results/runs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    p.add_argument("--threads", type=int, help="torch threads (default: one per core, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import MODULE first: it registers models/datasets (stability.register_model, ...)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _help_epilog() -> str:
    return "settings (section.key = default):\n" + settings_help()


def cmd_presets(args: argparse.Namespace) -> int:
    from ..presets import PRESETS

    if args.json:
        print(json.dumps(PRESETS, indent=2))
        return 0
    width = max(len(n) for n in PRESETS)
    for name, tables in PRESETS.items():
        print(f"{name:<{width}}  {tables.get('description', '')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..stages.trunk import train_trunk

    cfg, _ = load_config(args)
    result = train_trunk(cfg)
    summary = result.summary
    if cfg.training.method in STRONG_METHODS:  # strong tickets: the evaluation mask's density
        from ..methods.strong import run_mask_density

        summary["mask_density"] = run_mask_density(result.run_dir)
        summary["method"] = cfg.training.method
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if result.reused:
        print(f"already complete: nothing to do; results are in {summary['run_dir']}")
    print(f"run directory       {summary['run_dir']}")
    print(f"final step          {summary['final_step']}it")
    print(f"final test accuracy {summary['final_test_accuracy']:.4f}")
    print(f"rewind checkpoints  {', '.join(summary['checkpoints'])}")
    if summary.get("mask_density") is not None:
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
    return 0


def cmd_instability(args: argparse.Namespace) -> int:
    from ..stages.instability import (
        checkpoint_points,
        instability_settings,
        instability_sweep,
        point_name,
    )

    cfg, extra = load_config(args)
    if args.rewind:
        # The swept points are the trunk's rewind points; they do not name the trunk run.
        cfg = cfg.with_overrides({"training.rewind_points": checkpoint_points(args.rewind)})
    settings = instability_settings(
        extra.get("instability"), rewind_points=args.rewind, siblings=args.siblings, bn=args.bn, alphas=args.alphas,
        splits=args.splits, threshold=args.threshold, noise=args.noise, optimizer_state=args.optimizer_state,
        sibling_seed=args.sibling_seed, align=args.align, repair=True if args.repair else None,
        align_examples=args.align_examples)
    result = instability_sweep(cfg, settings)
    if args.json:
        print(json.dumps(result.summary, indent=2))
        return 0
    print(f"instability sweep: {settings.siblings} siblings, noise={settings.noise}, bn={settings.bn}, "
          f"{len(settings.curve_settings().grid())} alphas, threshold {settings.threshold}, "
          f"alignment {settings.alignment()}")
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
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_DIVERGED if result.summary["diverged"] else 0


def cmd_imp(args: argparse.Namespace) -> int:
    from ..stages.imp.run import imp_settings, run_imp
    from ..stages.instability import instability_settings

    cfg, extra = load_config(args)
    settings = imp_settings(
        extra.get("imp"), levels=args.levels, prune_fraction=args.prune_fraction, strategy=args.strategy, criterion=args.criterion, mask1=args.mask1, supermask=True if args.supermask else None,
        mask0=args.mask0, mask_from=args.mask_from,
        rewind=args.rewind, one_shot=True if args.one_shot else None, baselines=args.baselines,
        replicates=args.replicates, instability=True if args.instability else None)
    sweep = instability_settings(extra.get("instability"))
    result = run_imp(cfg, settings, sweep)
    if args.json:
        print(json.dumps(result.summary, indent=2, default=str))
        return 0
    info = result.summary["rewind"]
    how = f" (auto: first stable step {info.get('first_stable_step')})" if info.get("rewind") == "auto" else ""
    print(f"IMP: {settings.levels} levels, {settings.strategy} pruning {settings.prune_fraction:.0%} per level, "
          f"rewind to {result.rewind_step}it{how}")
    source = result.summary.get("mask_source", "own")
    print(f"criterion {settings.criterion if source == 'own' else '-'}, mask-1 {settings.mask1}, mask-0 {settings.mask0}, "
          f"masks {'found here' if source == 'own' else 'from ' + str(source.get('run_dir'))}")
    print(f"{'rep':>3} {'level':>5} {'kind':>7} {'density':>8} {'final acc':>9} {'early-stop acc':>14} {'at':>7} "
          f"{'instability':>11} {'status':>9} {'updated':>7} {'untrained':>9}")

    def number(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "-"

    for row in result.levels:
        print(f"{row['replicate']:>3} {row['level']:>5} {row['kind']:>7} {row['density']:>8.4f} "
              f"{row['final_test_accuracy']:>9.4f} {row['early_stop_test_accuracy']:>14.4f} "
              f"{row['early_stop_step']:>5}it {number(row['instability']):>11} {row.get('status', 'ok'):>9} "
              f"{number(row.get('updated_fraction')):>7} {number(row.get('supermask_test_accuracy')):>9}")
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
    flagged = result.summary.get("flagged", [])
    for item in flagged:
        what = ("diverged: no result" if item["status"] == "diverged" else
                "untrained (accuracy within the chance margin): never matching")
        print(f"warning: replicate {item['replicate']} level {item['level']} {item['kind']}: {what}", file=sys.stderr)
    return EXIT_DIVERGED if any(item["status"] == "diverged" for item in flagged) else 0


def cmd_hessian(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..stages.landscape import config_from_run, hessian_path, hessian_settings, hessian_track

    extra: dict[str, Any] = {}
    if args.config and Path(args.config).is_dir():
        cfg = config_from_run(args.config)
        overrides = _parse_sets(args.set or [])
        if args.device:
            overrides["runtime.device"] = args.device
        if args.threads is not None:
            overrides["runtime.threads"] = str(args.threads)
        if args.quiet:
            overrides["runtime.quiet"] = "true"
        if args.plugin:
            overrides["runtime.plugins"] = list(args.plugin)
        cfg = cfg.with_overrides(overrides)
    else:
        cfg, extra = load_config(args)
    if args.trace_probes < 1:
        raise ConfigError(f"hessian --trace-probes: must be at least 1 (Rademacher probes for --trace), "
                          f"got {args.trace_probes}")
    alphas = _parse_alphas(args.alphas, args.path)
    settings = hessian_settings(
        extra.get("hessian"), top_k=args.top, smallest=True if args.min else None,
        trace_probes=args.trace_probes if args.trace else None, density=True if args.density else None,
        samples=args.samples, engine=args.engine, dtype=args.dtype)
    if args.path is not None:
        track = hessian_path(cfg, settings, args.path, alphas=alphas)
        where = "alpha"
    else:
        at = "all" if args.at in (None, "all") else _csv_list(args.at)
        track = hessian_track(cfg, settings, at=at, every=args.every)
        where = "step"
    if args.json:
        print(json.dumps({"run_dir": str(track.run_dir), "rows": track.rows}, indent=2))
        return 0
    keys = [k for k in track.rows[0] if k.startswith("lambda_") and k != "lambda_min"] if track.rows else []
    cols = keys + ["lambda_min", "trace", "trace_stderr", "n_hvp", "seconds"]
    print(f"{where:>8} " + " ".join(f"{c:>12}" for c in cols))
    for row in track.rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{v:>12.5g}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>12}")
        label = f"{row[where]}it" if where == "step" else f"{row[where]:.3f}"
        print(f"{label:>8} " + " ".join(cells))
    print(f"results: {track.run_dir}")
    return 0


def _parse_alphas(text: str | None, path: str | None) -> list[float]:
    """``hessian --alphas``: comma-separated numbers in [0, 1], only together with ``--path``."""
    if text is None:
        return [0.0, 0.25, 0.5, 0.75, 1.0]
    if path is None:
        raise ConfigError("hessian --alphas: only applies along a path; give --path STEP too")
    try:
        alphas = [float(a) for a in _csv_list(text)]
    except ValueError:
        raise ConfigError(f"hessian --alphas: expected comma-separated numbers in [0, 1] like 0,0.5,1, "
                          f"got {text!r}") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"hessian --alphas: values must lie in [0, 1], got {text!r}")
    return alphas


def cmd_connect(args: argparse.Namespace) -> int:
    from ..stages.connect import connect, connect_settings

    settings = connect_settings(align=args.align, repair=True if args.repair else None, alphas=args.alphas,
                                splits=args.splits, bn=args.bn, align_examples=args.align_examples,
                                allow_different_masks=True if args.allow_different_masks else None)
    result = connect(args.run_a, args.run_b, settings, results_root=args.out)
    if args.json:
        print(json.dumps(result.summary, indent=2))
        return 0
    print(f"a: {result.summary['a']}")
    print(f"b: {result.summary['b']}")
    print(f"alignment {result.summary['alignment']}, {settings.alphas} alphas")
    for split, barrier in result.barriers.items():
        print(f"{split:>6}: error barrier {barrier:.4f}, loss barrier {result.loss_barriers[split]:.4f}")
    print(f"results: {result.run_dir}")
    for split in result.summary["untrained"]:
        print(f"warning: {split}: an endpoint's error is near chance: the barrier is not a result", file=sys.stderr)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from ..grid.plan import load_grid, make_plan
    from ..grid.run import run_grid
    from ..grid.status import print_plan

    overrides: dict[str, Any] = _parse_sets(args.set or [])
    if args.out:
        overrides["runtime.results_root"] = args.out
    if args.device:
        overrides["runtime.device"] = args.device
    if args.plugin:
        overrides["runtime.plugins"] = list(args.plugin)
    grid = load_grid(args.grid, overrides)
    options: dict[str, Any] = {}
    if args.address:
        if args.executor != "ray":
            raise ConfigError("--address: only with --executor ray")
        options["address"] = args.address
    if args.executor == "slurm" and args.slurm_local:
        options["local"] = True
    plan = make_plan(grid)  # every point checked before anything is submitted
    if args.dry_run:
        if args.json:
            from dataclasses import asdict

            print(json.dumps({"grid": grid.hash, "units": [
                {**{k: v for k, v in asdict(u).items() if k not in ("config",)},
                 "complete": u.run_dir(grid.root).is_complete()} for u in plan.units]}, indent=2))
        else:
            print_plan(plan)
        return 0
    result = run_grid(grid, executor=args.executor, **options)
    frame = result.dataframe()
    if args.json:
        print(json.dumps({"grid": grid.hash, "plan": str(result.plan.folder / "plan.json"),
                          "outcomes": result.outcomes, "skipped": result.skipped, "blocked": result.blocked,
                          "rows": json.loads(frame.to_json(orient="records"))}, indent=2, default=str))
    else:
        print(f"grid {grid.hash}: {len(result.outcomes)} units run, {len(result.skipped)} already complete, "
              f"{len(result.failed)} failed, {len(result.blocked)} blocked by a failed dependency")
        print(frame.drop(columns=[c for c in frame.columns if c.endswith(("_dir", "_dirs"))]).to_string(index=False))
        for uid in result.failed:
            print(f"failed: {uid}: {result.outcomes[uid]['error']}", file=sys.stderr)
        if result.failed or result.blocked:
            print("rerun the same command to run what is missing (see `stability status`)", file=sys.stderr)
    if result.failed or result.blocked:
        return EXIT_FAILED
    return EXIT_DIVERGED if any(o["status"] == "diverged" for o in result.outcomes.values()) else 0


def cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..grid.status import grid_status

    if not Path(args.root).is_dir():
        raise ConfigError(f"status: results root {args.root!r} is not a directory")
    grids = grid_status(args.root)
    if args.json:
        print(json.dumps(grids, indent=2))
        return 0
    if not grids:
        print(f"no grid has been planned under {args.root} (run `stability grid GRID.toml` first)")
        return 0
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
    return 0


def cmd_earlybird(args: argparse.Namespace) -> int:
    from ..stages.earlybird import earlybird_settings, run_earlybird

    cfg, _ = load_config(args)
    settings = earlybird_settings(mask=args.mask, density=args.density, threshold=args.threshold,
                                  window=args.window, rule=args.rule, every=args.every, rewind=args.rewind,
                                  prune_fraction=args.prune_fraction)
    result = run_earlybird(cfg, settings)
    s = result.summary
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
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
        return 0
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="stability", description="Stability to SGD noise, linear mode connectivity, "
                                     "Hessian spectra and lottery tickets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list named presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("train", help="train a trunk run with checkpoints at every rewind point",
                       epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("instability", help="siblings at each rewind point, interpolation curves, first stable step",
                       epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--rewind", type=_csv_list, help="rewind points, e.g. 0it,50it,100it (default: training.rewind_points)")
    p.add_argument("--siblings", type=int, help="siblings per rewind point (default 2)")
    p.add_argument("--noise", help="both | data_order | augmentation (default both)")
    p.add_argument("--optimizer-state", dest="optimizer_state", help="fresh | restore (default fresh)")
    p.add_argument("--sibling-seed", dest="sibling_seed", type=int, help="seed of the sibling set (default 0)")
    p.add_argument("--bn", help="BatchNorm statistics along the path: interpolate | reset (default interpolate)")
    p.add_argument("--alphas", type=int, help="number of evenly spaced alphas in [0, 1] (default 30)")
    p.add_argument("--splits", type=_csv_list, help="splits to measure: test,train,val (default test)")
    p.add_argument("--threshold", type=float, help="stable when mean instability is below this fraction (default 0.02)")
    p.add_argument("--align", help="permutation alignment of each pair before interpolating: none | weights | "
                                   "activations (default none, as Frankle et al. 2020)")
    p.add_argument("--repair", action="store_true", help="REPAIR each interpolated network (Jordan et al. 2023)")
    p.add_argument("--align-examples", dest="align_examples", type=int,
                   help="training examples for activation matching and REPAIR (default 1000)")
    p.set_defaults(func=cmd_instability)

    p = sub.add_parser("imp", help="iterative magnitude pruning with rewinding, baselines and ticket metrics",
                       epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--levels", type=int, help="pruning levels after the dense level 0 (default 5)")
    p.add_argument("--prune-fraction", dest="prune_fraction", type=float,
                   help="fraction of surviving weights removed per level, in (0, 1) (default 0.2)")
    p.add_argument("--strategy", help="global | layerwise | lamp | random (default global)")
    p.add_argument("--criterion", help="which weights a level keeps (Zhou et al. 2019): large_final (magnitude, "
                                       "default), small_final, large_init, small_init, large_init_large_final, "
                                       "small_init_small_final, magnitude_increase, movement, large_final_same_sign, "
                                       "random")
    p.add_argument("--mask1", help="what the kept weights start from: rewind (default), reinit, reshuffle, "
                                   "constant, random_sign (Zhou et al. 2019)")
    p.add_argument("--mask0", help="what the removed weights do: zero (pruned, default), freeze (held at their "
                                   "rewound values: lottery heroes), freeze_if_moving_away (Zhou et al. 2019)")
    p.add_argument("--mask-from", dest="mask_from", metavar="IMP_RUN",
                   help="train the masks of another IMP run (an imp_<hash> directory) here instead of pruning: "
                        "ticket transfer to another optimizer, seed or dataset")
    p.add_argument("--supermask", action="store_true",
                   help="also record each ticket's test accuracy before training (Zhou et al.'s supermasks)")
    p.add_argument("--rewind", help="0 | a step like 500it | auto (first stable step) (default 0)")
    p.add_argument("--one-shot", dest="one_shot", action="store_true",
                   help="prune the dense network straight to each level's density")
    p.add_argument("--baselines", type=_csv_list, help="reinit,random")
    p.add_argument("--replicates", type=int, help="replicates with init seeds init_seed + r (default 1)")
    p.add_argument("--instability", action="store_true", help="measure each sparse network's instability")
    p.set_defaults(func=cmd_imp)

    p = sub.add_parser("hessian", help="Hessian eigenvalues, trace and density over a run or along a path",
                       epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--at", help="all (every saved checkpoint) or steps like 0it,500it (default all)")
    p.add_argument("--every", help="also probe every k steps, e.g. 100it (missing checkpoints are replayed)")
    p.add_argument("--path", metavar="STEP", help="probe along the interpolation path of the siblings of this rewind step")
    p.add_argument("--alphas", help="alphas along the path, e.g. 0,0.5,1 (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--top", type=int, help="number of largest eigenvalues (default 1)")
    p.add_argument("--min", action="store_true", help="also the smallest eigenvalue")
    p.add_argument("--trace", action="store_true", help="Hutchinson trace with its standard error")
    p.add_argument("--trace-probes", dest="trace_probes", type=int, default=50, help="Rademacher probes (default 50)")
    p.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    p.add_argument("--samples", type=int, help="training examples in the fixed subset (default 1000)")
    p.add_argument("--engine", help="native | pyhessian (default native)")
    p.add_argument("--dtype", help="float32 | float64 (default float32)")
    p.set_defaults(func=cmd_hessian)

    p = sub.add_parser("connect", help="interpolation barrier between two trained networks, aligned or not",
                       description="The error and loss barrier along the straight line from network A to network B: "
                                   "finished train runs (train_<hash>) or IMP levels (imp_<hash>/replicate_<r>/level_<l>) "
                                   "of the same architecture and data.")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--align", help="none | weights | activations (default none)")
    p.add_argument("--repair", action="store_true", help="REPAIR each interpolated network")
    p.add_argument("--alphas", type=int, help="number of evenly spaced alphas in [0, 1] (default 30)")
    p.add_argument("--splits", type=_csv_list, help="test,train,val (default test)")
    p.add_argument("--bn", help="BatchNorm statistics along the path: interpolate | reset (default interpolate)")
    p.add_argument("--align-examples", dest="align_examples", type=int,
                   help="training examples for activation matching and REPAIR (default 1000)")
    p.add_argument("--allow-different-masks", dest="allow_different_masks", action="store_true",
                   help="align sparse networks whose masks differ")
    p.add_argument("--out", metavar="DIR", help="results root for the record (default: RUN_A's results root)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_connect)

    p = sub.add_parser("grid", help="a grid of experiments (axes x stages) on this machine, Ray or Slurm")
    p.add_argument("grid", help="a grid TOML file (see `stability.grid` and README: Running on a cluster)")
    p.add_argument("--executor", default="local", choices=["local", "ray", "slurm"], help="who runs the units")
    p.add_argument("--address", help="ray: the cluster to join (auto, or host:port); default a local Ray")
    p.add_argument("--slurm-local", dest="slurm_local", action="store_true",
                   help="slurm: run the job arrays through submitit's local executor (no Slurm needed)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the plan and the work; run nothing")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a setting of every point")
    p.add_argument("--out", metavar="DIR", help="results root (shared storage on a cluster)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where units train (default auto)")
    p.add_argument("--plugin", action="append", metavar="MODULE", help="import MODULE (it registers models/datasets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("status", help="progress of the grids planned under a results root, from what is on disk")
    p.add_argument("root", help="the results root")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("earlybird", help="early-bird tickets (You et al. 2020): the mask drawn early, and its ticket",
                       description="Masks that pruning to a density would choose at mask points along the trunk, "
                                   "their pairwise Hamming distances, the early-bird step (the first point where "
                                   "the largest distance in the window is below the threshold), and the ticket "
                                   "pruned there, rewound and trained. No detection: no ticket, said so, exit 0.",
                       epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p)
    p.add_argument("--mask", help="magnitude (global |w| over prunable weights) | channel (BatchNorm |gamma|) "
                                  "(default magnitude)")
    p.add_argument("--density", type=float, help="kept fraction in (0, 1): of prunable weights, or of BatchNorm "
                                                 "channels (default 0.5)")
    p.add_argument("--threshold", type=float, help="epsilon in (0, 1]: fires when every distance in the window is "
                                                   "below it (default 0.1)")
    p.add_argument("--window", type=int, help="distances in the FIFO queue, >= 2 (default 5)")
    p.add_argument("--rule", help="consecutive (the paper's Algorithm 1: neighbouring masks) | latest (the "
                                  "authors' code: the newest mask against each earlier one) (default consecutive)")
    p.add_argument("--every", help="mask points every this many steps, e.g. 10it (default training.eval_every)")
    p.add_argument("--rewind", help="where the ticket starts: 0 or a step like 500it (default 0)")
    p.add_argument("--prune-fraction", dest="prune_fraction", type=float,
                   help="IMP's per-level fraction in (0, 1) for the cost comparison (default 0.2)")
    p.set_defaults(func=cmd_earlybird)

    from .plot import add_parser as add_plot_parser

    add_plot_parser(sub)
    return parser


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stability`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TrainingDiverged as exc:
        where = f" (run {exc.run_dir})" if exc.run_dir else ""
        print(f"error: {exc}{where}; recorded as diverged, not a result. Lower the learning rate, add warmup, "
              "or change the initialization", file=sys.stderr)
        return EXIT_DIVERGED
    except StabilityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
