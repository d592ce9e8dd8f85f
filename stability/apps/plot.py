"""``stability plot``: figures from records on disk, a thin layer over :func:`analysis.figures.plot_all`.

    stability plot RESULTS... [--kind curves|sweep|imp|hessian|training|earlybird|neq|all] [--out DIR]
                              [--format png,pdf]

The kinds, their help and the formats come from ``analysis.figures`` (its table ``FIGURES``), which imports
neither matplotlib nor pandas until something is drawn, so `stability --help` stays quick. Bad input (an
unknown kind or format, a RESULTS path that does not exist) raises ConfigError naming the option and its
allowed values before anything is written; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from analysis.figures import FIGURES, FORMATS, KINDS, check_formats, check_kinds, plot_all

from ..errors import ConfigError

_KIND_HELP = ", ".join(f"{kind} = {entry.shows}" for kind, entry in FIGURES.items()) + \
    ", all = every figure the records allow"


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


def cmd_plot(args: argparse.Namespace) -> int:
    """Write the figures for ``args.results`` and print their paths; 1 when there was nothing to draw."""
    kinds = check_kinds(args.kind)
    formats = check_formats(args.format)
    sources = [Path(r) for r in args.results]
    for path in sources:
        if not path.exists():
            raise ConfigError(f"RESULTS: {str(path)!r} does not exist; give a results root or a run directory")
    out = Path(args.out) if args.out else sources[0] / "figures"

    written = plot_all(sources, out, formats=formats, kinds=kinds)
    if not written:
        where = ", ".join(str(s) for s in sources)
        print(f"no records to draw {args.kind} figures from under {where}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


__all__ = ["add_parser", "cmd_plot"]
