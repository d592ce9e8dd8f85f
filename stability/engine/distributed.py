"""Data-parallel training across processes (``runtime.distributed``) with ``torch.distributed``.

A run started by a launcher (``torchrun``, or Slurm / submitit through the grid) joins the launcher's process
group: gloo on the CPU, NCCL on CUDA (each rank on the GPU of its ``LOCAL_RANK``). Every rank holds all
members (the stacked axis is never split) and draws the same global batch of each member from the member's
seeded order; rank r trains on its share, columns ``[r b, (r + 1) b)`` of the batch with ``b = B / world``,
and the gradients are averaged across ranks after each backward pass, as ``DistributedDataParallel`` does.
So the data order, the augmentation and the result do not depend on the world size (up to float rounding
of the averaged gradient), and a run interrupted under one world size resumes under another.

BatchNorm normalizes over each rank's share, as under DDP without SyncBatchNorm; its running statistics are
broadcast from rank 0 after every step (DDP's ``broadcast_buffers``). Rank 0 writes the run store; the
others read it and write nothing (``store.files.is_writer``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError
from ..store.ranks import in_data_parallel_run, mark_data_parallel

__all__ = ["active", "all_equal", "average", "average_gradients", "broadcast", "rank", "share", "start",
           "sum_across_ranks", "world"]

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = int(os.environ.get("STABILITY_DIST_TIMEOUT", "1800"))


def active() -> bool:
    """Whether this process is one rank of a started data-parallel run (``runtime.distributed``; a process group
    the user's own script started does not count)."""
    return in_data_parallel_run()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def _launcher_environment() -> dict[str, str]:
    """torchrun's variables, or Slurm's under ``srun`` / submitit (translated to torchrun's)."""
    env = {k: os.environ[k] for k in LAUNCHER_VARIABLES if k in os.environ}
    if "RANK" not in env and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        env["RANK"], env["WORLD_SIZE"] = os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return env


def start(distributed: bool, batch_size: int, device: torch.device, *, dropout: bool = False) -> None:
    """Join the launcher's process group when ``runtime.distributed`` is set (once per process).

    Refuses, before anything is written: no launcher, a world size that does not divide the batch, dropout.
    """
    if not distributed:
        return
    env = _launcher_environment()
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise ConfigError("runtime.distributed: true needs a launcher that starts one process per rank and sets "
                          "RANK and WORLD_SIZE (torchrun --nproc-per-node N -m stability ..., or stability grid "
                          "--executor slurm with resources.gpus > 1); none is set, so use runtime.distributed = false")
    size = int(env["WORLD_SIZE"])
    if size < 1 or batch_size % size:
        raise ConfigError(f"training.batch_size: {batch_size} does not divide among the {size} ranks of "
                          f"runtime.distributed; use a multiple of {size}")
    if dropout:
        raise ConfigError("model.dropout: dropout masks are drawn per rank, so a data-parallel run would depend on "
                          "the world size; use model.dropout = 0 with runtime.distributed")
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != size:
            raise ConfigError(f"runtime.distributed: a process group of {dist.get_world_size()} ranks is running, "
                              f"not {size}")
        mark_data_parallel()
        return
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise ConfigError("runtime.distributed: MASTER_PORT is not set; the launcher sets it (torchrun does)")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=int(env["RANK"]), world_size=size, timeout=timedelta(seconds=TIMEOUT_S))
    mark_data_parallel()


def share(batch_size: int) -> slice:
    """The columns of each member's batch this rank trains on."""
    b = batch_size // world()
    return slice(rank() * b, (rank() + 1) * b)


def average_gradients(params: Sequence[Tensor]) -> None:
    """Average ``.grad`` across ranks in place (one flat all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world())
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_across_ranks(t: Tensor) -> None:
    """``t`` summed over the ranks, in place."""
    dist.all_reduce(t)


def average(t: Tensor) -> Tensor:
    """``t`` averaged across ranks (a new tensor)."""
    out = t.detach().clone()
    dist.all_reduce(out)
    return out.div_(world())


def broadcast(tensors: Mapping[str, Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place."""
    for t in tensors.values():
        dist.broadcast(t.data if t.requires_grad else t, 0)


def all_equal(value: int) -> bool:
    """Whether every rank holds the same integer ``value``."""
    t = torch.tensor([value, -value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(t[1]) == -value
