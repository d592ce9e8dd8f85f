"""``stability landscape``: loss-landscape planes of runs, configs and state-dict files (``stages.plane``).

    stability landscape --preset NAME [--plane siblings] [--rewind 0it] [--grid 21]    # trunk at k + 2 siblings
    stability landscape CONFIG.toml|TRAIN_RUN [--plane siblings|pca|random] ...         # the same from a config/run
    stability landscape RUN_A RUN_B RUN_C                                               # three finished runs
    stability landscape RUN --plane random --seed 0                                     # around one run
    stability landscape A.pt B.pt C.pt --model NAME --dataset NAME                      # three files
    stability landscape F0.pt F1.pt ... FN.pt --plane pca --model NAME --dataset NAME   # a trajectory of files

``--plane`` defaults to ``siblings`` for a preset, a config or a train run, ``networks`` for three runs or files,
``random`` for one file or IMP level. Bad input exits 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import report
from .files import file_arguments, file_config, is_file, no_file_flags
from .overrides import (
    RUNTIME_FLAGS,
    Flag,
    add_overrides,
    command_line,
    load_config,
    settings_epilog,
)

__all__ = ["arguments", "run"]


def arguments(p: argparse.ArgumentParser) -> None:
    """``landscape``: the networks (or a config), and the plane's settings (aliases of ``plane.*``)."""
    from ..stages.instability import SPLITS
    from ..stages.plane import ANCHORS, BIASBN, PLANE_KINDS, PlaneSettings

    p.add_argument("networks", nargs="*", metavar="NETWORK",
                   help="none (with --preset), a TOML config or a train_<hash> run (the trunk and its siblings), "
                        "one or three finished runs (train_<hash>, imp_<hash>/replicate_<r>/level_<l>), or state-dict "
                        "files (.pt, .pth, .bin, .safetensors, .ckpt) with --model and --dataset")
    p.add_argument("--preset", help="start from a named preset (see `stability presets`)")
    add_overrides(p, [
        *RUNTIME_FLAGS,
        Flag("plane.kind", f"what the plane goes through: {' | '.join(PLANE_KINDS)}", option="--plane"),
        Flag("plane.grid", "grid points along u (and along v unless --grid-v); at least 2"),
        Flag("plane.grid_v", "grid points along v", empty="as --grid"),
        Flag("plane.margin", "the grid spans the networks' bounding box widened by this fraction on each side"),
        Flag("plane.range_u", "LOW,HIGH along u instead of the margin (write --range-u=-1,1)", empty="margin"),
        Flag("plane.range_v", "LOW,HIGH along v", empty="margin"),
        Flag("plane.splits", f"splits to measure, comma-separated: {', '.join(SPLITS)}"),
        Flag("plane.bn", "BatchNorm statistics at each grid point: interpolate | reset"),
        Flag("plane.seed", "seed of the random directions"),
        Flag("plane.biasbn", f"random directions' biases and BatchNorm parameters: {' | '.join(BIASBN)}"),
        Flag("plane.anchor", f"siblings: the trunk's weights at the rewind step or at the end: {' | '.join(ANCHORS)}"),
    ], {"plane": PlaneSettings})
    p.add_argument("--rewind", metavar="STEP", help="siblings: the rewind step k, e.g. 0it or 500it (default 0it)")
    file_arguments(p)
    p.add_argument("--json", action="store_true", help="print plane.json")
    p.epilog = settings_epilog({"plane": PlaneSettings})
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _is_train_run(path: str) -> bool:
    return Path(path).is_dir() and Path(path).name.startswith("train_")


def run(args: argparse.Namespace) -> int:
    """Measure (or reuse) the plane the arguments name and print where its records are."""
    from ..stages.plane import plane_files, plane_settings

    given = command_line(args)
    nets = list(args.networks)
    table = given.tables.get("plane", {})
    kind = table.get("kind")
    if nets and all(is_file(n) for n in nets):
        _refuse(args, "state-dict files", "--preset", "--rewind")
        kind = kind or {1: "random", 3: "networks"}.get(len(nets), "pca")
        cfg = file_config(args, given.run, "landscape")
        result = plane_files(nets, cfg, plane_settings({**table, "kind": kind}))
    elif any(is_file(n) for n in nets):
        raise ConfigError(f"landscape: give state-dict files or runs, not a mix ({', '.join(nets)})")
    elif len(nets) == 3 or (len(nets) == 1 and Path(nets[0]).is_dir() and not _is_train_run(nets[0])):
        result = _of_runs(args, given, nets, kind or ("networks" if len(nets) == 3 else "random"), table)
    elif len(nets) <= 1:
        result = _of_config(args, nets, kind)
    else:
        raise ConfigError(f"landscape: give one or three runs (or state-dict files), got {len(nets)}")
    if args.json:
        report.print_json({"run_dir": str(result.run_dir), **result.summary})
    else:
        _report(result)
    return 0


def _refuse(args: argparse.Namespace, what: str, *flags: str) -> None:
    for flag in flags:
        if getattr(args, flag[2:]) is not None:
            raise ConfigError(f"landscape {flag}: does not apply to {what}")


def _of_runs(args: argparse.Namespace, given: Any, nets: list[str], kind: str, table: dict[str, Any]) -> Any:
    from ..stages.plane import plane_runs, plane_settings

    _refuse(args, "finished runs", "--preset", "--rewind")
    no_file_flags(args, "landscape", {k: v for k, v in given.run.items() if not k.startswith("runtime.")})
    return plane_runs(nets, plane_settings({**table, "kind": kind}), runtime=given.run)


def _of_config(args: argparse.Namespace, nets: list[str], kind: str | None) -> Any:
    from ..stages.plane import plane_random, plane_settings, plane_siblings, plane_trajectory

    no_file_flags(args, "landscape")
    args.config = nets[0] if nets else None
    args.run_dir_config = True
    inputs = load_config(args)
    table = inputs.tables.get("plane", {})
    kind = kind or table.get("kind") or "siblings"
    settings = plane_settings({**table, "kind": kind})
    if kind != "siblings" and args.rewind is not None:
        raise ConfigError(f"landscape --rewind: only for --plane siblings (the plane is {kind})")
    if kind == "siblings":
        return plane_siblings(inputs.cfg, settings, args.rewind or 0)
    if kind == "pca":
        return plane_trajectory(inputs.cfg, settings)
    if kind == "random":
        return plane_random(inputs.cfg, settings)
    raise ConfigError("landscape --plane networks: give three runs or three state-dict files")


def _report(result: Any) -> None:
    s = result.summary
    nu, nv = s["grid"]
    print(f"plane ({s['kind']}): {nu} x {nv} grid, u in [{s['u'][0]:.4g}, {s['u'][-1]:.4g}], "
          f"v in [{s['v'][0]:.4g}, {s['v'][-1]:.4g}], bn={s['settings']['bn']}")
    for split, values in s["at_networks"].items():
        rows = [r for r in result.rows if r["split"] == split]
        print(f"{split}: grid loss {min(r['loss'] for r in rows):.4g} .. {max(r['loss'] for r in rows):.4g}, "
              f"error {min(r['error'] for r in rows):.4f} .. {max(r['error'] for r in rows):.4f}")
        for name, (u, v) in s["networks"].items():
            print(f"  {name:<16} at ({u:9.4g}, {v:9.4g}): error {values[name]['error']:.4f}, "
                  f"loss {values[name]['loss']:.4g}")
    if s.get("trajectory"):
        print(f"trajectory: {len(s['trajectory'])} points; explained variance "
              f"{', '.join(f'{e:.1%}' for e in s['explained'])}")
    print(f"results: {result.run_dir}")
    for split in s["untrained"]:
        print(f"warning: {split}: a network's error is near chance", file=sys.stderr)
