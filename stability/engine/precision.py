"""Mixed precision and compilation for the engine: bf16 autocast, ``torch.compile`` with a fallback.

Training in bf16 runs the forward and backward passes' matrix work in bfloat16 while the weights, their
gradients and the optimizer state stay float32 (the master copy the optimizer updates). Losses, softmax
and every reduction that decides a result are taken in float32. Nothing second order (Hessian probes,
alignment, REPAIR) ever runs under autocast: they are called outside these contexts.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
BACKEND: Any = "inductor"  # torch.compile's backend (tests put in one that fails)


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``runtime.precision`` value (None = plain float32)."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ConfigError(f"runtime.precision: unknown precision {precision!r}; choose one of "
                          f"{', '.join(PRECISIONS)}") from None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on ``device`` when ``dtype`` is given, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix work runs on ``device`` (a tiny matmul is tried)."""
    try:
        a = torch.ones(4, 4, device=device, dtype=torch.bfloat16)
        return bool((a @ a)[0, 0] == 4)
    except (RuntimeError, TypeError):
        return False


class Compiled:
    """``torch.compile(fn)`` that falls back to ``fn`` (with a note) when compiling or running it fails.

    ``seconds`` is the wall time of the calls that compiled (the first call of each new input shape is
    counted once it returns), kept apart from the time of the steps themselves.
    """

    def __init__(self, fn: Callable[..., Any], what: str, quiet: bool = False):
        self.fn, self.what, self.quiet = fn, what, quiet
        self.compiled: Callable[..., Any] | None = torch.compile(fn, dynamic=False, backend=BACKEND)
        self.seconds = 0.0
        self.failed: str | None = None
        self._seen: set[tuple] = set()

    def __call__(self, *args: Any, signature: tuple = ()) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        first = signature not in self._seen
        t0 = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly, never a wrong answer
            self.compiled = None
            self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            print(f"note: cannot compile {self.what} ({self.failed}); running it uncompiled", file=sys.stderr)
            return self.fn(*args)
        if first:
            self._seen.add(signature)
            self.seconds += time.perf_counter() - t0
            if not self.quiet:
                print(f"note: compiled {self.what} in {self.seconds:.1f} s", file=sys.stderr)
        return out


def eval_precision_key(runtime: Any) -> dict[str, str]:
    """What ``runtime.eval_precision`` adds to the name of a record measured from given weights (connect, curve):
    nothing for fp32 (names as before), ``{"eval_precision": "bf16"}`` otherwise. Runs whose name holds the
    trunk's run hash (sweeps, IMP) are named by it already."""
    return {} if runtime.eval_precision == "fp32" else {"eval_precision": runtime.eval_precision}
