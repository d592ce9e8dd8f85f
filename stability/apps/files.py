"""The command line's side of state-dict files trained elsewhere (``stability connect A.pt B.ckpt``,
``stability hessian final.safetensors``): the flags that stand for what a file does not carry (its architecture
and the data to measure it on), and the calls into ``stages.external``."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .overrides import command_line, settings_epilog

FILE_FLAGS = ("--model", "--stem", "--dataset")


def file_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--stem`` and ``--dataset``: what a state-dict file does not carry."""
    p.add_argument("--model", metavar="NAME", help="checkpoint files: the architecture, e.g. lenet_300_100, "
                                                   "torchvision/resnet18, or one a --plugin registers [model.name]")
    p.add_argument("--stem", help="checkpoint files of torchvision/* models: default | cifar [model.stem]")
    p.add_argument("--dataset", metavar="NAME", help="checkpoint files: the data to measure on, e.g. mnist5k "
                                                     "[dataset.name]")


FILE_SETTINGS_NOTE = ("\n\ncheckpoint files: --set model.KEY=VALUE, dataset.KEY=VALUE and runtime.KEY=VALUE set the rest "
                      "of the architecture, the data and the runtime (see `stability train --help` for their defaults)")


def pair_arguments_tail(p: argparse.ArgumentParser, stages: Mapping[str, type], out_help: str,
                        json_help: str | None = None) -> None:
    """What every command over two networks (runs or state-dict files) ends with: ``--out``, the file flags,
    ``--json`` and the epilog of its settings plus how files take the run sections."""
    p.add_argument("--out", metavar="DIR", help=out_help)
    file_arguments(p)
    p.add_argument("--json", action="store_true", help=json_help)
    p.epilog = settings_epilog(stages, run=False) + FILE_SETTINGS_NOTE
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def is_file(path: str | None) -> bool:
    """Whether a positional argument names a state-dict file (by its suffix) rather than a run or a config."""
    from ..store.statefiles import is_state_file

    return path is not None and is_state_file(path) and not os.path.isdir(path)


def no_file_flags(args: argparse.Namespace, command: str, run: Mapping[str, Any] | None = None) -> None:
    """Refuse ``--model``, ``--stem``, ``--dataset`` (and ``run``: run settings a run directory carries itself) where
    no state-dict file is given."""
    for flag in FILE_FLAGS:
        if getattr(args, flag[2:]) is not None:
            raise ConfigError(f"{command} {flag}: applies only to state-dict files (.pt, .pth, .bin, .safetensors, "
                              ".ckpt); a run or a config names its own model and dataset (--set changes them)")
    if run:
        raise ConfigError(f"--set {next(iter(run))}: a run directory carries its own settings; [model], [dataset] "
                          "and [runtime] settings apply only to state-dict files")


def file_config(args: argparse.Namespace, run: Mapping[str, Any], command: str) -> Any:
    """The [model], [dataset] and [runtime] settings a checkpoint file is measured under (``stages.external``)."""
    from ..stages.external import file_config as config

    missing = [flag for flag in ("--model", "--dataset") if not getattr(args, flag[2:])]
    if missing:
        raise ConfigError(f"{command}: a checkpoint file needs {' and '.join(missing)} NAME (the architecture its "
                          "weights fit, and the data to measure it on)")
    given = {"model.name": args.model, "dataset.name": args.dataset, **({"model.stem": args.stem} if args.stem else {}),
             **({"runtime.results_root": args.out} if getattr(args, "out", None) else {})}
    return config({**run, **given})


def connect_of_files(args: argparse.Namespace, settings: Any) -> Any:
    """``connect A B`` of two state-dict files (ConfigError when only one of them is a file)."""
    from ..stages.external import connect_files

    if not (is_file(args.run_a) and is_file(args.run_b)):
        raise ConfigError(f"connect A B: give two run directories or two state-dict files, not one of each "
                          f"({args.run_a!r}, {args.run_b!r})")
    return connect_files(args.run_a, args.run_b, file_config(args, command_line(args).run, "connect"), settings)


def hessian_of_file(args: argparse.Namespace, trace: Mapping[str, Any]) -> tuple[Any, str]:
    """``hessian CKPT``: the probe of a state-dict file, and the column that names its row."""
    from ..hessian.settings import hessian_settings
    from ..stages.external import POINT, hessian_file

    given = command_line(args)
    for flag, value in (("--preset", args.preset), ("--at", args.at), ("--every", args.every),
                        ("--path", args.path), ("--alpha-grid", args.alpha_grid)):
        if value is not None:
            raise ConfigError(f"hessian {flag}: applies to a run, not to a checkpoint file ({args.config})")
    settings = hessian_settings({**given.tables.get("hessian", {}), **trace})
    return hessian_file(args.config, file_config(args, given.run, "hessian"), settings), POINT
