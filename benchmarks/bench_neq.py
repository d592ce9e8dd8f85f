"""NEq on the CPU: does skipping the updates of neurons at equilibrium save time, or only FLOPs?

    python benchmarks/bench_neq.py [--quick] [--presets a,b] [--steps 200] [--repeats 3] [--threads 2]

For each preset (default LeNet-300-100 and Conv-4 at width 1/4 on mnist5k: ``lenet300_mnist5k``,
``conv4_mnist5k``), one member trains ``--steps`` iterations from the same step-0 weights through
``engine.train_members``, in this process, best of ``--repeats``, the variants interleaved:

- plain: the standard loop (``training.method = standard``);
- NEq: ``stability.methods.neq``'s tracker as the loop's ``update_masks`` hook (an NEq evaluation every
  ``training.eval_every`` iterations: the forward pass over the validation subset, phi, velocity,
  masks) with the preset's settings and NEq's defaults;
- frozen p: a fixed random fraction p of every NEq layer's neurons frozen for the whole run through
  the same mechanism (gradients masked, values put back after each optimizer step), p = 0, 0.5, 0.9:
  what a step costs once NEq has frozen that many neurons.

Printed: milliseconds per step, the ratio to plain, and the backward FLOPs that the frozen neurons
save by ``stability.maths.flops`` (weight gradients of frozen neurons; forward and input gradients
unchanged). Nothing here asserts anything about time.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import _setup
import torch

from stability.engine import Members, StackedModel, TrainSpec, train_members
from stability.maths.flops import backward_macs, layer_costs, weight_gradient_saved
from stability.methods.neq import NeqTracker, neq_layers, neq_summary
from stability.presets import get_preset
from stability.stages.checkpoints import initial_members
from stability.stages.context import Context, prepare
from stability.steps import to_iterations


def context(preset: str, steps: int, root: str, threads: int) -> Context:
    cfg = get_preset(preset).with_overrides({
        "training.steps": f"{steps}it", "training.rewind_points": "0it", "training.method": "neq",
        "runtime.threads": str(threads), "runtime.quiet": "true", "runtime.device": "cpu",
        "runtime.results_root": root,
    })
    ctx_every = prepare(cfg.with_overrides({"training.method": "standard"}))
    if to_iterations(cfg.training.eval_every, ctx_every.ipe) >= steps:
        # NEq needs a second evaluation before the end (a short --quick run): evaluate 4 times instead
        cfg = cfg.with_overrides({"training.eval_every": f"{max(1, steps // 4)}it"})
    return prepare(cfg)


def fixed_masks(ctx: Context, fraction: float) -> dict[str, torch.Tensor]:
    """Update masks freezing a seeded random ``fraction`` of every NEq layer's neurons (one member)."""
    g = torch.Generator().manual_seed(0)
    masks = {}
    for name in neq_layers(ctx.model):
        module = ctx.model.get_submodule(name)
        units = module.weight.shape[0]
        keep = torch.ones(1, units)
        keep[0, torch.randperm(units, generator=g)[: round(fraction * units)]] = 0.0
        masks[f"{name}.weight"] = keep.reshape(1, units, *([1] * (module.weight.dim() - 1)))
        if module.bias is not None:
            masks[f"{name}.bias"] = keep
    return masks


def run(ctx: Context, steps: int, variant: str, rows: list | None = None) -> float:
    """Seconds for ``steps`` iterations of one member from step 0, in the given variant (NEq's records into rows)."""
    members: Members = initial_members(ctx)
    spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe, augmentation=ctx.augmentation)
    if variant == "NEq":
        tracker = NeqTracker(ctx, 0, rows.extend if rows is not None else None)
        tracker.restore(members)
        spec.masks, spec.freeze, spec.update_masks = tracker.masks(), True, tracker
    elif variant.startswith("frozen"):
        spec.masks, spec.freeze = fixed_masks(ctx, float(variant.split()[1])), True
    t0 = time.perf_counter()
    train_members(StackedModel(ctx.model), members, spec, steps)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and one repeat (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="iterations per run (default 200; 40 quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; 1 quick)")
    ap.add_argument("--presets", default="lenet300_mnist5k,conv4_mnist5k")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    steps = args.steps or (40 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print("\n".join(_setup.machine_lines()))
    print(f"one member x {steps} iterations from step 0; best of {repeats}, variants interleaved\n")
    variants = ["plain", "NEq", "frozen 0.0", "frozen 0.5", "frozen 0.9"]
    header = f"{'preset':<18} {'variant':<11} {'ms/step':>8} {'vs plain':>8} {'backward FLOPs saved':>28}"
    lines = []
    with tempfile.TemporaryDirectory() as root:
        for preset in args.presets.split(","):
            ctx = context(preset, steps, root, args.threads)
            costs = layer_costs(ctx.model, ctx.data.input_shape)
            for v in variants:  # warm up every path (allocator, kernels)
                run(ctx, min(steps, 5), v)
            times: dict[str, list[float]] = {v: [] for v in variants}
            rows: list = []
            for _ in range(repeats):
                for v in variants:
                    if v == "NEq":
                        rows.clear()
                    times[v].append(run(ctx, steps, v, rows))
            plain = min(times["plain"]) / steps
            for v in variants:
                per_step = min(times[v]) / steps
                if v.startswith("frozen"):
                    masks = fixed_masks(ctx, float(v.split()[1]))
                    keep = {k: m[0].flatten() for k, m in masks.items() if k.endswith(".weight")}
                    saved = f"{weight_gradient_saved(costs, keep) / backward_macs(costs):.1%}"
                elif v == "NEq":  # over the steps timed (mean over time)
                    summary = neq_summary(rows, 0, steps)
                    saved = f"{summary['backward_flops_saved_fraction']:.1%} ({summary['mean_frozen_fraction']:.1%} frozen)"
                else:
                    saved = "0.0%"
                lines.append(f"{preset:<18} {v:<11} {per_step * 1e3:>8.2f} {per_step / plain:>7.2f}x {saved:>28}")
            lines.append("")
    print(header)
    print("-" * len(header))
    print("\n".join(lines))
    print("NEq = the tracker's evaluations included (every eval_every of the preset, or steps / 4 in a shorter run; NEq's defaults); over these "
          "first steps\nfrom initialization it freezes few neurons. 'frozen p' = p of every NEq layer's neurons "
          "frozen throughout\n(the output layer never is). Gradients are computed for every weight and masked: "
          "saved FLOPs are not saved time.")


if __name__ == "__main__":
    main()
