"""stability: linear mode connectivity, SGD-noise instability, Hessian spectra and lottery tickets."""
from __future__ import annotations

__version__ = "0.1.0"
