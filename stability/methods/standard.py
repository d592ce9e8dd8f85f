"""Plain training: every weight trains (the ``Method`` base's behaviour, under the name ``standard``)."""
from __future__ import annotations

from .base import Method


class Standard(Method):
    """``training.method = standard``: stochastic gradient descent on every weight, nothing else."""

    name = "standard"


STANDARD = Standard()
