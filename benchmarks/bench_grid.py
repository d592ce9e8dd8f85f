"""Grid executors: Ray with 1 vs 2 workers, each executor's per-unit overhead, Ray's memory.

    python benchmarks/bench_grid.py [--quick] [--steps 300] [--width 0.25] [--units 8] [--repeats 3]

All three measurements run ``run_grid`` on grids of trunks (``stages = []``: one
``train_<hash>`` unit per value of ``training.init_seed``, no dependencies between
them), ``resources.cpus = 1`` (so every unit trains with one torch thread), each
run on a fresh results root in a temporary directory:

1. Ray speed-up: a real local Ray head started as a user would (``ray start --head``
   bound to 127.0.0.1, no dashboard, an 80 MB object store, as in ``tests/test_grid.py``),
   once with ``--num-cpus 1`` and once with ``--num-cpus 2``, stopped with
   ``ray stop --force`` after each. Per repeat this process connects (a new Ray job)
   and the grid runs twice on fresh roots: ``cold`` (Ray starts the job's workers, which
   import torch and the suite and load the data) and ``warm`` (the same workers again).
2. Per-unit overhead against ``local``: a grid of tiny units (5 iterations at width
   0.1) with ``local`` (in this process, warmed up first), ``ray`` (a fresh 2-CPU head)
   and ``slurm`` through submitit's ``LocalExecutor`` (array tasks as processes,
   ``units_per_task`` units each). Overhead per unit = (time - local time) / units;
   parallel executors can hide part of it behind their own parallelism.
3. Ray's peak memory: while the Ray runs of (1) execute, a thread sums the RSS of every
   Ray process (raylet, gcs_server, the agents, ``ray::`` workers; not this driver)
   every 0.2 s. RSS counts shared pages (libraries, the object store) once per process.

Times are wall clock of one ``run_grid`` call (planning included, the same for every
executor), best of ``--repeats``; ``unit s`` sums the units' own ``seconds`` from the outcomes (the work).
Nothing here asserts anything about time.
"""
from __future__ import annotations

import os

import _setup  # noqa: F401  (first: thread settings before torch, the suite on the path)

# Ray: loopback only, no memory monitor, no usage reports. Read when Ray is imported (here and
# by `ray start`, which inherits this environment).
# Loopback only, no memory monitor, no usage reports, and token authentication with a token of this
# run's own (so whatever ~/.ray/auth_token holds does not matter), set before Ray is imported.
os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_memory_monitor_refresh_ms": "0",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN": __import__("secrets").token_hex(32)})

import argparse
import logging
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import ray
import submitit
import torch

from stability.grid.plan import load_grid
from stability.grid.run import GridResult, run_grid

THREADS = 2  # this process; the units run with resources.cpus = 1 thread each

GRID = """
preset = "lenet300_mnist5k"
stages = []

[set]
"model.width" = {width}
"training.steps" = "{steps}it"
"training.rewind_points" = ["0it"]  # the preset's reach 200it; trunks only, no rewinding

[axes]
"training.init_seed" = {seeds}

[resources]
cpus = 1
units_per_task = {per_task}
"""


def write_grid(path: Path, *, width: float, steps: int, units: int, per_task: int = 4) -> Path:
    path.write_text(GRID.format(width=width, steps=steps, seeds=list(range(units)), per_task=per_task))
    return path


# ---------------------------------------------------------------- a real local Ray head
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(cpus: int, temp: Path) -> Iterator[tuple[str, float]]:
    """``ray start --head`` with ``cpus`` CPUs on 127.0.0.1; yields (address, seconds to start); always stops it."""
    ray_bin = Path(sys.executable).parent / "ray"
    port = free_port()
    env = dict(os.environ)
    try:
        t0 = time.perf_counter()
        subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", str(cpus), "--num-gpus", "0", "--include-dashboard", "false",
                        "--object-store-memory", "80000000", "--disable-usage-stats", "--temp-dir", str(temp)],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", time.perf_counter() - t0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, check=False, capture_output=True, timeout=120)


RAY_PROCESS = re.compile(r"\bray\b")


class RayMemory(threading.Thread):
    """Samples the summed RSS of all Ray processes (not this one) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.done = threading.Event()
        self.first = self.peak = 0
        self.peak_procs = 0
        self.samples = 0

    @staticmethod
    def sample() -> tuple[int, int]:
        total, count, me = 0, 0, os.getpid()
        for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
            info = p.info
            if info["pid"] == me or info["memory_info"] is None:
                continue
            name, cmdline = info["name"] or "", " ".join(info["cmdline"] or [])
            if name.startswith("ray::") or name in ("raylet", "gcs_server") or RAY_PROCESS.search(cmdline):
                total += info["memory_info"].rss
                count += 1
        return total, count

    def run(self) -> None:
        while True:
            rss, count = self.sample()
            if self.samples == 0:
                self.first = rss
            self.samples += 1
            if rss > self.peak:
                self.peak, self.peak_procs = rss, count
            if self.done.wait(self.interval):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


# ---------------------------------------------------------------- one timed grid
def timed(path: Path, root: Path, executor: str, **options) -> tuple[float, GridResult]:
    t0 = time.perf_counter()
    result = run_grid(load_grid(path, {"runtime.results_root": str(root)}), executor=executor, **options)
    seconds = time.perf_counter() - t0
    bad = {i: o.get("error") for i, o in result.outcomes.items() if o["status"] != "complete"}
    if bad or result.blocked or result.skipped:
        raise RuntimeError(f"{executor}: not every unit ran and completed: {bad or result.blocked or result.skipped}")
    return seconds, result


def keep(best: dict[str, tuple[float, GridResult]], key: str, run: tuple[float, GridResult]) -> None:
    """Keep the faster of two timed runs under ``key``."""
    if key not in best or run[0] < best[key][0]:
        best[key] = run


def unit_seconds(result: GridResult) -> float:
    return sum(o["seconds"] for o in result.outcomes.values())


def workers(result: GridResult) -> int:
    return len({(o["host"], o["pid"]) for o in result.outcomes.values()})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short units (a smoke run)")
    ap.add_argument("--steps", type=int, default=None,
                    help="iterations per unit of the speed-up grid (default 300; 60 quick)")
    ap.add_argument("--width", type=float, default=0.25, help="model.width of the speed-up grid")
    ap.add_argument("--units", type=int, default=8, help="units (training.init_seed values) of both grids")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; 1 quick)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (60 if args.quick else 300)
    n = args.units

    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}  ray {ray.__version__}  submitit {submitit.__version__}  "
          f"python {platform.python_version()}  cpu: {platform.processor() or platform.machine()}  "
          f"cores: {os.cpu_count()}")
    print(f"torch.get_num_threads() = {torch.get_num_threads()} (this process)  OPENBLAS_NUM_THREADS = "
          f"{os.environ['OPENBLAS_NUM_THREADS']}  OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS')}  "
          f"units: resources.cpus = 1 (1 torch thread each)")

    with tempfile.TemporaryDirectory(prefix="bench_grid_", ignore_cleanup_errors=True) as tmp:
        tmp_path = Path(tmp)
        big = write_grid(tmp_path / "speedup.toml", width=args.width, steps=steps, units=n)
        tiny = write_grid(tmp_path / "tiny.toml", width=0.1, steps=5, units=n)

        # ---- 1 and 3: Ray with 1 and 2 workers, memory sampled while each head is up
        print(f"\n1. Ray, 1 vs 2 workers: {n} trunks of lenet300_mnist5k at width {args.width}, {steps} iterations "
              f"each (stages = [], cpus = 1 per unit); ray start --head --num-cpus 1 | 2")
        rows, memory = [], {}
        for cpus in (1, 2):
            best: dict[str, tuple[float, GridResult]] = {}
            with ray_head(cpus, tmp_path / "ray") as (address, start_s):
                sampler = RayMemory()
                sampler.start()
                try:
                    for r in range(repeats):
                        # one job per repeat (its own workers); `warm` reuses the workers `cold` started
                        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                        for phase in ("cold", "warm"):
                            keep(best, phase, timed(big, tmp_path / f"ray{cpus}_{phase}{r}", "ray", address=address))
                        ray.shutdown()
                finally:
                    sampler.stop()
                memory[cpus] = sampler
            for phase, (wall, result) in best.items():
                rows.append((cpus, phase, start_s, wall, unit_seconds(result), workers(result)))
        base = {phase: wall for cpus, phase, _, wall, _, _ in rows if cpus == 1}
        header = (f"{'workers':>7} {'run':<5} {'ray start s':>11} {'wall s':>7} {'unit s':>7} {'pids':>4} "
                  f"{'speed-up':>8}")
        print(header)
        print("-" * len(header))
        for cpus, phase, start_s, wall, work, pids in rows:
            print(f"{cpus:>7} {phase:<5} {start_s:>11.2f} {wall:>7.2f} {work:>7.2f} {pids:>4} "
                  f"{base[phase] / wall:>7.2f}x")
        print(f"wall s = one run_grid call, best of {repeats} (connecting excluded: this process connects "
              "first, a new Ray job\nper repeat); unit s = sum of the units' own seconds in that run; "
              "pids = worker processes that ran units;\nspeed-up = 1-worker wall / this wall, same run.")

        print("\n3. Ray's memory while the runs of (1) execute (summed RSS of all Ray processes, sampled every 0.2 s):")
        header = f"{'workers':>7} {'idle MiB':>9} {'peak MiB':>9} {'procs at peak':>13} {'samples':>7}"
        print(header)
        print("-" * len(header))
        for cpus, m in memory.items():
            print(f"{cpus:>7} {m.first / 2**20:>9.0f} {m.peak / 2**20:>9.0f} {m.peak_procs:>13} {m.samples:>7}")
        print(f"idle = first sample, right after `ray start` (before this process connects); over all {repeats} "
              "repeats of (1).")

        # ---- 2: per-unit overhead of each executor against local
        print(f"\n2. Per-unit overhead: {n} trunks of lenet300_mnist5k at width 0.1, 5 iterations each "
              f"(cpus = 1, units_per_task = 4)")
        timed(tiny, tmp_path / "warmup", "local")  # imports, data, allocator: as warm as a Ray `warm` worker
        best = {}
        with ray_head(2, tmp_path / "ray") as (address, start_s):
            for r in range(repeats):
                keep(best, "local", timed(tiny, tmp_path / f"local{r}", "local"))
                keep(best, "ray cold", timed(tiny, tmp_path / f"ray_cold{r}", "ray", address=address))
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                timed(tiny, tmp_path / f"ray_start{r}", "ray", address=address)  # untimed: start this job's workers
                keep(best, "ray warm", timed(tiny, tmp_path / f"ray_warm{r}", "ray", address=address))
                ray.shutdown()
        for r in range(repeats):
            keep(best, "slurm local", timed(tiny, tmp_path / f"slurm{r}", "slurm", local=True))
        results = [(name, *best[name]) for name in ("local", "ray cold", "ray warm", "slurm local")]
        local = results[0][1]
        header = (f"{'executor':<11} {'wall s':>7} {'s/unit':>7} {'unit s':>7} {'pids':>4} "
                  f"{'overhead/unit s':>15}")
        print(header)
        print("-" * len(header))
        for name, wall, result in results:
            print(f"{name:<11} {wall:>7.2f} {wall / n:>7.3f} {unit_seconds(result):>7.2f} {workers(result):>4} "
                  f"{(wall - local) / n:>15.3f}")
        print(f"best of {repeats}; unit s and pids from that run; ray: a 2-CPU head (started in {start_s:.1f} s, "
              "not counted).\nray cold = run_grid connects (a new Ray job) and Ray starts its workers; ray warm = "
              "this process connected\nand the job's workers already started. slurm local = submitit's "
              "LocalExecutor: one process per array task\nof 4 units, both tasks at once; submitit polls "
              "for results once a second.")

if __name__ == "__main__":
    main()
