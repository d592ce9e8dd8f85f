"""``stability curve``: a curve of low loss between two trained networks, beside the straight line (Garipov et al.
2018); or, with ``--sweep``, between two siblings at each rewind point of an instability sweep.

    stability curve A B [--kind bezier|polychain] [--steps N] [--lr X] [--seed S] [--align weights] [--points 21]
                        [--model NAME --dataset NAME (state-dict files)] [--out DIR] [--json]
    stability curve [CONFIG.toml | --preset NAME] --sweep [--rewind 0it,100it] [curve flags] [--out DIR] [--json]

Bad input exits 2 with the setting named, before anything is written. Nothing here imports torch until it runs.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from . import report
from .files import file_config, is_file, no_file_flags, pair_arguments_tail
from .overrides import (
    RUNTIME_FLAGS,
    Flag,
    add_overrides,
    command_line,
    load_config,
)

__all__ = ["CURVE_DESCRIPTION", "CURVE_HELP", "cmd_curve", "curve_arguments"]

CURVE_HELP = "a curve of low loss between two networks (Garipov et al. 2018), beside the straight line"
CURVE_DESCRIPTION = (
    "Fits the middle point of a quadratic Bezier curve (or the bend of a polygonal chain) between network A and "
    "network B on the training loss, t drawn uniformly per step, the ends fixed; then measures the error and loss "
    "along the curve and along the straight line with BatchNorm statistics recomputed at every t. A and B: finished "
    "train runs (train_<hash>), dense IMP levels, or two state-dict files with --model and --dataset. With --sweep: "
    "at each rewind point of the instability sweep of CONFIG or --preset, the curve between two siblings.")


def curve_arguments(p: argparse.ArgumentParser) -> None:
    """``curve``: two networks (or ``--sweep``) and how the curve is fitted and measured (``curve.*``)."""
    from ..lmc.fit import OPTIMIZERS, SCHEDULES
    from ..maths.bezier import CURVE_KINDS
    from ..stages.curve import CURVE_ALIGN, CURVE_BN, CurveFitSettings
    from ..stages.instability import SPLITS, InstabilitySettings

    what = ("a train_<hash> run, a dense imp_<hash>/replicate_<r>/level_<l> directory, or a state-dict file (.pt, "
            ".pth, .bin, .safetensors, .ckpt: then give --model and --dataset); with --sweep: a CONFIG.toml")
    p.add_argument("run_a", metavar="A", nargs="?", help=what)
    p.add_argument("run_b", metavar="B", nargs="?", help="the other network, of the same kind as A")
    p.add_argument("--sweep", action="store_true", help="the curve between two siblings at each rewind point of the "
                                                        "instability sweep of CONFIG (A) or --preset, beside the line")
    p.add_argument("--preset", help="with --sweep: start from a named preset (see `stability presets`)")
    add_overrides(p, [
        Flag("curve.kind", " | ".join(CURVE_KINDS)),
        Flag("curve.steps", "fitting iterations, e.g. 1000it, or epochs of the training split, e.g. 5ep"),
        Flag("curve.lr", "learning rate of the middle point"),
        Flag("curve.optimizer", " | ".join(OPTIMIZERS)),
        Flag("curve.schedule", " | ".join(SCHEDULES)),
        Flag("curve.batch_size", "training examples per fitting step"),
        Flag("curve.seed", "seed of t, the order of the examples and dropout"),
        Flag("curve.align", f"{' | '.join(CURVE_ALIGN)}: align B to A first (Tatro et al. 2020)"),
        Flag("curve.points", "evenly spaced t in [0, 1] where curve and line are measured"),
        Flag("curve.splits", f"splits to measure, comma-separated: {', '.join(SPLITS)}"),
        Flag("curve.bn", f"BatchNorm statistics along the paths: {' | '.join(CURVE_BN)}"),
        Flag("instability.rewind_points", "with --sweep: the rewind points", option="--rewind",
             empty="training.rewind_points"),
        *(f for f in RUNTIME_FLAGS if f.key != "runtime.results_root"),
    ], {"curve": CurveFitSettings, "instability": InstabilitySettings})
    pair_arguments_tail(p, {"curve": CurveFitSettings}, "results root for the record (default: A's results root; "
                        "for files and --sweep runtime.results_root)", "print the result as JSON")


def cmd_curve(args: argparse.Namespace) -> int:
    """The curve between two trained networks (runs or files), or at each rewind point of a sweep."""
    from ..stages.curve import curve_settings, fit_curve_files, fit_curve_runs

    given = command_line(args)
    if args.sweep:
        return _sweep(args)
    for flag, value in (("--preset", args.preset), ("--rewind / instability.*", given.tables.get("instability"))):
        if value:
            raise ConfigError(f"curve {flag}: applies only with --sweep")
    settings = curve_settings(given.tables.get("curve"))
    if args.run_a is None or args.run_b is None:
        raise ConfigError("curve A B: give two networks (train runs, IMP levels or state-dict files), or --sweep")
    if is_file(args.run_a) or is_file(args.run_b):
        if not (is_file(args.run_a) and is_file(args.run_b)):
            raise ConfigError(f"curve A B: give two run directories or two state-dict files, not one of each "
                              f"({args.run_a!r}, {args.run_b!r})")
        result = fit_curve_files(args.run_a, args.run_b, file_config(args, given.run, "curve"), settings)
    else:
        no_file_flags(args, "curve", given.run)
        result = fit_curve_runs(args.run_a, args.run_b, settings, results_root=args.out)
    if args.json:
        report.print_json({"run_dir": str(result.run_dir), "reused": result.reused, **result.summary})
    else:
        print_curve(result)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """``curve --sweep``: the sweep of CONFIG (A) or --preset, and a curve between two siblings at each point."""
    from ..stages.curve import curve_settings, curve_sweep
    from ..stages.instability import checkpoint_points, instability_settings

    if args.run_b is not None:
        raise ConfigError("curve --sweep: takes one CONFIG.toml (or --preset), not two networks")
    no_file_flags(args, "curve --sweep")
    args.config = args.run_a
    inputs = load_config(args)
    settings = curve_settings(inputs.tables.get("curve"))
    instability = instability_settings(inputs.tables.get("instability"))
    cfg = inputs.cfg
    if args.out:
        cfg = cfg.with_overrides({"runtime.results_root": args.out})
    if "rewind_points" in inputs.given.tables.get("instability", {}):
        cfg = cfg.with_overrides({"training.rewind_points": checkpoint_points(instability.rewind_points)})
    result = curve_sweep(cfg, settings, instability)
    if args.json:
        report.print_json({"sweep_dir": str(result.sweep_dir), "table": result.table})
        return 0
    from ..steps import point_name

    print(f"instability sweep: {result.sweep_dir}")
    print(f"{'rewind':>12} {'split':>6} {'line':>8} {'curve':>8} {'line loss':>10} {'curve loss':>10}  run")
    for row in result.table:
        print(f"{point_name(row['rewind_step']):>12} {row['split']:>6} {row['line_barrier']:8.4f} "
              f"{row['curve_barrier']:8.4f} {row['line_loss_barrier']:10.4f} {row['curve_loss_barrier']:10.4f}  "
              f"{row['run']}")
    return 0


def print_curve(result: Any) -> None:
    """One curve: the ends, how it was fitted, and per split the line's barriers beside the curve's."""
    s = result.summary
    print(f"a: {s['a']}")
    print(f"b: {s['b']}")
    cfg = s["settings"]
    print(f"{s['kind']}: {s['iterations']} fitting steps (seed {s['seed']}, {cfg['optimizer']} lr {cfg['lr']}), "
          f"alignment {cfg['align']}, {cfg['points']} points, BatchNorm {cfg['bn']}; final training loss "
          f"{s['fit_loss']:.4f}")
    for split in result.barriers:
        print(f"{split:>6}: error barrier line {result.line_barriers[split]:.4f} -> curve "
              f"{result.barriers[split]:.4f}; loss barrier line {result.line_loss_barriers[split]:.4f} -> curve "
              f"{result.loss_barriers[split]:.4f}")
    print(f"results: {result.run_dir}{' (reused)' if result.reused else ''}")
    for split in s.get("untrained", []):
        report.warn(f"{split}: an endpoint's error is near chance: the barriers are not a result")
