"""``stability export``: send finished runs already on disk to a tracker (TensorBoard, W&B, MLflow).

    stability export ROOT --to tensorboard|wandb|mlflow[:TARGET] [--to ...] [--group NAME] [--json]

ROOT is a results root (every finished run in it) or one run directory. Each run becomes one tracker run, with
the same series, settings and tags a live run logs (``stability.trackers``); ``--group`` groups them (a W&B group,
an MLflow experiment, a TensorBoard folder under TARGET). Each export logs each run once; exporting twice logs
twice. An unknown tracker, or one whose package is missing, exits 2 naming the extra, before anything is sent.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError

__all__ = ["cmd_export", "export_arguments"]

EXPORT_HELP = "send finished runs on disk to TensorBoard, W&B or MLflow"


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="a results root, or one run directory")
    p.add_argument("--to", action="append", required=True, metavar="NAME[:TARGET]",
                   help="tensorboard (TARGET: a log root; default <run>/tb), wandb (TARGET: project), mlflow "
                        "(TARGET: tracking URI; default the file store mlruns/ beside ROOT); repeatable")
    p.add_argument("--group", default=None, help="group the runs under this name (e.g. a grid's name)")
    p.add_argument("--json", action="store_true", help="print run -> trackers as JSON")


def cmd_export(args: argparse.Namespace) -> int:
    from ..trackers import export

    root = Path(args.root)
    if not root.is_dir():
        raise ConfigError(f"export: {str(root)!r} is not a directory")
    logged = export(root, args.to, group=args.group)
    if args.json:
        print(json.dumps(logged, indent=2))
    else:
        for name, trackers in logged.items():
            print(f"{name}: {', '.join(trackers) or 'not logged'}")
        print(f"{len(logged)} finished runs sent to {', '.join(args.to)}")
    return 0
