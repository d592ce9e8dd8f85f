"""stability: linear mode connectivity, SGD-noise instability, Hessian spectra and lottery tickets."""
from __future__ import annotations

from ._version import __version__ as __version__

__all__ = ["register_dataset", "register_model"]


def __getattr__(name: str):  # the registration API without importing torch at `import stability`
    if name == "register_model":
        from .models import register_model

        return register_model
    if name == "register_dataset":
        from .data import register_dataset

        return register_dataset
    raise AttributeError(f"module 'stability' has no attribute {name!r}")
