"""Sibling training: the suite's batched path vs the plain one-model-at-a-time PyTorch loop.

    python benchmarks/bench_siblings.py [--quick] [--members 8] [--steps 200] [--presets a,b]

For each preset, N siblings start from the same step-0 weights and train for the same
number of iterations (batch size from the preset):

- suite:     ``prepare(cfg)`` -> ``siblings.start_members`` from the step-0 state ->
             ``engine.train_members`` (all N members in lockstep, stacked tensors).
- reference: the loop most lottery-ticket code uses: one model at a time,
             ``DataLoader(TensorDataset(x_train, y_train), shuffle=True, drop_last=True)``
             (num_workers=0), a stock ``torch.optim`` optimizer, the N models one after another.

Both are timed in this process, interleaved, best of ``--repeats``; the ratio is
reference / suite. The suite's throughput is compared with a large float32 matmul
measured in the same process. Nothing here asserts anything about time.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import _setup
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stability.engine import StackedModel, TrainSpec, train_members
from stability.presets import get_preset
from stability.stages.checkpoints import initial_members
from stability.stages.context import Context, prepare
from stability.stages.siblings import SiblingSettings, sibling_seeds, start_members

THREADS = 2


# ---------------------------------------------------------------- FLOP counting
def layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """Multiply-accumulates per example of every Linear / Conv2d, from the layer shapes.

    Linear: in·out.  Conv2d: out_h·out_w·out_c·(in_c/groups)·k_h·k_w.  (Shapes come from one
    forward pass with hooks; bias, activations, pooling, BatchNorm and the loss are not counted.)
    """
    rows: list[tuple[str, int]] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: rows.append((name, m.in_features * m.out_features))))
        elif isinstance(mod, nn.Conv2d):
            def conv_hook(m, i, o, name=name):
                kh, kw = m.kernel_size
                rows.append((name, o.shape[-2] * o.shape[-1] * m.out_channels
                             * (m.in_channels // m.groups) * kh * kw))
            hooks.append(mod.register_forward_hook(conv_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return rows


def step_flops(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> tuple[float, float]:
    """FLOPs of one training step of one model: (convention 3·fwd, work actually required).

    convention: forward = 2·MACs·batch, backward ≈ 2·forward, total = 3·forward.
    required:   the first layer needs no input gradient, so its backward is 1·forward.
    """
    rows = layer_macs(model, input_shape)
    fwd = 2.0 * batch * sum(m for _, m in rows)
    first = 2.0 * batch * rows[0][1]
    return 3.0 * fwd, 3.0 * fwd - first


# ---------------------------------------------------------------- the two paths
def suite_run(ctx: Context, n: int, steps: int, variant: str = "fp32", models: dict | None = None) -> float:
    """Seconds to train n siblings for ``steps`` iterations with the suite's batched engine.

    ``variant``: ``fp32`` or ``bf16`` (runtime.precision), ``+compile`` for runtime.compile; a compiled
    variant keeps its StackedModel in ``models`` so that it is compiled once (in the warm-up)."""
    order, aug = sibling_seeds(ctx.cfg.training.noise_seed, SiblingSettings(siblings=max(n, 2)))
    source = initial_members(ctx)
    losses: list[float] = []
    precision, _, compiled = variant.partition("+")
    cfg = ctx.cfg.with_overrides({"runtime.precision": precision, "runtime.compile": str(bool(compiled)).lower()})
    models = {} if models is None else models
    sm = models.setdefault(variant, StackedModel(ctx.model))
    spec = TrainSpec(ctx.data, cfg, ctx.ipe, augmentation=ctx.augmentation,
                     after_step=lambda m, loss: losses.append(loss))  # what a progress bar reads
    t0 = time.perf_counter()
    members = start_members(ctx, source, n, order[:n], aug[:n], "fresh")
    train_members(sm, members, spec, steps)
    return time.perf_counter() - t0


def make_optimizer(model: nn.Module, ctx: Context) -> torch.optim.Optimizer:
    o = ctx.cfg.optimizer
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


def reference_run(ctx: Context, n: int, steps: int) -> float:
    """Seconds for the plain loop: n models trained one after another with a DataLoader."""
    init = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    dataset = TensorDataset(ctx.data.x_train, ctx.data.y_train)
    batch = ctx.cfg.training.batch_size
    t0 = time.perf_counter()
    for seed in range(n):
        model = ctx.new_model()
        model.load_state_dict(init)
        optimizer = make_optimizer(model, ctx)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed))
        model.train()
        step = 0
        while step < steps:
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                step += 1
                if step == steps:
                    break
    return time.perf_counter() - t0


# ---------------------------------------------------------------- driver
def context(preset: str, steps: int, root: str) -> Context:
    cfg = get_preset(preset).with_overrides({
        "training.steps": f"{steps}it", "training.rewind_points": "0it",
        "runtime.threads": str(THREADS), "runtime.quiet": "true", "runtime.device": "cpu",
        "runtime.results_root": root,
    })
    return prepare(cfg)


def best_of(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and one repeat (a smoke run)")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="iterations per model (default 200; 40 quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; 1 quick)")
    ap.add_argument("--presets", default="lenet300_mnist5k,conv4_mnist5k")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: the bf16 suite path side by side with fp32 (runtime.precision)")
    ap.add_argument("--compile", action="store_true", help="also the compiled suite paths (runtime.compile)")
    args = ap.parse_args(argv)
    variants = ["fp32"] + (["bf16"] if args.precision == "bf16" else [])
    variants += [f"{v}+compile" for v in variants] if args.compile else []
    steps = args.steps or (40 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)
    n = args.members

    torch.set_num_threads(THREADS)
    print("\n".join(_setup.machine_lines()))
    print("FLOPs per training step of one model: forward = 2·MACs·batch (Linear MACs = in·out,")
    print("  Conv2d MACs = out_h·out_w·out_c·in_c·k·k), backward ≈ 2·forward, step = 3·forward.")
    print("  'req' = the work actually required: the first layer computes no input gradient,")
    print("  so its backward is 1·forward (LeNet's first layer holds 88% of its MACs).")
    print("'of mm' = achieved rate / the best 2048x2048 float32 torch.mm rate measured in this process")
    print("  (before and after each preset, best of 7 each).")
    print(f"{n} siblings x {steps} iterations each; times are best of {repeats}, suite and reference "
          f"interleaved.\n")

    mm_rates = [_setup.matmul_rate()]
    bf16_rates = [_setup.matmul_rate(dtype=torch.bfloat16)] if "bf16" in variants else []
    results = []
    with tempfile.TemporaryDirectory() as root:
        for preset in args.presets.split(","):
            ctx = context(preset, steps, root)
            conv, req = step_flops(ctx.model, ctx.data.input_shape, ctx.cfg.training.batch_size)
            models: dict[int, dict] = {n: {}, 1: {}}
            # warm up every path (allocator, kernels; the compiled ones compile here, timed apart)
            compile_s = {}
            for v in variants:
                for members in (n, 1):
                    t0 = time.perf_counter()
                    suite_run(ctx, members, min(steps, 5), v, models[members])
                    compile_s[(v, members)] = time.perf_counter() - t0
            reference_run(ctx, 1, min(steps, 5))
            for members in (n, 1):
                times: dict[str, list[float]] = {v: [] for v in variants}
                r_times = []
                for _ in range(repeats):
                    for v in variants:
                        times[v].append(suite_run(ctx, members, steps, v, models[members]))
                    r_times.append(reference_run(ctx, members, steps))
                for v in variants:
                    results.append((preset, members, v, min(times[v]), min(r_times), conv, req,
                                    min(times["fp32"]), compile_s[(v, members)] if "compile" in v else 0.0))
            mm_rates.append(_setup.matmul_rate())
            if bf16_rates:
                bf16_rates.append(_setup.matmul_rate(dtype=torch.bfloat16))
            print(f"{preset}: per-model step {conv / 1e6:.1f} MFLOP (req {req / 1e6:.1f}), "
                  f"batch {ctx.cfg.training.batch_size}, optimizer {ctx.cfg.optimizer.name}")
    mm = max(mm_rates)
    print("matmul 2048x2048 float32: " + ", ".join(f"{r / 1e9:.1f}" for r in mm_rates)
          + f" GFLOP/s -> using {mm / 1e9:.1f} (spread = other load on the machine)")
    mm16 = max(bf16_rates) if bf16_rates else float("nan")
    if bf16_rates:
        print("matmul 2048x2048 bfloat16: " + ", ".join(f"{r / 1e9:.1f}" for r in bf16_rates)
              + f" GFLOP/s -> using {mm16 / 1e9:.1f} ({mm16 / mm:.1f}x float32)")
    print()

    header = (f"{'preset':<18} {'N':>2} {'path':<13} {'suite s':>8} {'ref s':>8} {'ref/suite':>9} {'vs fp32':>7} "
              f"{'suite GFLOP/s':>13} {'of mm':>6} {'of bf16mm':>9} {'req GFLOP/s':>11} {'of mm':>6} "
              f"{'ref GFLOP/s':>11} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    for preset, members, v, s, r, conv, req, s32, comp in results:
        total_conv, total_req = conv * members * steps, req * members * steps
        of16 = f"{total_conv / s / mm16:>9.0%}" if bf16_rates else f"{'-':>9}"
        print(f"{preset:<18} {members:>2} {v:<13} {s:>8.2f} {r:>8.2f} {r / s:>8.2f}x {s32 / s:>6.2f}x "
              f"{total_conv / s / 1e9:>13.1f} {total_conv / s / mm:>6.0%} {of16} "
              f"{total_req / s / 1e9:>11.1f} {total_req / s / mm:>6.0%} {total_conv / r / 1e9:>11.1f} "
              f"{comp:>9.1f}")
    print("\nsuite = start_members + train_members (batched); ref = DataLoader loop, one model after another."
          "\nref GFLOP/s uses the 3·forward convention.")


if __name__ == "__main__":
    main()
