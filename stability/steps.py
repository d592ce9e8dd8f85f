"""Training positions written as ``500it``, ``2ep`` or ``2ep50it``.

One epoch is ``n_train // batch_size`` iterations: the last partial batch of an
epoch is dropped, so every batch has the same size.

Records name a swept point by its iteration; the point ``independent`` (networks
trained from different initializations, measured beside the siblings of an
instability sweep) is recorded as ``rewind_step = INDEPENDENT_STEP``. Writers
(``stages.instability``) and readers (``analysis``) take both names from here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ConfigError

_STEP_RE = re.compile(r"^\s*(?:(\d+)\s*ep)?\s*(?:(\d+)\s*it)?\s*$")


@dataclass(frozen=True)
class Step:
    """A position in training: ``epochs`` whole epochs plus ``iterations`` iterations."""

    epochs: int = 0
    iterations: int = 0

    @classmethod
    def parse(cls, value: str | int | Step, setting: str = "step") -> Step:
        """Parse ``500it``, ``2ep``, ``2ep50it`` or a non-negative integer (iterations)."""
        if isinstance(value, Step):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"{setting}: expected a step like '500it', '2ep' or '2ep50it', got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ConfigError(f"{setting}: a step cannot be negative, got {value}")
            return cls(0, value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return cls(0, int(text))
            m = _STEP_RE.match(text)
            if m and (m.group(1) or m.group(2)):
                return cls(int(m.group(1) or 0), int(m.group(2) or 0))
        raise ConfigError(
            f"{setting}: malformed step {value!r}; write iterations and/or epochs "
            "like '500it', '2ep' or '2ep50it' (or a plain integer of iterations)"
        )

    def to_iterations(self, iterations_per_epoch: int) -> int:
        """The absolute iteration this step names."""
        return self.epochs * iterations_per_epoch + self.iterations

    def __str__(self) -> str:
        if self.epochs and self.iterations:
            return f"{self.epochs}ep{self.iterations}it"
        if self.epochs:
            return f"{self.epochs}ep"
        return f"{self.iterations}it"


def to_iterations(value: str | int | Step, iterations_per_epoch: int, setting: str = "step") -> int:
    """Parse a step and convert it to iterations."""
    return Step.parse(value, setting).to_iterations(iterations_per_epoch)


def format_step(iteration: int) -> str:
    """Canonical string for an iteration count (``'500it'``)."""
    return f"{int(iteration)}it"


# The rewind point "independent" of an instability sweep, as written in settings and as recorded in tables.
INDEPENDENT = "independent"
INDEPENDENT_STEP = -1


def point_name(step: float | None) -> str:
    """A swept point for people: ``'50it'``, ``'independent'`` for independently trained networks, '-' for none."""
    if step is None or (isinstance(step, float) and math.isnan(step)):
        return "-"  # a missing step in a record frame (NaN): no stable step, say
    return INDEPENDENT if int(step) == INDEPENDENT_STEP else format_step(int(step))
