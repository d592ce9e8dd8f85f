"""Rewind checkpoints from a Lightning ``Trainer``, for ``stability.lmc.sweep``.

``RewindCheckpoints`` is a callback that writes the network's weights at chosen global steps (optimizer steps, as
Lightning counts them) as ``<dirpath>/step_<k>.safetensors``; ``rewind_checkpoints(dirpath)`` lists them as the
``{step: file}`` that ``lmc.sweep`` takes:

>>> trainer = lightning.pytorch.Trainer(max_steps=2000, callbacks=[RewindCheckpoints([0, 100, 500], "rewind")])
>>> trainer.fit(lit_module, train_loader)
>>> stability.lmc.sweep(rewind_checkpoints("rewind"), my_train, data=test_loader, template=net).first_stable_step

Lightning itself is imported when this module is (``pip install stability[lightning]``); without it,
``rewind_checkpoints`` still reads a folder and ``RewindCheckpoints`` says what to install.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..store.files import save_tensors
from ..store.schema import CHECKPOINT_GLOB, checkpoint_step, step_file

__all__ = ["RewindCheckpoints", "file_name", "rewind_checkpoints"]

INSTALL = "RewindCheckpoints needs Lightning: pip install stability[lightning] (or pip install lightning)"

try:
    from lightning.pytorch import Callback
except ImportError as _missing:  # the callback cannot exist; rewind_checkpoints still reads a folder
    _IMPORT_ERROR: ImportError | None = _missing

    class Callback:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(INSTALL) from _IMPORT_ERROR
else:
    _IMPORT_ERROR = None


def file_name(step: int) -> str:
    """The file of rewind step ``step``: ``step_<step>.safetensors`` (the run store's name for a step's weights)."""
    return step_file(step)


def rewind_checkpoints(dirpath: str | PathLike) -> dict[int, Path]:
    """``{step: path}`` of the ``step_<k>.safetensors`` files in ``dirpath``, by step: the rewind points of
    ``lmc.sweep`` (give it ``template=`` the bare network, or the LightningModule when the whole module was saved).

    >>> stability.lmc.sweep(rewind_checkpoints("rewind"), my_train, data=test_loader, template=net)
    """
    folder = Path(dirpath)
    if not folder.is_dir():
        raise ConfigError(f"dirpath: {str(folder)!r} is not a folder of rewind checkpoints")
    found = {checkpoint_step(p.name): p for p in folder.glob(CHECKPOINT_GLOB)
             if p.is_file() and p.name.removeprefix("step_").removesuffix(".safetensors").isdigit()}
    if not found:
        raise ConfigError(f"dirpath: {str(folder)!r} holds no step_<k>.safetensors files (RewindCheckpoints "
                          "writes them when training reaches its steps)")
    return dict(sorted(found.items()))


def _check_steps(steps: Iterable[int]) -> list[int]:
    try:
        values = list(steps)
    except TypeError:
        raise ConfigError(f"steps: expected a list of global steps (ints >= 0), got {steps!r}") from None
    if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
        raise ConfigError(f"steps: expected a non-empty list of global steps (ints >= 0), got {values!r}")
    return sorted(set(values))


class RewindCheckpoints(Callback):
    """Save the network at global steps ``steps`` (optimizer steps) as ``<dirpath>/step_<k>.safetensors``.

    Step 0 is the initialization, written when training starts; step k is written after the k-th optimizer step
    (with gradient accumulation, once per optimizer step, not per batch). Each file is written with
    ``store.files.save_tensors`` (safetensors with a SHA-256 digest of the tensors) and the metadata ``step``,
    ``epoch``, ``module`` and ``source``. Only the global-zero process writes (every DDP rank holds the same
    weights; strategies that shard the parameters, FSDP or DeepSpeed stage 3, are not supported). A rerun
    overwrites the files of the steps it reaches (atomically); a run resumed at step s writes the steps >= s.
    Steps the training never reaches are named in a warning when it ends.

    ``module``: which weights are saved. ``None`` (default): the LightningModule's whole ``state_dict``; when it
    holds the network as ``self.model`` (or ``self.net``) the keys read ``model.<name>`` and ``lmc`` strips the
    prefix to match a bare template (``template=net``), or reads them as they are with the LightningModule as the
    template. Name the attribute (``module="model"``, or any other name) to save the bare network's keys and
    nothing else the LightningModule holds (a loss with buffers, a teacher network).
    ``dirpath``: default ``<trainer.default_root_dir>/rewind``.
    """

    def __init__(self, steps: Iterable[int] = (0, 10, 50), dirpath: str | PathLike | None = None, *,
                 module: str | None = None) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(INSTALL) from _IMPORT_ERROR
        super().__init__()
        if module is not None and (not isinstance(module, str) or not module):
            raise ConfigError(f"module: expected the name of an attribute of the LightningModule, got {module!r}")
        self.steps = _check_steps(steps)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.module = module
        self.written: list[int] = []
        self._start = 0

    def _network(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        net = getattr(pl_module, self.module, None)
        if not isinstance(net, nn.Module):
            raise ConfigError(f"module: {type(pl_module).__name__} has no submodule {self.module!r} (got "
                              f"{type(net).__name__}); name the attribute that holds the network, or None")
        return net

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "rewind"
        self._network(pl_module)  # a wrong name fails before any training

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.written = []
        self._start = trainer.global_step  # 0, or the step a resumed run starts from
        self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._save(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        missed = [k for k in self.steps if k >= self._start and k not in self.written]
        if missed:
            warnings.warn(f"RewindCheckpoints: no checkpoint for steps {missed}: training ran from step "
                          f"{self._start} to step {trainer.global_step} (optimizer steps)", stacklevel=2)

    def _save(self, trainer: Any, pl_module: Any) -> None:
        k = trainer.global_step
        if k not in self.steps or k in self.written:  # an accumulation batch after step k: the same weights
            return
        self.written.append(k)
        if not trainer.is_global_zero:
            return
        assert self.dirpath is not None
        state = {name: t for name, t in self._network(pl_module).state_dict().items() if isinstance(t, Tensor)}
        meta = {"step": k, "epoch": trainer.current_epoch, "module": self.module or "",
                "source": f"lightning:{type(pl_module).__name__}"}
        save_tensors(self.dirpath / file_name(k), state, meta)
