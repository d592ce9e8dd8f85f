"""Send finished runs to experiment trackers: TensorBoard, Weights & Biases, MLflow (``runtime.trackers``).

A tracker is never part of a result: it reads the records a run wrote (``records.read_report``) after the run
is marked complete, and a tracker that fails (not installed, cannot start, cannot write) prints one warning and
the run goes on. Each tracker is an optional extra (``pip install 'stability[tensorboard]'``, ``[wandb]``,
``[mlflow]``), imported only when named.

When a run is logged: once, when it is computed (``stages.base.run_once`` calls ``log_finished``). A rerun that
reuses the finished run logs nothing, so a series is never doubled; ``stability export`` sends runs already on
disk, each once per export.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ConfigError
from ..store.files import RunDir
from ..store.schema import MANIFEST
from .records import Report, read_report, tracker_group_of, trackers_of
from .sinks import SINKS, Sink

__all__ = ["TRACKERS", "Report", "export", "log_finished", "log_report", "read_report", "require", "sinks_for"]

TRACKERS = tuple(SINKS)  # tensorboard, wandb, mlflow


def _split(spec: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:TARGET``."""
    name, _, target = spec.partition(":")
    return name.strip().lower(), (target or None)


def require(specs: Iterable[str]) -> None:
    """Check tracker names before anything is written: ConfigError for an unknown one or one not installed."""
    for spec in specs:
        name, _ = _split(spec)
        if name not in SINKS:
            raise ConfigError(f"runtime.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        package = SINKS[name].package
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"runtime.trackers: tracker {name!r} needs the package {package!r}: "
                              f"pip install 'stability[{name}]'")


def sinks_for(specs: Iterable[str], results_root: str | Path) -> list[Sink]:
    """The sinks that ``specs`` (``runtime.trackers`` values) name, for runs under ``results_root``."""
    out = []
    for spec in specs:
        name, target = _split(spec)
        out.append(SINKS[name](target, Path(results_root)))
    return out


def log_report(report: Report, sinks: Sequence[Sink]) -> list[str]:
    """Log ``report`` to every sink; a sink that fails warns once (on stderr) and is skipped. The names that
    logged it."""
    done = []
    for sink in sinks:
        try:
            sink.log(report)
        except Exception as exc:  # noqa: BLE001 - a tracker never stops a run, whatever it raises
            _warn_once(sink.name, f"tracker {sink.name} could not log {report.name} ({type(exc).__name__}: {exc})")
        else:
            done.append(sink.name)
    return done


def log_finished(run: RunDir) -> None:
    """Log a run just marked complete to the trackers its settings name (nothing when they name none)."""
    try:
        config = run.manifest().get("config") or {}
        specs = trackers_of(config)
        if not specs:
            return
        require(specs)
        log_report(read_report(run.path, tracker_group_of(config)), sinks_for(specs, run.root))
    except Exception as exc:  # noqa: BLE001 - nor does reading what to log
        _warn_once("trackers", f"trackers could not log {run.path.name} ({type(exc).__name__}: {exc})")


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """One warning per tracker per process: a tracker that fails for every run does not flood the output."""
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}; the run goes on and its records are unaffected (later failures of {key} "
              "are not reported)", file=sys.stderr)


def finished_runs(root: str | Path) -> list[Path]:
    """The run directories under ``root`` (itself one, or holding some, a grid's too) whose status is complete."""
    root = Path(root)
    candidates = [root] if (root / MANIFEST).is_file() else sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    out = []
    for path in candidates:
        kind, _, run_hash = path.name.rpartition("_")
        if RunDir(path.parent, kind, run_hash).status() == "complete":
            out.append(path)
    return out


def export(root: str | Path, to: Sequence[str], group: str | None = None) -> dict[str, list[str]]:
    """Send the finished runs under ``root`` to the trackers ``to``: run name -> the trackers that took it."""
    require(to)
    root = Path(root)
    results_root = root.parent if (root / MANIFEST).is_file() else root
    sinks = sinks_for(to, results_root)
    return {path.name: log_report(read_report(path, group), sinks) for path in finished_runs(root)}
