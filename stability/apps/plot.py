"""``stability plot``: figures from records on disk, a thin layer over :func:`analysis.figures.plot_all`.

    stability plot RESULTS... [--kind curves|sweep|imp|hessian|training|all] [--out DIR] [--format png,pdf]

Bad input (an unknown kind or format, a RESULTS path that does not exist) raises
ConfigError naming the option and its allowed values before anything is written;
the CLI turns it into exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Kept here as well as in analysis.figures so that `stability --help` does not import matplotlib.
KINDS = ("curves", "sweep", "imp", "hessian", "training", "earlybird", "neq", "all")
FORMATS = ("png", "pdf")
_KIND_HELP = ("curves = interpolation curves, sweep = instability vs rewind step, imp = lottery-ticket levels "
              "and rewind comparisons (and strong tickets beside them), hessian = eigenvalues, trace and spectral density, training = loss and "
              "error curves, earlybird = early-bird mask distances, neq = frozen neurons and FLOPs saved over training, "
              "all = every figure the records allow")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` subcommand to the ``stability`` argparse tree."""
    p = subparsers.add_parser("plot", help="figures from results on disk (PNG and PDF)",
                              description="Draw every figure the records under RESULTS allow and print the files "
                                          "written. " + _KIND_HELP + ".")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="a results root (e.g. results/runs) or a single run directory; several may be given")
    p.add_argument("--kind", default="all", help=f"{' | '.join(KINDS)}, or several comma-separated (default all)")
    p.add_argument("--out", metavar="DIR", help="where figures go (default: RESULTS/figures of the first RESULTS)")
    p.add_argument("--format", dest="format", default="png,pdf",
                   help=f"comma-separated file formats from {', '.join(FORMATS)} (default png,pdf)")
    p.set_defaults(func=cmd_plot)
    return p


def _choices(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        shown = repr(bad[0]) if bad else "nothing"
        raise ConfigError(f"{option}: unknown value {shown}; choose from {', '.join(allowed)} (comma-separated)")
    return list(dict.fromkeys(items))


def cmd_plot(args: argparse.Namespace) -> int:
    """Write the figures for ``args.results`` and print their paths; 1 when there was nothing to draw."""
    kinds = _choices(args.kind, KINDS, "--kind")
    formats = _choices(args.format, FORMATS, "--format")
    sources = [Path(r) for r in args.results]
    for path in sources:
        if not path.exists():
            raise ConfigError(f"RESULTS: {str(path)!r} does not exist; give a results root or a run directory")
    out = Path(args.out) if args.out else sources[0] / "figures"

    from analysis.figures import plot_all  # matplotlib only when plotting

    written = plot_all(sources, out, formats=formats, kinds=kinds)
    if not written:
        where = ", ".join(str(s) for s in sources)
        print(f"no records to draw {', '.join(kinds)} figures from under {where}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


__all__ = ["FORMATS", "KINDS", "add_parser", "cmd_plot"]
