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


class TrainingDiverged(Exception):
    """Training produced a non-finite loss or weight: the run is recorded as ``diverged``, not as a result.

    Not a ``StabilityError``: the input was well-formed, the run failed. The CLI exits with code 3.
    """

    def __init__(self, message: str, *, step: int, member: int | None = None, tensor: str | None = None,
                 run_dir: str | None = None):
        super().__init__(message)
        self.step = step
        self.member = member
        self.tensor = tensor
        self.run_dir = run_dir

    def info(self) -> dict:
        """JSON-able description, as recorded in the run's manifest."""
        return {"step": self.step, "member": self.member, "tensor": self.tensor, "run_dir": self.run_dir,
                "message": str(self)}

    @classmethod
    def from_info(cls, info: dict) -> TrainingDiverged:
        return cls(info.get("message", "training diverged"), step=info.get("step", -1), member=info.get("member"),
                   tensor=info.get("tensor"), run_dir=info.get("run_dir"))


class RecordError(StabilityError):
    """A JSON or CSV record of a run is truncated or corrupt."""
