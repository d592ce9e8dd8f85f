"""One rank of a data-parallel test run, started by ``torch.distributed.run``: ``ddp_rank.py RESULTS_ROOT CLI-ARGS``.

Ranks > 0 fail loudly if they write anything under the results root (rank 0 alone writes the run store).
With ``STOP_AFTER_STATES=n``, rank 0 dies (``os._exit``) right after writing its n-th rolling state, as a
killed job would. With ``OWN_GROUP=1`` the script stands for a user's own DDP script instead: it starts the process
group itself, only rank 1 runs the command (no guard), and both ranks meet at a barrier afterwards.
"""
from __future__ import annotations

import builtins
import io
import os
import sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
rank = int(os.environ["RANK"])

if os.environ.get("OWN_GROUP") == "1":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from stability.apps.cli import main

    code = main(sys.argv[2:]) if rank == 1 else 0
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(code)


def _inside(path) -> bool:
    try:
        return Path(os.path.abspath(os.fspath(path))).resolve().is_relative_to(root)
    except TypeError:  # a file descriptor
        return False


def _guard(name, real, writes):
    def guarded(path, *args, **kwargs):
        if writes(args, kwargs) and _inside(path):
            raise RuntimeError(f"rank {rank} wrote {path} ({name}): only rank 0 may write the run store")
        return real(path, *args, **kwargs)
    return guarded


if rank != 0:
    def _mode_writes(args, kwargs):
        mode = args[0] if args else kwargs.get("mode", "r")
        return any(c in mode for c in "wax+")

    builtins.open = _guard("open", builtins.open, _mode_writes)
    io.open = builtins.open
    os.open = _guard("os.open", os.open, lambda a, k: bool((a[0] if a else k.get("flags", 0))
                                                           & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    for name in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir"):
        setattr(os, name, _guard(f"os.{name}", getattr(os, name), lambda a, k: True))

stop_after = int(os.environ.get("STOP_AFTER_STATES", "0"))
if rank == 0 and stop_after:
    from stability.store import files as store

    real_write, states = store.atomic_write_bytes, []

    def write_then_die(path, data):
        real_write(path, data)
        if str(path).endswith("latest.safetensors"):
            states.append(path)
            if len(states) == stop_after:
                os._exit(9)

    store.atomic_write_bytes = write_then_die

from stability.apps.cli import main

sys.exit(main(sys.argv[2:]))
