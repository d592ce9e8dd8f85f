"""Is a result science? Chance-level detection for endpoints that never learned.

A network whose error is within ``margin`` of chance (the error of always
predicting the split's most frequent class) is *untrained*: its interpolation
barrier is ~0 because nothing was learned, not because it is stable, and its
accuracy "matches" an equally untrained dense network. Such points are flagged,
never counted as stable or matching. Divergence (non-finite loss or weights) is
detected by the training loop (``engine.train_members``) and raised as
``TrainingDiverged``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

DEFAULT_CHANCE_MARGIN = 0.05


def chance_error(y: Tensor) -> float:
    """Error of always predicting the most frequent class of labels ``y``."""
    if len(y) == 0:
        return float("nan")
    counts = torch.bincount(y.detach().to("cpu", torch.long))
    return 1.0 - float(counts.max()) / len(y)


def is_untrained(error: float, chance: float, margin: float) -> bool:
    """Whether an error is within ``margin`` of chance (NaN counts as untrained)."""
    return not error < chance - margin


def check_margin(margin: float, setting: str) -> float:
    """A chance margin must be a number in [0, 1)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ConfigError(f"{setting}: must be a number in [0, 1) (a fraction of examples: an endpoint whose error "
                          f"is within it of chance is flagged untrained), got {margin!r}")
    return float(margin)
