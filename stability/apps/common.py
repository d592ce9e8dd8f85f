"""What several subcommands' arguments share: comma-separated lists, the run arguments (CONFIG, --preset,
--set with the runtime flags, --json) and the flags of how an interpolation path is measured."""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from .overrides import RUNTIME_FLAGS, Flag, add_overrides, settings_epilog

__all__ = ["csv_list", "path_flags", "run_arguments"]


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_arguments(p: argparse.ArgumentParser, flags: Sequence[Flag] = (), stages: Mapping[str, type] | None = None,
                   config_help: str = "a TOML config file") -> None:
    """CONFIG / --preset / --json, then --set with the runtime flags and the command's own aliases."""
    p.add_argument("config", nargs="?", help=f"{config_help} (sections [dataset] [model] [optimizer] [schedule] "
                                             "[training] [runtime], and the stage tables)")
    p.add_argument("--preset", help="start from a named preset (see `stability presets`)")
    add_overrides(p, [*RUNTIME_FLAGS, *flags], stages)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.epilog = settings_epilog(stages)
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def path_flags(section: str) -> list[Flag]:
    """How the interpolation path is measured: the same settings for sweeps and for ``connect``."""
    from ..maths.interpolation import ALIGN_METHODS, BN_MODES
    from ..stages.instability import SPLITS

    return [
        Flag(f"{section}.alphas", "number of evenly spaced alphas in [0, 1]"),
        Flag(f"{section}.splits", f"splits to measure, comma-separated: {', '.join(SPLITS)}"),
        Flag(f"{section}.bn", f"BatchNorm statistics along the path: {' | '.join(BN_MODES)}"),
        Flag(f"{section}.align", f"permutation alignment of each pair before interpolating: {' | '.join(ALIGN_METHODS)} "
                                 "(none: as Frankle et al. 2020)"),
        Flag(f"{section}.repair", "REPAIR each interpolated network (Jordan et al. 2023)", switch=True),
        Flag(f"{section}.align_examples", "training examples for activation matching and REPAIR"),
    ]
