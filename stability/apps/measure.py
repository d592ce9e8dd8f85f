"""``stability hessian`` and ``stability connect``: measurements of trained networks (runs, or state-dict files
trained elsewhere), their arguments and what they run."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from . import report
from .common import csv_list, path_flags, run_arguments
from .files import (
    connect_of_files,
    file_arguments,
    hessian_of_file,
    is_file,
    no_file_flags,
    pair_arguments_tail,
)
from .overrides import (
    RUNTIME_FLAGS,
    Flag,
    add_overrides,
    command_line,
    load_config,
)

__all__ = ["TRACE_PROBES", "cmd_connect", "cmd_hessian", "connect_arguments", "hessian_arguments"]

# Hutchinson probes of `hessian --trace`. Not HessianSettings.trace_probes' default: there 0 means "no
# trace", and a run is named by its settings, so that default cannot change.
TRACE_PROBES = 50


def hessian_arguments(p: argparse.ArgumentParser) -> None:
    """``hessian``: what is probed (aliases of ``hessian.*``) and where (checkpoints, or a path)."""
    from ..hessian.settings import DTYPES, ENGINES, HessianSettings
    from ..stages.landscape import PATH_ALPHAS

    run_arguments(p, [
        Flag("hessian.top_k", "number of largest eigenvalues", option="--top"),
        Flag("hessian.smallest", "also the smallest eigenvalue", option="--min", switch=True),
        Flag("hessian.density", "spectral density by stochastic Lanczos quadrature", switch=True),
        Flag("hessian.samples", "training examples in the fixed subset"),
        Flag("hessian.engine", " | ".join(ENGINES)),
        Flag("hessian.dtype", " | ".join(DTYPES)),
        Flag("hessian.sharpness_rho", "also the worst-case sharpness within this radius (adaptive unless "
             "--sharpness-plain)", option="--sharpness", metavar="RHO", empty="not measured"),
        Flag("hessian.sharpness_steps", "projected gradient ascent steps of --sharpness"),
    ], {"hessian": HessianSettings}, config_help="a TOML config file, a train run directory, or a state-dict file "
                                                 "(.pt, .pth, .bin, .safetensors, .ckpt) with --model and --dataset")
    p.set_defaults(run_dir_config=True)
    p.add_argument("--at", help="all (every saved checkpoint) or steps like 0it,500it (default all)")
    p.add_argument("--every", help="also probe every k steps, e.g. 100it (missing checkpoints are replayed)")
    p.add_argument("--path", metavar="STEP", help="probe along the interpolation path of the siblings of this rewind step")
    p.add_argument("--alpha-grid", dest="alpha_grid", metavar="ALPHAS",
                   help=f"the alphas along --path, comma-separated in [0, 1] (default "
                        f"{','.join(f'{a:g}' for a in PATH_ALPHAS)})")
    p.add_argument("--trace", action="store_true", help="Hutchinson trace with its standard error "
                                                        "[hessian.trace_probes = --trace-probes]")
    p.add_argument("--trace-probes", dest="trace_probes", type=int, default=TRACE_PROBES,
                   help=f"Rademacher probes for --trace (default {TRACE_PROBES})")
    p.add_argument("--sharpness-plain", dest="sharpness_plain", action="store_true",
                   help="--sharpness in the plain l2 ball ||delta|| <= RHO instead of the adaptive ||delta/|theta||| "
                        "<= RHO [hessian.sharpness_adaptive = false]")
    file_arguments(p)


def cmd_hessian(args: argparse.Namespace) -> int:
    """Hessian eigenvalues, trace and density over the trunk's checkpoints or along a path."""
    from ..hessian.settings import hessian_settings

    if args.trace_probes < 1:  # a rule of the flags: the setting itself reads 0 as "no trace"
        raise ConfigError(f"hessian --trace-probes: must be at least 1 (Rademacher probes for --trace), "
                          f"got {args.trace_probes}")
    trace = {"trace_probes": args.trace_probes} if args.trace else {}
    if args.sharpness_plain:
        trace["sharpness_adaptive"] = False
    if is_file(args.config):
        track, where = hessian_of_file(args, trace)
    else:
        no_file_flags(args, "hessian")
        inputs = load_config(args)
        track, where = _hessian_run(args, inputs, hessian_settings({**inputs.tables.get("hessian", {}), **trace}))
    if args.json:
        report.print_json({"run_dir": str(track.run_dir), "rows": track.rows})
    else:
        report.hessian(track, where)
        _sharpness(track, where)
    return 0


def _sharpness(track: Any, where: str) -> None:
    """The sharpness column of a track, when measured (``report.hessian`` prints the eigenvalues)."""
    rows = [r for r in track.rows if isinstance(r.get("sharpness"), (int, float))]
    if rows:
        print("worst-case sharpness: " + ", ".join(f"{r[where]}: {r['sharpness']:.5g}" for r in rows))


def _hessian_run(args: argparse.Namespace, inputs: Any, settings: Any) -> tuple[Any, str]:
    """``hessian`` of a run: over its checkpoints, or along a path (``--path``)."""
    from ..stages.landscape import hessian_path, hessian_track

    alphas = _alpha_grid(args.alpha_grid, args.path)
    if args.path is not None:
        track = hessian_path(inputs.cfg, settings, args.path, **({} if alphas is None else {"alphas": alphas}))
        where = "alpha"
    else:
        at = "all" if args.at in (None, "all") else csv_list(args.at)
        track = hessian_track(inputs.cfg, settings, at=at, every=args.every)
        where = "step"
    return track, where


def _alpha_grid(text: str | None, path: str | None) -> list[float] | None:
    """``hessian --alpha-grid`` as numbers (None: not given); ``hessian_path`` checks that they lie in [0, 1]."""
    if text is None:
        return None
    if path is None:
        raise ConfigError("hessian --alpha-grid: only applies along a path; give --path STEP too")
    try:
        return [float(a) for a in csv_list(text)]
    except ValueError:
        raise ConfigError(f"hessian --alpha-grid: expected comma-separated numbers in [0, 1] like 0,0.5,1, "
                          f"got {text!r}") from None


def connect_arguments(p: argparse.ArgumentParser) -> None:
    """``connect``: two runs or two state-dict files, and how the path between them is measured (``connect.*``)."""
    from ..stages.connect import ConnectSettings

    what = ("a train_<hash> run, an imp_<hash>/replicate_<r>/level_<l> directory, or a state-dict file (.pt, .pth, "
            ".bin, .safetensors, .ckpt: then give --model and --dataset)")
    p.add_argument("run_a", metavar="A", help=what)
    p.add_argument("run_b", metavar="B", help="the other network, of the same kind as A")
    add_overrides(p, [
        *path_flags("connect"),
        Flag("connect.allow_different_masks", "align sparse networks whose masks differ", switch=True),
        Flag("connect.layers", "also the layer-wise barriers (each layer alone, and cumulatively from the input; "
             "layers.csv)", switch=True),
        Flag("connect.layer_groups", "what --layers interpolates at a time: layers | blocks"),
        *(f for f in RUNTIME_FLAGS if f.key != "runtime.results_root"),
    ], {"connect": ConnectSettings})
    pair_arguments_tail(p, {"connect": ConnectSettings}, "results root for the record (default: A's results root; "
                        "for files runtime.results_root)")


def cmd_connect(args: argparse.Namespace) -> int:
    """The interpolation barrier between two trained networks (runs, or state-dict files)."""
    from ..stages.connect import connect, connect_settings

    given = command_line(args)
    settings = connect_settings(given.tables.get("connect"))
    if is_file(args.run_a) or is_file(args.run_b):
        result = connect_of_files(args, settings)
    else:
        no_file_flags(args, "connect", given.run)
        result = connect(args.run_a, args.run_b, settings, results_root=args.out)
    if args.json:
        report.print_json({**result.summary, "layers": result.layers} if result.layers else result.summary)
    else:
        report.connect(result, settings)
        for row in result.layers:
            print(f"{row['split']:>6} {row['group']:>16}: error barrier {float(row['barrier']):.4f} alone (above the "
                  f"chord {float(row['chord_barrier']):.4f}), {float(row['cumulative_barrier']):.4f} cumulative "
                  "from the input")
    return 0
