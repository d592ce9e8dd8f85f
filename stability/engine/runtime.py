"""The device, and process-wide CPU tuning: intra-op threads, the allocator, denormal floats."""
from __future__ import annotations

import os
import platform
import sys

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` takes a GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for but no GPU is available; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"runtime.device: unknown device {name!r}; choose one of auto, cpu, cuda")
    return torch.device(name)


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per core, at most 8) and return the number.

    Also keeps freed memory for reuse (``configure_allocator``) and flushes denormal floats to zero."""
    n = threads or min(os.cpu_count() or 1, 8)
    configure_allocator()
    # Denormal floats (|x| < 1.2e-38) are flushed to zero: the CPU handles them ~100x slower, and the
    # activations of trained conv nets hold enough of them to make LeNet-5's evaluation 1.7x slower.
    torch.set_flush_denormal(True)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


_ALLOCATOR_TUNED = False


def configure_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc only; returns whether it was applied).

    glibc gives large freed blocks straight back to the kernel, so every activation of a few
    MB is page-faulted in again (zero-filled) on its next use: for LeNet-5 evaluated at batch
    1,000 that is over a third of the time. Blocks up to 32 MB are kept in the heap instead
    (mmap threshold 32 MB, trim threshold 1 GB, 64 MB top pad): the process's resident memory
    stays at its peak rather than shrinking between steps. Applied once per process.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from <malloc.h>
    ok = all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)))
    _ALLOCATOR_TUNED = ok
    return ok
