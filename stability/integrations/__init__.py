"""``stability.integrations``: the suite inside other training frameworks.

- ``lightning``: ``RewindCheckpoints``, a Lightning callback writing the network at chosen global steps
  (``step_<k>.safetensors``), and ``rewind_checkpoints(dirpath)``, the ``{step: file}`` that ``lmc.sweep`` takes.

Nothing here is imported with this package: a name is loaded from its module when first asked for, so
``import stability.integrations`` never imports Lightning.

>>> from stability.integrations import RewindCheckpoints, rewind_checkpoints
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lightning import RewindCheckpoints, rewind_checkpoints

__all__ = ["RewindCheckpoints", "rewind_checkpoints"]

_HOME = {"RewindCheckpoints": "lightning", "rewind_checkpoints": "lightning"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
