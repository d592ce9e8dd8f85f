"""Which process writes the run store: every process, except ranks > 0 of a data-parallel run
(``runtime.distributed``), which read it and write nothing; and the barrier that lets them read what rank 0 wrote."""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_writer", "sync_ranks"]


def is_writer() -> bool:
    """Whether this process writes the run store: always, except ranks > 0 of a data-parallel run
    (``runtime.distributed``), which read it and write nothing."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def sync_ranks() -> None:
    """Wait for every rank of a data-parallel run (a no-op otherwise): what rank 0 wrote is then there to read."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
