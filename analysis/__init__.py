"""analysis: results on disk to pandas DataFrames and matplotlib figures."""
from __future__ import annotations
