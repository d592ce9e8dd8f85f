"""The output formats, the rc style every figure is drawn and saved under, and atomic saving.

Light on purpose: ``analysis.figures`` and ``stability plot`` read ``FORMATS`` and check formats without
importing matplotlib, which :func:`save_figure` imports when it writes.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stability.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("png", "pdf")

STYLE: dict[str, Any] = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "errorbar.capsize": 3,
    "savefig.dpi": 150,
}


def check_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """Validated output formats ("png", "pdf"); a comma-joined string is accepted."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ConfigError(f"--format: unknown format {bad[0] if bad else '(none)'!r}; choose from "
                          f"{', '.join(FORMATS)} (comma-separated)")
    return out


def save_figure(fig: Figure, stem: str | os.PathLike[str], formats: str | Iterable[str] = FORMATS) -> list[Path]:
    """Write ``stem.<format>`` for each format (atomically) and return the paths."""
    import matplotlib

    formats = check_formats(formats)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        # Same rule as the run store: a killed process leaves the old file or the new one, never half.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with matplotlib.rc_context(STYLE):
                fig.savefig(tmp, format=fmt, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(path)
    return written


__all__ = ["FORMATS", "STYLE", "check_formats", "save_figure"]
