"""stability: linear mode connectivity, SGD-noise instability, Hessian spectra and lottery tickets."""
from __future__ import annotations

from ._version import __version__ as __version__

__all__ = ["barrier", "interpolate", "lmc", "register_dataset", "register_model"]

# (``stability.align`` and ``stability.hessian`` are the packages: their lmc functions are ``stability.lmc.align``, ...)
_LMC = ("lmc", "interpolate", "barrier", "Curve")


def __getattr__(name: str):  # the registration API and stability.lmc without importing torch at `import stability`
    if name in _LMC:
        import importlib

        lmc = importlib.import_module(".lmc", __name__)
        return lmc if name == "lmc" else getattr(lmc, name)
    if name == "register_model":
        from .models import register_model

        return register_model
    if name == "register_dataset":
        from .data import register_dataset

        return register_dataset
    raise AttributeError(f"module 'stability' has no attribute {name!r}")
