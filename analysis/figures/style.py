"""The suite's figure style: the Figure class, the ``save=`` decorator, titles, legends and shared axes.

Every figure function takes DataFrames (from :mod:`analysis.load`) and returns a :class:`PaperFigure`;
``save="dir/name"`` also writes ``dir/name.png`` and ``dir/name.pdf`` (``formats`` picks which). Figures are
built as plain ``Figure`` objects, not through ``pyplot``: no global figure registry fills up in a long loop,
nothing depends on the backend, and a notebook shows a returned figure once (not twice).

Conventions: errors and accuracies are stored as fractions and drawn as percent; steps are iterations. When a
frame holds several runs, each run gets its own line(s), labelled with its hash. Titles name the model and the
data by their registry names (``lenet_300_100 (width ×0.5) on mnist5k``).
"""
from __future__ import annotations

import functools
import inspect
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from ..load import settings_of
from .saving import FORMATS, STYLE, check_formats, save_figure

SPLIT_NAMES = {"test": "Test", "train": "Train", "val": "Validation"}
SPLIT_ORDER = ("test", "train", "val")
SPLIT_COLORS = {"test": "C0", "train": "C1", "val": "C2"}
KIND_STYLE = {  # IMP vs its baselines, as in Frankle & Carbin (2019)
    "imp": {"color": "C0", "marker": "o", "linestyle": "-"},
    "reinit": {"color": "C3", "marker": "s", "linestyle": "--"},
    "random": {"color": "C7", "marker": "^", "linestyle": ":"},
}

F = TypeVar("F", bound=Callable[..., Figure])


class PaperFigure(Figure):
    """A Figure that a notebook shows as a PNG by itself: these figures never pass through pyplot."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        with matplotlib.rc_context(STYLE):
            self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def styled(func: F) -> F:
    """Build the figure under the suite's rc style, then save it if ``save=`` was given."""

    @functools.wraps(func)
    def wrapper(*args: Any, save: str | os.PathLike[str] | None = None,
                formats: str | Iterable[str] = FORMATS, **kwargs: Any) -> Figure:
        if save is not None:
            formats = check_formats(formats)  # fail before the (slow) drawing on bad input
        with matplotlib.rc_context(STYLE):
            fig = func(*args, **kwargs)
        if save is not None:
            save_figure(fig, save, formats)
        return fig

    # help() and IDEs show save= and formats= as the function's own keywords.
    sig = inspect.signature(func)
    extra = [inspect.Parameter("save", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="str | os.PathLike[str] | None"),
             inspect.Parameter("formats", inspect.Parameter.KEYWORD_ONLY, default=FORMATS,
                               annotation="str | Iterable[str]")]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- text helpers
def _model_text(settings: Mapping[str, Any]) -> str | None:
    # The registry's own names (no second table of display names to keep in step with it).
    name = settings.get("model.name")
    if name is None:
        return None
    text = str(name)
    if name == "resnet":  # the one model whose depth is a setting: resnet-20, resnet-56
        text += f"-{int(settings.get('model.depth', 20))}"
    width = settings.get("model.width")
    if width is not None and not pd.isna(width) and float(width) != 1.0:
        text += f" (width ×{float(width):g})"
    return text


def describe(df: pd.DataFrame) -> str:
    """'model (width) on dataset' from a frame's settings columns; empty when they vary or are absent."""
    settings = settings_of(df)
    parts = [p for p in (_model_text(settings),) if p]
    dataset = settings.get("dataset.name")
    if dataset is not None:
        parts.append(str(dataset))
    return " on ".join(parts)


def suptitle(fig: Figure, what: str, df: pd.DataFrame, title: str | None, note: str | None = None) -> None:
    """The figure's title: ``title``, or ``what`` and the frame's model and data; ``note`` below it."""
    if title is None:
        desc = describe(df)
        title = f"{what}: {desc}" if desc else what
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)


def plural(n: int, noun: str) -> str:
    """'1 pair', '3 pairs'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# Reference lines (thresholds, markers) go after the data in legends.
REFERENCE_LABELS = ("stability threshold", "first stable step", "edge of stability")


def legend(ax: Any, **kwargs: Any) -> None:
    """The axes' legend with the reference lines after the data."""
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith(REFERENCE_LABELS), i))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], **kwargs)


def multi_run(df: pd.DataFrame) -> bool:
    """Whether the frame holds the records of several runs (each then gets its own lines)."""
    return "run_hash" in df.columns and df["run_hash"].nunique() > 1


def require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Refuse an empty frame, or one without ``columns``, naming the figure function ``what``."""
    if df is None or df.empty:
        raise ValueError(f"{what}: no rows to plot")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the frame lacks column(s) {', '.join(missing)}")


def spread(values: pd.Series) -> np.ndarray:
    """A std column as floats for a band, NaN (a single value) as 0."""
    # One sibling pair or replicate has no spread: draw no band rather than NaN.
    return np.nan_to_num(values.to_numpy(dtype=float), nan=0.0)


def splits_of(df: pd.DataFrame, splits: Sequence[str] | None) -> list[str]:
    """The splits to draw: ``splits`` (each must be in the frame), else those present, test first."""
    present = list(dict.fromkeys(df["split"]))
    if splits is not None:
        missing = [s for s in splits if s not in present]
        if missing:
            raise ValueError(f"split(s) {', '.join(missing)} not in the frame (it has {', '.join(present)})")
        return list(splits)
    return [s for s in SPLIT_ORDER if s in present] + [s for s in present if s not in SPLIT_ORDER]


# viridis without its pale yellow end, which vanishes on white.
CMAP = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, 256)), name="viridis_dark")


def step_colors(steps: Sequence[Any]) -> dict[Any, Any]:
    """One colour per step along the dark viridis map, first to last."""
    n = max(len(steps) - 1, 1)
    return {s: CMAP(i / n) for i, s in enumerate(steps)}


def percent_axis(ax: Any, densities: Iterable[float]) -> None:
    """Log x of percent of weights remaining, decreasing to the right (100 → 1), ticked at the levels."""
    pct = sorted({round(float(d) * 100, 6) for d in densities if d > 0}, reverse=True)
    ax.set_xscale("log")
    if pct:
        ticks = pct if len(pct) <= 9 else pct[:: math.ceil(len(pct) / 9)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(pct[0] * 1.12, pct[-1] / 1.12)  # left > right: sparser to the right
    ax.set_xlabel("Weights remaining (%, log scale)")


__all__ = ["PaperFigure", "describe"]
