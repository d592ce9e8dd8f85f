"""Which process writes the run store: every process, except ranks > 0 of a data-parallel run
(``runtime.distributed``), which read it and write nothing; and the barrier that lets them read what rank 0 wrote.

Only a run that asked for ``runtime.distributed`` counts (``engine.distributed.start`` marks the process): a process
group the user's own script started (Lightning's DDP, torchrun around their loop) leaves the suite as it is, so a
suite call on one rank never waits for the others."""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["in_data_parallel_run", "is_writer", "mark_data_parallel", "sync_ranks"]

_DATA_PARALLEL = False


def mark_data_parallel() -> None:
    """This process is a rank of a run with ``runtime.distributed`` (set once its process group is joined)."""
    global _DATA_PARALLEL
    _DATA_PARALLEL = True


def in_data_parallel_run() -> bool:
    return _DATA_PARALLEL and dist.is_available() and dist.is_initialized()


def is_writer() -> bool:
    """Whether this process writes the run store: always, except ranks > 0 of a data-parallel run
    (``runtime.distributed``), which read it and write nothing."""
    return not (in_data_parallel_run() and dist.get_rank() != 0)


def sync_ranks() -> None:
    """Wait for every rank of a data-parallel run (a no-op otherwise): what rank 0 wrote is then there to read."""
    if in_data_parallel_run():
        dist.barrier()
