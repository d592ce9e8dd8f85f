"""Executors: who runs a wave of independent grid units. One small interface, three engines.

``run(units) -> outcomes`` takes JSON-able unit dicts (``grid.Unit`` plus where failures
go) and returns one outcome per unit (``grid.run_unit``); ``close()`` releases what the
executor started. The plan never knows which engine runs it.

- ``local``: in this process, one unit after another (nothing to install).
- ``ray``: each unit a Ray task (``num_cpus``/``num_gpus`` from the grid's resources,
  ``max_retries`` when a worker dies); joins ``address`` (``auto`` or ``host:port``) or
  starts a local Ray for the run. Needs ``pip install stability[ray]``.
- ``slurm``: through submitit, each wave one job array (``map_array``) with several units
  packed into each array task; partition, time and CPUs/GPUs from the grid's resources.
  Logs go under the results root (``grids/<grid>/slurm``), which must be shared storage.
  ``local=True`` uses submitit's LocalExecutor (each array task a separate process,
  through submitit's own submission path) where there is no Slurm. Needs
  ``pip install stability[slurm]``.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from ..store.schema import SLURM_LOGS

EXECUTORS = ("local", "ray", "slurm")


class Executor(Protocol):
    def run(self, units: Sequence[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Units one after another in this process."""

    def run(self, units: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        from .units import run_unit

        return [run_unit(u) for u in units]

    def close(self) -> None:
        pass


class RayExecutor:
    """Each unit a Ray task; a task whose worker process dies is retried (``retries`` times)."""

    def __init__(self, cpus: int = 1, gpus: int = 0, retries: int = 2, address: str | None = None,
                 local_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise ConfigError("executor 'ray' needs Ray: pip install 'stability[ray]'") from None
        self.ray = ray
        self.started = False  # whether this executor connected (and so disconnects at close)
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # a local Ray for this run, on this machine only
                ray.init(num_cpus=local_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
            self.started = True
        from .units import run_unit

        self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries)(run_unit)

    def run(self, units: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        refs = [self.task.remote(dict(u)) for u in units]
        out = []
        for unit, ref in zip(units, refs):
            try:
                out.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:  # the worker died more often than retries allow
                out.append({"id": unit["id"], "kind": unit["kind"], "status": "failed",
                            "error": f"{type(exc).__name__}: {exc}"})
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class SlurmExecutor:
    """Each wave one submitit job array; ``units_per_task`` units run one after another in each array task."""

    def __init__(self, folder: Path, cpus: int = 1, gpus: int = 0, units_per_task: int = 4, partition: str = "",
                 time: int = 60, local: bool = False, ranks: tuple[int, int] | None = None):
        try:
            import submitit
        except ImportError:
            raise ConfigError("executor 'slurm' needs submitit: pip install 'stability[slurm]'") from None
        self.submitit = submitit
        self.folder = Path(folder) / SLURM_LOGS  # logs named by job id, on the shared results root
        self.units_per_task = units_per_task
        # ``ranks``: (nodes, tasks per node) of a data-parallel unit (runtime.distributed); every task is one rank
        self.ranks, self.local = ranks, local
        nodes, tasks = ranks or (1, 1)
        if local:
            if nodes > 1:
                raise ConfigError(f"resources.nodes: submitit's local executor runs on one node, got {nodes}")
            self.executor = submitit.LocalExecutor(folder=str(self.folder))
            self.executor.update_parameters(timeout_min=time, tasks_per_node=tasks)
        else:
            self.executor = submitit.AutoExecutor(folder=str(self.folder), cluster="slurm")
            params: dict[str, Any] = {"timeout_min": time, "cpus_per_task": cpus, "tasks_per_node": tasks,
                                      "nodes": nodes}
            if gpus:
                params["gpus_per_node"] = gpus
            if partition:
                params["slurm_partition"] = partition
            self.executor.update_parameters(**params)

    def run(self, units: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        from .units import run_units

        chunks = [list(units[i : i + self.units_per_task]) for i in range(0, len(units), self.units_per_task)]
        if self.ranks is None:
            jobs = self.executor.map_array(run_units, chunks)
        else:
            jobs = self.executor.map_array(functools.partial(run_units_data_parallel, loopback=self.local), chunks)
        out = []
        for chunk, job in zip(chunks, jobs):
            try:
                out.extend(job.results()[0])  # rank 0's outcomes (the only task, or every rank's same units)
            except Exception as exc:  # noqa: BLE001 - a dead job: its units that did not finish are failed
                from .units import unit_complete

                for u in chunk:
                    done = unit_complete(u)
                    out.append({"id": u["id"], "kind": u["kind"], "status": "complete" if done else "failed",
                                "error": None if done else f"job {job.job_id} failed: {type(exc).__name__}: {exc}"})
        return out

    def close(self) -> None:
        pass


def run_units_data_parallel(units: Sequence[dict[str, Any]], loopback: bool = False) -> list[dict[str, Any]]:
    """One rank of a data-parallel job array task: torch.distributed's variables from submitit's job environment
    (the first node is the master; ``loopback``: 127.0.0.1, for the local executor), then the units."""
    import submitit

    from .units import run_units

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if loopback:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    return run_units(units)


def make_executor(name: str, resources: Any, folder: Path, *, distributed: bool = False, **options: Any) -> Executor:
    """An executor by name, sized by the grid's ``Resources``; ``distributed``: the units train data-parallel
    (``runtime.distributed``), each one a multi-task job on Slurm."""
    if not distributed and (resources.nodes > 1 or resources.tasks_per_node > 1):
        raise ConfigError("resources.nodes / resources.tasks_per_node: more than one rank per unit needs "
                          "runtime.distributed = true")
    if distributed and name != "slurm":
        raise ConfigError(f"runtime.distributed: a grid trains data-parallel units with --executor slurm (one "
                          f"multi-task job per unit), not {name!r}; or launch a single run with torchrun")
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(resources.cpus, resources.gpus, resources.retries, **options)
    if name == "slurm":
        ranks = (resources.nodes, resources.ranks_per_node()) if distributed else None
        return SlurmExecutor(folder, resources.cpus, resources.gpus, resources.units_per_task, resources.partition,
                             resources.time, ranks=ranks, **options)
    raise ConfigError(f"--executor: unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
