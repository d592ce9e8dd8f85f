"""Interpolation curves: the α grid evaluated batched vs one model per α.

    python benchmarks/bench_interpolation.py [--quick] [--alphas 30] [--train-steps N]

For each case, two siblings are trained from the preset's step-0 weights with the suite's
engine (different data order), then the error and loss of θ(α) = (1 − α)·θ_a + α·θ_b are
measured on the test split (1,000 examples) at every α of the grid:

- batched: ``interpolation.evaluate_path`` (all α as stacked members, in chunks of
  ``max_members``);
- per-α:   ``reference.evaluate_path_naive`` (deep-copy the model, ``load_state_dict``,
  evaluate; BatchNorm statistics recomputed per α with bn = reset).

Both are timed in this process, interleaved, best of ``--repeats``; the ratio is per-α / batched.
The two must agree: the errors are compared exactly (a borderline example may flip on a
last-bit difference; the largest difference is printed) and the losses to relative 1e-4.
Nothing here asserts anything about time.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time

import _setup
import torch

from stability.engine import StackedModel, TrainSpec, train_members
from stability.maths.interpolation import CurveSettings, evaluate_path
from stability.presets import get_preset
from stability.stages.checkpoints import initial_members
from stability.stages.context import Context, prepare
from stability.stages.siblings import SiblingSettings, sibling_seeds, start_members
from stability.testing.reference import evaluate_path_naive

THREADS = 2
CASES = [("lenet300_mnist5k", "interpolate"), ("conv4_mnist5k", "interpolate"),
         ("resnet8_mnist5k", "interpolate"), ("resnet8_mnist5k", "reset")]


def context(preset: str, steps: int, root: str) -> Context:
    cfg = get_preset(preset).with_overrides({
        "training.steps": f"{steps}it", "training.rewind_points": "0it",
        "runtime.threads": str(THREADS), "runtime.quiet": "true", "runtime.device": "cpu",
        "runtime.results_root": root,
    })
    return prepare(cfg)


def trained_pair(ctx: Context, steps: int) -> tuple[dict, dict]:
    """Two siblings trained from step 0 for ``steps`` iterations; their state dicts."""
    order, aug = sibling_seeds(ctx.cfg.training.noise_seed, SiblingSettings(siblings=2))
    members = start_members(ctx, initial_members(ctx), 2, order, aug, "fresh")
    spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe, augmentation=ctx.augmentation)
    train_members(StackedModel(ctx.model), members, spec, steps)
    return members.member_state_dict(0), members.member_state_dict(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter training and one repeat (a smoke run)")
    ap.add_argument("--alphas", type=int, default=30)
    ap.add_argument("--train-steps", type=int, default=None, help="sibling training iterations (default 200; 20 quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; 1 quick)")
    args = ap.parse_args(argv)
    train_steps = args.train_steps or (20 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)

    torch.set_num_threads(THREADS)
    print("\n".join(_setup.machine_lines()))
    print(f"{args.alphas} α on the test split; siblings trained {train_steps} iterations from step 0; "
          f"best of {repeats}, batched and per-α interleaved.\n")
    header = (f"{'preset':<18} {'bn':<11} {'batched s':>9} {'per-α s':>8} {'ratio':>7}  "
              f"{'errors equal':>12} {'max |Δerr|':>10} {'max rel Δloss':>13} {'barrier':>8}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as root:
        for preset, bn in CASES:
            ctx = context(preset, train_steps, root)
            settings = CurveSettings(alphas=args.alphas, bn=bn).validate()
            alphas = settings.grid()
            a, b = trained_pair(ctx, train_steps)
            x, y = ctx.data.split("test")
            sm = StackedModel(ctx.model)
            template = ctx.new_model()

            batched = functools.partial(evaluate_path, sm, a, b, alphas, x, y, settings, ctx.data.x_train)
            naive = functools.partial(evaluate_path_naive, template, a, b, alphas, x, y, settings,
                                      ctx.data.x_train)
            batched(), naive()  # warm-up
            tb, tn = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                errs, losses = batched()
                tb.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                n_errs, n_losses = naive()
                tn.append(time.perf_counter() - t0)
            d_err = max(abs(e - f) for e, f in zip(errs, n_errs))
            d_loss = max(abs(e - f) / max(abs(f), 1e-12) for e, f in zip(losses, n_losses))
            barrier = max(errs) - 0.5 * (errs[0] + errs[-1])
            print(f"{preset:<18} {bn:<11} {min(tb):>9.3f} {min(tn):>8.3f} {min(tn) / min(tb):>6.2f}x  "
                  f"{'yes' if errs == n_errs else 'no':>12} {d_err:>10.4f} {d_loss:>13.1e} {barrier:>8.4f}")
    print(f"\nratio = per-α / batched. Errors are fractions of {len(y)} test examples (one example = {1 / len(y):.4f}).")


if __name__ == "__main__":
    main()
