"""Command-line overrides, parsed in one place: ``--set section.key=value`` and the flags that alias it.

Every per-stage flag (``--siblings``, ``--levels``, ...) and runtime flag (``--out``, ``--device``, ...) is a
``Flag``: the setting it stands for, a line of help, and nothing else. Its default and help are read from
the settings dataclass, and its value goes through the same conversion and validation as ``--set``, so a
rule or a default is written once, where the setting is declared.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEVICES, SECTIONS, Config, RuntimeConfig, settings_help
from ..config.nested import flat_settings
from ..errors import ConfigError

_DEST = "set:"  # argparse destination prefix of every alias: its value is the setting's, as --set would give it


@dataclass(frozen=True)
class Flag:
    """A flag that stands for ``--set KEY=VALUE``."""

    key: str  # section.name of the setting
    help: str  # what it means; the default is appended from the settings dataclass
    option: str = ""  # the flag; "" = --name, underscores as dashes
    switch: bool = False  # no value: sets the setting to true
    repeat: bool = False  # may be given several times: the values form the setting's list
    empty: str = ""  # what an empty default (0, "", ()) stands for, e.g. "training.rewind_points"
    metavar: str = ""  # "" = the flag's name in capitals

    @property
    def flag(self) -> str:
        return self.option or "--" + self.key.split(".", 1)[1].replace("_", "-")


# The runtime flags of every command that runs from a config.
RUNTIME_FLAGS = (
    Flag("runtime.results_root", "results root", option="--out", metavar="DIR"),
    Flag("runtime.device", f"where to train: {' | '.join(DEVICES)}"),
    Flag("runtime.threads", "torch threads", empty="one per core, at most 8"),
    Flag("runtime.quiet", "no progress bar", switch=True),
    Flag("runtime.plugins", "import MODULE first: it registers models/datasets (stability.register_model, ...)",
         option="--plugin", repeat=True, metavar="MODULE", empty="none"),
    Flag("runtime.trackers", "also send finished runs to NAME: tensorboard, wandb or mlflow (NAME:TARGET names "
         "a log root, W&B project or MLflow URI)", option="--tracker", repeat=True, metavar="NAME", empty="none"),
)


def defaults(settings: Any) -> dict[str, Any]:
    """Every setting of a settings dataclass (class or instance) by name, nested settings flattened."""
    return flat_settings(settings() if isinstance(settings, type) else settings)


def shown(value: Any, empty: str = "") -> str:
    """A default as the help shows it: a list comma-separated, an empty value as what it stands for."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        value = ",".join(str(v) for v in value)
    if empty and value in ("", 0, "0"):
        return empty
    return str(value)


def add_overrides(parser: argparse.ArgumentParser, flags: Sequence[Flag] = (),
                  stages: Mapping[str, type] | None = None, *, run: bool = True) -> None:
    """Add ``--set`` and ``flags`` to ``parser``; ``stages``: the stage settings the command reads, by section.

    ``run``: whether the command has a run config (the run sections may be set).
    """
    stages = dict(stages or {})
    sections = ([*SECTIONS] if run else []) + list(stages)
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help=f"override one setting (repeatable); sections: {', '.join(sections)}")
    settings: dict[str, Any] = {**({"runtime": RuntimeConfig} if run else {}), **stages}
    for flag in flags:
        section, name = flag.key.split(".", 1)
        default = defaults(settings[section])[name]  # a flag for a setting that does not exist fails here
        if flag.switch:
            parser.add_argument(flag.flag, dest=_DEST + flag.key, action="store_const", const=True,
                                help=_escape(f"{flag.help} [{flag.key}]"))
            continue
        parser.add_argument(flag.flag, dest=_DEST + flag.key, action="append" if flag.repeat else None,
                            metavar=flag.metavar or flag.flag.lstrip("-").upper().replace("-", "_"),
                            help=_escape(f"{flag.help} [{flag.key}; default {shown(default, flag.empty)}]"))
    parser.set_defaults(set_sections=tuple(sections), stage_sections=tuple(stages))


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help


def settings_epilog(stages: Mapping[str, type] | None = None, *, run: bool = True) -> str:
    """``--help``'s list of every setting with its default: the run sections' (``run``), then the stages'."""
    lines = [settings_help()] if run else []
    for section, cls in (stages or {}).items():
        lines += [f"  {section}.{name} = {json.dumps(_plain(value))}" for name, value in defaults(cls).items()]
    return "settings (section.key = default):\n" + "\n".join(lines)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Overrides:
    """What the command line sets: run settings (``{"section.key": value}``) and stage tables by section."""

    run: dict[str, Any]
    tables: dict[str, dict[str, Any]]


def command_line(args: argparse.Namespace) -> Overrides:
    """Every ``--set`` and every aliasing flag of ``args``, in that order (a flag wins over ``--set``).

    Values stay as written: run settings are converted by ``Config.with_overrides`` and stage settings
    by their settings' table reader, so both name the setting when a value is wrong.
    """
    sections: tuple[str, ...] = getattr(args, "set_sections", ())
    given: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        given[key] = value
    for dest, value in vars(args).items():
        if dest.startswith(_DEST) and value is not None:
            given[dest[len(_DEST):]] = value
    stages = getattr(args, "stage_sections", ())
    run: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in given.items():
        section, _, name = key.partition(".")
        if section not in sections:
            raise ConfigError(f"--set {key!r}: unknown section {section!r}; sections are {', '.join(sections)}")
        if section in stages:
            if not name:
                raise ConfigError(f"--set {key!r}: write it as {section}.key=value")
            tables.setdefault(section, {})[name] = value
        else:
            run[key] = value
    return Overrides(run, tables)


@dataclass(frozen=True)
class Inputs:
    """A command's run config, its stage tables (file's or preset's, then the command line's) and overrides."""

    cfg: Config
    tables: dict[str, dict[str, Any]]
    given: Overrides


def load_config(args: argparse.Namespace) -> Inputs:
    """The config of CONFIG.toml, --preset or (where the command takes one) a train run directory, overridden.

    A run directory's results root is its parent; the command line's overrides come last.
    """
    from ..presets import get_preset, load_toml, stage_tables

    given = command_line(args)
    preset = getattr(args, "preset", None)
    if args.config and preset:
        raise ConfigError("give either CONFIG.toml or --preset, not both")
    extra: dict[str, dict[str, Any]] = {}
    if args.config and getattr(args, "run_dir_config", False) and Path(args.config).is_dir():
        from ..stages.landscape import config_from_run

        cfg = config_from_run(args.config)
    elif args.config:
        cfg, extra = load_toml(args.config)
    elif preset:
        cfg, extra = get_preset(preset), stage_tables(preset)
    else:
        raise ConfigError("give a CONFIG.toml or --preset NAME (see `stability presets`)")
    tables = {s: {**extra.get(s, {}), **given.tables.get(s, {})} for s in {*extra, *given.tables}}
    return Inputs(cfg.with_overrides(given.run), tables, given)
