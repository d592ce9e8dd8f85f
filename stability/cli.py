"""The ``stability`` command: a thin layer over the same functions a notebook calls.

Bad input exits with code 2 and a message naming the setting; nothing is written.
"""
from __future__ import annotations

import os

# Two BLAS thread pools (torch's and OpenBLAS's) on a small machine halve speed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

from .config import Config, load_toml, settings_help  # noqa: E402
from .errors import ConfigError, StabilityError  # noqa: E402

EXIT_BAD_INPUT = 2


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any], str | None]:
    """Config from CONFIG.toml or --preset, then --set, --out, --device, --threads, --quiet.

    Returns the run config, the other TOML tables (stage settings) and the preset name.
    """
    from .presets import get_preset, preset_tables

    extra: dict[str, Any] = {}
    preset = getattr(args, "preset", None)
    if args.config and preset:
        raise ConfigError("give either CONFIG.toml or --preset, not both")
    if args.config:
        cfg, extra = load_toml(args.config)
        preset = extra.pop("preset", None)
    elif preset:
        cfg = get_preset(preset)
        extra = {k: v for k, v in preset_tables(preset).items() if k not in ("description",) and not hasattr(cfg, k)}
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
    return cfg.with_overrides(overrides), extra, preset


def add_common(p: argparse.ArgumentParser) -> None:
    """CONFIG / --preset / --set / --out / --json and runtime flags, shared by the run commands."""
    p.add_argument("config", nargs="?", help="a TOML config file (sections [dataset] [model] [optimizer] [schedule] [training] [runtime])")
    p.add_argument("--preset", help="start from a named preset (see `stability presets`)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--out", metavar="DIR", help="results root (default results/runs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    p.add_argument("--threads", type=int, help="torch threads (default: one per core, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _help_epilog() -> str:
    return "settings (section.key = default):\n" + settings_help()


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    if args.json:
        print(json.dumps(PRESETS, indent=2))
        return 0
    width = max(len(n) for n in PRESETS)
    for name, tables in PRESETS.items():
        print(f"{name:<{width}}  {tables.get('description', '')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .trunk import train_trunk

    cfg, _, _ = load_config(args)
    result = train_trunk(cfg)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if result.reused:
        print(f"already complete: nothing to do; results are in {summary['run_dir']}")
    print(f"run directory       {summary['run_dir']}")
    print(f"final step          {summary['final_step']}it")
    print(f"final test accuracy {summary['final_test_accuracy']:.4f}")
    print(f"rewind checkpoints  {', '.join(summary['checkpoints'])}")
    print(f"time                {summary['seconds']:.1f} s")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}


def build_parser() -> argparse.ArgumentParser:
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

    for extend in _EXTENSIONS:
        extend(sub)
    return parser


# Later stages register their subcommands here (kept in their own modules).
_EXTENSIONS: list[Callable[[Any], None]] = []


def _register_extensions() -> None:
    import importlib

    for name in ("stability.cli_stages",):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        _EXTENSIONS.extend(mod.EXTENSIONS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stability`` console script."""
    _register_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StabilityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
