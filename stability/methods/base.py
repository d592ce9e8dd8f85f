"""What a training method is: the protocol the resumable loop, checkpoint replay and the trunk call.

A ``Method`` says how a run trains its weights. The drivers (``stages.context``, ``stages.training``,
``stages.trunk``) never name a method: they look it up once (``methods.method_of``) and call it:

- ``build(model, cfg, seed)``: the model the run trains (strong tickets: scores over frozen weights);
- ``check(run)``: refuse settings this model and data cannot run, before anything is written;
- ``hooks(run, rundir, first, n)``: what the method does inside one training run (``TrainHooks``: NEq's
  frozen neurons), the same object for training and for the trunk's checkpoint replay;
- ``summary(...)``: the keys it adds to the run's ``summary.json``, read from its records (``None``
  when they are missing or damaged, so a finished run is trained again from its newest intact state).

Its capability flags replace the stages' refusals by name: ``trains_weights`` (IMP, early-bird
tickets and alignment act on trained weights) and ``accepts_masks`` (training under pruning masks or
frozen weights). ``section`` names the settings section only this method reads: ``methods.validate_run``
refuses that section changed under another method, with one message for every method.

A method sees a run only through ``RunParts`` (``stages.context.Context`` has all of it), so methods sit
below the stages and never import them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    import torch

    from ..config import Config
    from ..data import DataSplits
    from ..engine import Members
    from ..store.files import RunDir

Masks = Mapping[str, Tensor]


class RunParts(Protocol):
    """What a method may see of a run: its settings, data, model template and step arithmetic."""

    cfg: Config
    device: torch.device
    data: DataSplits
    model: nn.Module
    ipe: int  # iterations per epoch
    total_steps: int


class TrainHooks(Protocol):
    """A method inside one training run: masks that change as it trains (NEq's ``NeqRun``)."""

    # what the mask-0 coordinates do: True = held at their values (``TrainSpec.freeze``), False = pruned
    freeze: bool

    def covered(self, step: int) -> bool:
        """Whether the method's own records cover every step before ``step`` (a state saved there may be used)."""
        ...

    def attach(self, members: Members) -> Masks:
        """Continue from the state ``members`` carry; the masks in force from their step on."""
        ...

    def __call__(self, members: Members) -> Masks | None:
        """The engine's ``update_masks``: the masks from the members' step on, or None to keep those in force."""
        ...


class Method:
    """A training method; this base is plain weight training, and each method overrides what it changes."""

    name: str = ""
    section: str | None = None  # the settings section only this method reads ([strong], [neq])
    trains: str = "trains every weight"  # what it trains, as messages say it after its name
    trains_weights: bool = True  # IMP, early-bird tickets and alignment need trained weights
    accepts_masks: bool = True  # it can train under pruning masks or frozen weights
    records: str | None = None  # its own record file in a run directory, named when it is missing or damaged

    def validate(self, cfg: Config) -> None:
        """Check the values of this method's own ``section`` (ConfigError naming the setting and allowed values)."""

    def build(self, model: nn.Module, cfg: Config, seed: int) -> nn.Module:
        """The model a run trains, made from the freshly built ``model`` (seeded by the run's init ``seed``)."""
        return model

    def check(self, run: RunParts) -> None:
        """Refuse settings this model and data cannot run (before anything is written)."""

    def hooks(self, run: RunParts, rundir: RunDir | None, first: int, n: int) -> TrainHooks | None:
        """What the method does inside the training of ``n`` members from step ``first`` in ``rundir``
        (None: a replay that keeps no records), or None when the engine needs nothing from it."""
        return None

    def summary(self, run: RunParts, rundir: RunDir, first: int, end: int,
                final: Callable[[], Mapping[str, Tensor]]) -> dict[str, Any] | None:
        """The keys this method adds to ``summary.json`` for training from ``first`` to ``end``, from its records
        and, when it needs them, the final weights (``final()``: member 0's state dict at ``end``); None when
        its records are missing or damaged."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def changed_settings(section: Any) -> list[str]:
    """The fields of a settings section (a frozen dataclass) that differ from the section's defaults."""
    default = type(section)()
    return [f.name for f in fields(section) if getattr(section, f.name) != getattr(default, f.name)]
