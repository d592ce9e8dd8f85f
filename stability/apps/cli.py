"""The ``stability`` command: a table of subcommands over the same functions a notebook calls.

Each subcommand is a ``Command``: its help line, how it adds its arguments, and what it runs. A run
command's flags are aliases of ``--set section.key=value`` (``overrides.Flag``) whose defaults and help
are read from the settings dataclasses; ``report`` prints what each command found.

Bad input exits with code 2 and a message naming the setting; nothing is written.
"""
from __future__ import annotations

import os

# Two BLAS thread pools (torch's and OpenBLAS's) on a small machine halve speed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

from ..errors import ConfigError, StabilityError, TrainingDiverged
from . import curve_cli, export_cli, landscape_cli, report
from .common import path_flags, run_arguments
from .measure import cmd_connect, cmd_hessian, connect_arguments, hessian_arguments
from .overrides import (
    Flag,
    add_overrides,
    command_line,
    load_config,
)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1  # grid: some units failed (recorded for `stability status`; a rerun finishes them)
EXIT_DIVERGED = 3  # training went non-finite: recorded as diverged, never reported as a result


# ---------------------------------------------------------------- presets, train
def presets_arguments(p: argparse.ArgumentParser) -> None:
    """``presets``: --json only."""
    p.add_argument("--json", action="store_true")


def cmd_presets(args: argparse.Namespace) -> int:
    """List the named presets."""
    from ..presets import PRESETS

    if args.json:
        report.print_json(PRESETS)
    else:
        report.presets(PRESETS)
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    """``train``: a config and overrides."""
    run_arguments(p)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume, or reuse) the trunk run."""
    from ..stages.trunk import train_trunk

    result = train_trunk(load_config(args).cfg)
    if args.json:
        report.print_json(result.summary)
    else:
        report.train(result.summary, result.reused)
    return 0


# ---------------------------------------------------------------- instability, imp
def instability_arguments(p: argparse.ArgumentParser) -> None:
    """``instability``: the sweep's settings."""
    from ..stages.instability import InstabilitySettings
    from ..stages.siblings import NOISE_KINDS, OPTIMIZER_STATES

    run_arguments(p, [
        Flag("instability.rewind_points", "rewind points, e.g. 0it,50it,100it (independent: networks from "
             "different initializations)", option="--rewind", empty="training.rewind_points"),
        Flag("instability.siblings", "siblings per rewind point"),
        Flag("instability.noise", " | ".join(NOISE_KINDS)),
        Flag("instability.optimizer_state", " | ".join(OPTIMIZER_STATES)),
        Flag("instability.sibling_seed", "seed of the sibling set"),
        *path_flags("instability"),
        Flag("instability.alpha_grid", "explicit alphas instead of --alphas: increasing, from 0 to 1, e.g. 0,0.5,1",
             empty="none", metavar="ALPHAS"),
        Flag("instability.threshold", "stable when mean instability is below this fraction"),
    ], {"instability": InstabilitySettings})


def cmd_instability(args: argparse.Namespace) -> int:
    """Siblings at each rewind point, their interpolation curves and the first stable step."""
    from ..stages.instability import checkpoint_points, instability_settings, instability_sweep

    inputs = load_config(args)
    settings = instability_settings(inputs.tables.get("instability"))
    cfg = inputs.cfg
    if "rewind_points" in inputs.given.tables.get("instability", {}):
        # points named on the command line become the trunk's checkpoints too (they do not name the trunk)
        cfg = cfg.with_overrides({"training.rewind_points": checkpoint_points(settings.rewind_points)})
    result = instability_sweep(cfg, settings)
    if args.json:
        report.print_json(result.summary)
        return 0
    report.instability(result, settings)
    return EXIT_DIVERGED if result.summary["diverged"] else 0


def imp_arguments(p: argparse.ArgumentParser) -> None:
    """``imp``: how tickets are searched for (and ``--set instability.*`` for ``--instability``)."""
    from ..maths.pruning import CRITERIA, MASK0_ACTIONS, MASK1_ACTIONS
    from ..maths.saliency import MASK_SHUFFLES
    from ..stages.imp import BASELINES, IMP_STRATEGIES, RETRAINS, ImpSettings
    from ..stages.instability import InstabilitySettings

    run_arguments(p, [
        Flag("imp.levels", "pruning levels after the dense level 0"),
        Flag("imp.prune_fraction", "fraction of surviving weights removed per level, in (0, 1)"),
        Flag("imp.strategy", " | ".join(IMP_STRATEGIES) + " (snip, grasp, synflow: pruning at initialization, "
                             "scored at the rewind point, one-shot to each level's density)"),
        Flag("imp.retrain", f"{' | '.join(RETRAINS)} (Renda et al. 2020): weights and schedule back to the rewind "
                            "step; the previous level's final weights with the schedule replayed from the rewind step; "
                            "or those weights at the schedule's final learning rate"),
        Flag("imp.score_batch", "snip, grasp: training examples the scores are computed on (seeded by pruning_seed)"),
        Flag("imp.synflow_rounds", "synflow: pruning rounds (exponential schedule), at least 1"),
        Flag("imp.mask_shuffle", f"{' | '.join(MASK_SHUFFLES)}: layer permutes each level's mask within each layer, "
                                 "densities kept (sanity check, Frankle et al. 2021), and keeps it in the lineage: "
                                 "iterative IMP prunes the next level from the shuffled network (with global "
                                 "pruning the layer densities drift from IMP's and the loss compounds); for the "
                                 "paper's per-level shuffle use --baselines random"),
        Flag("imp.invert_scores", "keep the lowest-scored weights instead (sanity check, Frankle et al. 2021)",
             switch=True),
        Flag("imp.criterion", f"which weights a level keeps (Zhou et al. 2019; large_final is magnitude): "
                              f"{', '.join(CRITERIA)}"),
        Flag("imp.mask1", f"what the kept weights start from (Zhou et al. 2019): {', '.join(MASK1_ACTIONS)}"),
        Flag("imp.mask0", f"what the removed weights do: {', '.join(MASK0_ACTIONS)} (freeze: held at their rewound "
                          "values, lottery heroes; freeze_if_moving_away: Zhou et al. 2019)"),
        Flag("imp.mask_from", "train the masks of another IMP run (an imp_<hash> directory) here instead of "
                              "pruning: ticket transfer to another optimizer, seed or dataset", metavar="IMP_RUN",
             empty="none, masks found here"),
        Flag("imp.supermask", "also record each ticket's test accuracy before training (Zhou et al.'s supermasks)",
             switch=True),
        Flag("imp.rewind", "0 | a step like 500it | auto (first stable step)"),
        Flag("imp.one_shot", "prune the dense network straight to each level's density", switch=True),
        Flag("imp.baselines", f"comma-separated: {', '.join(BASELINES)} (random: each level's own mask shuffled "
                              "within each layer, from the ticket's start weights, i.e. the layer shuffle of Frankle "
                              "et al. 2021 without compounding, for any strategy)", empty="none"),
        Flag("imp.replicates", "replicates with init seeds init_seed + r"),
        Flag("imp.instability", "measure each sparse network's instability", switch=True),
    ], {"imp": ImpSettings, "instability": InstabilitySettings})


def cmd_imp(args: argparse.Namespace) -> int:
    """Iterative magnitude pruning with rewinding, baselines and ticket metrics."""
    from ..stages.imp import imp_settings, run_imp
    from ..stages.instability import instability_settings

    inputs = load_config(args)
    settings = imp_settings(inputs.tables.get("imp"))
    sweep = instability_settings(inputs.tables.get("instability"))
    result = run_imp(inputs.cfg, settings, sweep)
    if args.json:
        report.print_json(result.summary)
        return 0
    report.imp(result, settings)
    return EXIT_DIVERGED if any(item["status"] == "diverged" for item in result.summary.get("flagged", [])) else 0


# ---------------------------------------------------------------- grid, status
def grid_arguments(p: argparse.ArgumentParser) -> None:
    """``grid``: the grid file, who runs it, and overrides of every point."""
    from ..config import DEVICES
    from ..grid.executors import EXECUTORS

    p.add_argument("grid", help="a grid TOML file (see `stability.grid` and README: Running on a cluster)")
    p.add_argument("--executor", default="local", choices=EXECUTORS, help="who runs the units")
    p.add_argument("--address", help="ray: the cluster to join (auto, or host:port); default a local Ray")
    p.add_argument("--slurm-local", dest="slurm_local", action="store_true",
                   help="slurm: run the job arrays through submitit's local executor (no Slurm needed)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the plan and the work; run nothing")
    add_overrides(p, [
        Flag("runtime.results_root", "results root (shared storage on a cluster)", option="--out", metavar="DIR"),
        Flag("runtime.device", f"where units train: {' | '.join(DEVICES)}"),
        Flag("runtime.plugins", "import MODULE (it registers models/datasets)", option="--plugin", repeat=True,
             metavar="MODULE", empty="none"),
    ])
    p.add_argument("--json", action="store_true")


def cmd_grid(args: argparse.Namespace) -> int:
    """Plan a grid and run what is not complete (or, with --dry-run, print the plan)."""
    from ..grid.plan import load_grid, make_plan
    from ..grid.run import run_grid
    from ..grid.status import print_plan

    grid = load_grid(args.grid, command_line(args).run)
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
            report.print_json({"grid": grid.hash, "units": [
                {**{k: v for k, v in asdict(u).items() if k not in ("config",)},
                 "complete": u.run_dir(grid.root).is_complete()} for u in plan.units]})
        else:
            print_plan(plan)
        return 0
    result = run_grid(grid, executor=args.executor, **options)
    if args.json:
        report.print_json({"grid": grid.hash, "plan": str(result.plan.folder / "plan.json"),
                           "outcomes": result.outcomes, "skipped": result.skipped, "blocked": result.blocked,
                           "rows": json.loads(result.dataframe().to_json(orient="records"))})
    else:
        report.grid(result, grid.hash)
    if result.failed or result.blocked:
        return EXIT_FAILED
    return EXIT_DIVERGED if any(o["status"] == "diverged" for o in result.outcomes.values()) else 0


def status_arguments(p: argparse.ArgumentParser) -> None:
    """``status``: a results root."""
    p.add_argument("root", help="the results root")
    p.add_argument("--json", action="store_true")


def cmd_status(args: argparse.Namespace) -> int:
    """Progress of the grids planned under a results root, from what is on disk."""
    from pathlib import Path

    from ..grid.status import grid_status

    if not Path(args.root).is_dir():
        raise ConfigError(f"status: results root {args.root!r} is not a directory")
    grids = grid_status(args.root)
    if args.json:
        report.print_json(grids)
    else:
        report.status(grids, args.root)
    return 0


# ---------------------------------------------------------------- earlybird
def earlybird_arguments(p: argparse.ArgumentParser) -> None:
    """``earlybird``: how the early-bird mask is searched for (aliases of ``earlybird.*``)."""
    from ..stages.earlybird import MASK_KINDS, RULES, EarlybirdSettings

    run_arguments(p, [
        Flag("earlybird.mask", f"{' | '.join(MASK_KINDS)} (magnitude: global |w| over prunable weights; channel: "
                               "BatchNorm |gamma|)"),
        Flag("earlybird.density", "kept fraction in (0, 1): of prunable weights, or of BatchNorm channels"),
        Flag("earlybird.threshold", "epsilon in (0, 1]: fires when every distance in the window is below it"),
        Flag("earlybird.window", "distances in the FIFO queue, >= 2"),
        Flag("earlybird.rule", f"{' | '.join(RULES)} (consecutive: the paper's Algorithm 1, neighbouring masks; "
                               "latest: the authors' code, the newest mask against each earlier one)"),
        Flag("earlybird.every", "mask points every this many steps, e.g. 10it", empty="training.eval_every"),
        Flag("earlybird.rewind", "where the ticket starts: 0 or a step like 500it"),
        Flag("earlybird.prune_fraction", "IMP's per-level fraction in (0, 1) for the cost comparison"),
    ], {"earlybird": EarlybirdSettings})


def cmd_earlybird(args: argparse.Namespace) -> int:
    """Early-bird tickets: the mask drawn early along the trunk, and its ticket trained."""
    from ..stages.earlybird import earlybird_settings, run_earlybird

    inputs = load_config(args)
    result = run_earlybird(inputs.cfg, earlybird_settings(inputs.tables.get("earlybird")))
    if args.json:
        report.print_json(result.summary)
    else:
        report.earlybird(result)
    return 0


# ---------------------------------------------------------------- the table and the parser
class Command(NamedTuple):
    """A subcommand: its help line, how it adds its arguments, what it runs."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "presets": Command("list named presets", presets_arguments, cmd_presets),
    "train": Command("train a trunk run with checkpoints at every rewind point", train_arguments, cmd_train),
    "instability": Command("siblings at each rewind point, interpolation curves, first stable step",
                           instability_arguments, cmd_instability),
    "imp": Command("iterative magnitude pruning with rewinding, baselines and ticket metrics", imp_arguments, cmd_imp),
    "hessian": Command("Hessian eigenvalues, trace and density over a run or along a path", hessian_arguments,
                       cmd_hessian),
    "connect": Command("interpolation barrier between two trained networks, aligned or not", connect_arguments,
                       cmd_connect,
                       "The error and loss barrier along the straight line from network A to network B: finished "
                       "train runs (train_<hash>) or IMP levels (imp_<hash>/replicate_<r>/level_<l>) of the same "
                       "architecture and data, or two state-dict files with --model and --dataset (recorded under "
                       "their tensors' digests)."),
    "grid": Command("a grid of experiments (axes x stages) on this machine, Ray or Slurm", grid_arguments, cmd_grid),
    "status": Command("progress of the grids planned under a results root, from what is on disk", status_arguments,
                      cmd_status),
    "earlybird": Command("early-bird tickets (You et al. 2020): the mask drawn early, and its ticket",
                         earlybird_arguments, cmd_earlybird,
                         "Masks that pruning to a density would choose at mask points along the trunk, their "
                         "pairwise Hamming distances, the early-bird step (the first point where the largest "
                         "distance in the window is below the threshold), and the ticket pruned there, rewound and "
                         "trained. No detection: no ticket, said so, exit 0."),
    "landscape": Command("loss-landscape planes: through the trunk and two siblings, three networks, random or PCA "
                         "directions", landscape_cli.arguments, landscape_cli.run, landscape_cli.__doc__),
    "curve": Command(curve_cli.CURVE_HELP, curve_cli.curve_arguments, curve_cli.cmd_curve, curve_cli.CURVE_DESCRIPTION),
    "export": Command(export_cli.EXPORT_HELP, export_cli.export_arguments, export_cli.cmd_export, export_cli.__doc__),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argparse tree: every subcommand, with the arguments of ``command`` (None: of every one; "": none).

    The arguments read the settings dataclasses, whose modules import torch; building only the
    command that runs keeps ``stability presets`` and ``stability --help`` instant.
    """
    from .plot import add_parser as add_plot_parser

    parser = argparse.ArgumentParser(prog="stability", description="Stability to SGD noise, linear mode connectivity, "
                                     "Hessian spectra and lottery tickets.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.description)
        if command in (None, name):
            spec.arguments(p)
            p.set_defaults(func=spec.run)
    add_plot_parser(sub)  # `plot` adds its own parser and handler (apps/plot.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stability`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))  # "": no command, only the list
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
