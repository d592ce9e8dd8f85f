"""Errors the suite raises for bad input; the CLI turns them into exit code 2."""
from __future__ import annotations


class StabilityError(Exception):
    """Base class for errors a user can fix by changing their input."""


class ConfigError(StabilityError, ValueError):
    """A setting has a value the suite cannot use; the message names it and the allowed values."""


class CheckpointError(StabilityError):
    """A checkpoint is missing, truncated, or does not match the model."""


class DatasetError(StabilityError):
    """A dataset cannot be found or read."""
