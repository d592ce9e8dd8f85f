"""Permutation alignment: weight matching and activation matching against training one sibling.

    python benchmarks/bench_align.py [--quick] [--presets a,b] [--repeats 3] [--examples 1000]

For each preset (default: LeNet-300-100, Conv-4 and ResNet-20 at width 1/4 on mnist5k, i.e.
``lenet300_mnist5k``, ``conv4_mnist5k`` and ``resnet8_mnist5k`` with depth 20), two networks are
trained from different seeds (the preset's own steps), then timed in this process, best of
``--repeats``:

- one sibling: ``engine.train_members`` of one member over the preset's whole training run
  (``training.steps`` iterations from step 0), the unit of work a sweep does per sibling;
- weight matching: ``align.weight_matching`` of the two final networks (data-free);
- activation matching: ``align.activation_matching`` on ``--examples`` training inputs;
- REPAIR at α = 0.5: ``align.repair`` of the midpoint on the same inputs.

Printed: seconds and each alignment's time as a ratio of one sibling's training time. Nothing here
asserts anything about time.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import _setup
import torch

from stability.align import activation_matching, permutation_spec, repair, weight_matching
from stability.engine import StackedModel, TrainSpec, train_members
from stability.maths.interpolation import CurveSettings, alignment_subset
from stability.presets import get_preset
from stability.stages.checkpoints import initial_members
from stability.stages.context import prepare
from stability.stages.trunk import train_trunk, trunk_checkpoint

THREADS = 2
PRESETS = {
    "lenet300_mnist5k": {},
    "conv4_mnist5k": {},
    "resnet20_mnist5k": {"model.depth": "20", "model.width": "0.25"},
}


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(name: str, cfg, states: list[dict], repeats: int, examples: int) -> str:
    """One table row: a sibling's training time and each alignment step's, with their ratios."""
    ctx = prepare(cfg)
    sm = StackedModel(ctx.model)
    spec = permutation_spec(ctx.model)
    spec_train = TrainSpec(ctx.data, ctx.cfg, ctx.ipe, augmentation=ctx.augmentation)
    t_sib, _ = best(lambda: train_members(sm, initial_members(ctx), spec_train, ctx.total_steps), repeats)
    a, b = states
    x = alignment_subset(ctx.data.x_train, CurveSettings(align_examples=examples))
    t_w, _ = best(lambda: weight_matching(spec, a, b), repeats)
    t_a, _ = best(lambda: activation_matching(ctx.model, spec, a, b, x), repeats)
    mid = {k: (0.5 * v + 0.5 * b[k]) if v.is_floating_point() else v for k, v in a.items()}
    t_r, _ = best(lambda: repair(ctx.model, a, b, mid, 0.5, x), repeats)
    params = sum(p.numel() for p in ctx.model.parameters())
    return (f"{name:<18} {params:>8} {ctx.total_steps:>6} {t_sib:>10.3f} {t_w:>10.3f} {t_w / t_sib:>7.3f} "
            f"{t_a:>9.3f} {t_a / t_sib:>7.3f} {t_r:>9.3f} {t_r / t_sib:>7.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, 100 training iterations")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    repeats = 1 if args.quick else args.repeats
    print("\n".join(_setup.machine_lines()))
    print(f"{'network':<18} {'params':>8} {'steps':>6} {'sibling s':>10} {'weights s':>10} {'ratio':>7} "
          f"{'activ. s':>9} {'ratio':>7} {'REPAIR s':>9} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as root:
        for name in args.presets.split(","):
            base = "resnet8_mnist5k" if name == "resnet20_mnist5k" else name
            over = {**PRESETS.get(name, {}), "runtime.results_root": root, "runtime.quiet": "true",
                    "runtime.threads": str(THREADS)}
            if args.quick:  # the preset's rewind points past 100it are not needed here
                over.update({"training.steps": "100it", "training.rewind_points": "0it"})
            cfg = get_preset(base).with_overrides(over)
            states = []
            for seed in (0, 1):
                cfg_s = cfg.with_overrides({"training.init_seed": str(seed), "training.noise_seed": str(seed)})
                ctx = prepare(cfg_s)
                train_trunk(cfg_s, ctx=ctx)
                states.append(trunk_checkpoint(ctx, ctx.total_steps).member_state_dict(0))
            print(measure(name, cfg, states, repeats, args.examples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
