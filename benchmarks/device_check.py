"""One-command device check: what this machine's torch can do with the suite, in one report.

    python benchmarks/device_check.py                      # on a GPU machine: < 8 minutes on one modern GPU
    python benchmarks/device_check.py --device cpu --quick  # here, in about a minute (tested)

Reports torch/CUDA/GPU name and bf16 support; runs the tests that need a GPU (skipped without one);
times 8 batched ResNet-20 siblings against 1 and against 8 trained one after another (per-step times), fp32
vs bf16, compiled vs not, on mnist5k brought to 32x32x3; times one short ResNet-20 instability sweep; and
measures lambda_max natively and with pyhessian.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stability.config import ModelConfig
from stability.engine import Members, StackedModel, TrainSpec, train_members
from stability.engine.precision import bf16_supported
from stability.hessian import HessianOperator, pyhessian_top_eigenvalues, top_eigenvalues
from stability.models.build import build_model
from stability.presets import get_preset
from stability.stages.context import prepare
from stability.stages.instability import instability_settings, instability_sweep

GPU_TESTS = ["tests/test_data.py", "tests/test_pruning.py"]  # the files whose tests skip without a GPU


def header(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "bf16": bf16_supported(device)}
    print(f"torch {info['torch']}  CUDA {info['cuda']}  device {device}  GPU {info['gpu'] or 'none (no GPU available)'}")
    print(f"bf16 supported on {device}: {info['bf16']}")
    return info


def gpu_tests(device: torch.device) -> str:
    if device.type != "cuda":
        print("GPU-only tests: skipped (no GPU on this run)")
        return "skipped"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu",
                           *GPU_TESTS], cwd=ROOT, capture_output=True, text=True, check=False)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"GPU-only tests: {last}")
    return last


def mnist32(cfg, device):
    """mnist5k's training set brought to 32x32x3 (padded by 2, gray copied to 3 channels) on ``device``."""
    data = prepare(cfg).data
    x = F.pad(data.x_train, (2, 2, 2, 2)).repeat(1, 3, 1, 1).to(device)
    return data, x, data.y_train.to(device)


def resnet_timing(device: torch.device, quick: bool) -> list[dict]:
    steps = 1 if quick else 20
    width = "0.25" if quick else "1"
    cfg = get_preset("resnet20_cifar10").with_overrides({
        "dataset.name": "mnist5k", "model.width": width, "training.steps": f"{steps + 2}it",
        "training.rewind_points": "1it", "runtime.quiet": "true", "runtime.device": device.type,
        "dataset.augment": "false", "training.batch_size": "16" if quick else "128"})
    data, x, y = mnist32(cfg, device)
    data = dataclasses.replace(data, x_train=x, y_train=y)  # a copy: prepare's data are cached and shared
    model = build_model(cfg.model, (3, 32, 32), 10, 0).to(device)
    state = model.state_dict()
    rows = []
    variants = [("fp32", False), ("bf16", False)] + ([] if quick else [("fp32", True), ("bf16", True)])
    for precision, compiled in variants:
        if precision == "bf16" and not bf16_supported(device):
            continue
        run = cfg.with_overrides({"runtime.precision": precision, "runtime.compile": str(compiled).lower()})
        ipe = len(x) // run.training.batch_size

        def train(n: int, run=run, ipe=ipe) -> float:
            sm = StackedModel(model)
            members = Members.from_model_states([state] * n, list(dict(model.named_parameters())), 0,
                                                list(range(n)), list(range(n)), device)
            spec = TrainSpec(data, run, ipe)
            train_members(sm, members, spec, 1)  # warm-up (and compilation)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_members(sm, members, spec, 1 + steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / steps

        one = train(1)
        eight = train(8)
        row = {"precision": precision, "compiled": compiled, "step_1_s": one, "step_8_batched_s": eight,
               "step_8_sequential_s": 8 * one}
        rows.append(row)
        print(f"ResNet-20 (width {width}) {precision:<4} {'compiled' if compiled else 'eager':<8}: "
              f"1 member {one * 1e3:8.1f} ms/step, 8 batched {eight * 1e3:8.1f} ms/step, 8 one after another "
              f"{8 * one * 1e3:8.1f} ms/step -> batched {8 * one / eight:.2f}x")
    if quick:
        print("ResNet-20 compiled: not timed with --quick (compilation alone takes minutes on a CPU)")
    return rows


def sweep(device: torch.device, quick: bool, root: str) -> float:
    cfg = get_preset("resnet20_cifar10").with_overrides({
        "dataset.name": "mnist5k", "model.width": "0.25" if quick else "1",
        "training.steps": "4it" if quick else "2ep", "training.rewind_points": "0it,2it" if quick else "0it,50it",
        "training.batch_size": "16" if quick else "128",
        "training.eval_every": "4it" if quick else "1ep", "training.checkpoint_every": "4it" if quick else "1ep",
        "runtime.quiet": "true", "runtime.device": device.type, "runtime.results_root": root,
        "dataset.augment": "false"})
    t0 = time.perf_counter()
    instability_sweep(cfg, instability_settings(siblings=2, alphas=5 if quick else 11))
    seconds = time.perf_counter() - t0
    print(f"ResNet-20 instability sweep (mnist5k at its own 28x28x1, {cfg.training.steps}, "
          f"rewind {', '.join(cfg.training.rewind_points)}): {seconds:.1f} s wall")
    return seconds


def lambda_max(device: torch.device, quick: bool) -> dict:
    model = build_model(ModelConfig(name="lenet_300_100", width=0.25 if quick else 1.0), (1, 28, 28), 10, 0).to(device)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (256,), generator=g).to(device)
    t0 = time.perf_counter()
    native = float(top_eigenvalues(HessianOperator(model, x, y), 1)[0][0])
    t_native = time.perf_counter() - t0
    t0 = time.perf_counter()
    ph = pyhessian_top_eigenvalues(model, x, y, 1)[0][0]
    t_ph = time.perf_counter() - t0
    print(f"lambda_max on {device}: native {native:.5g} in {t_native:.2f} s, pyhessian {ph:.5g} in {t_ph:.2f} s")
    return {"native": native, "native_s": t_native, "pyhessian": ph, "pyhessian_s": t_ph}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--quick", action="store_true", help="narrow models, a few steps (about a minute on a CPU)")
    ap.add_argument("--out", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no GPU is available", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    t0 = time.perf_counter()
    report = {"header": header(device), "gpu_tests": gpu_tests(device)}
    report["resnet20"] = resnet_timing(device, args.quick)
    with tempfile.TemporaryDirectory() as root:
        report["sweep_s"] = sweep(device, args.quick, root)
    report["lambda_max"] = lambda_max(device, args.quick)
    report["seconds"] = time.perf_counter() - t0
    print(f"device check done in {report['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
