"""stability.lmc.plane against the PyPI package loss-landscapes and a per-point loop: a 21x21 loss-landscape plane.

    python benchmarks/bench_landscape.py [--quick] [--grid 21] [--repeats 3] [--threads 2] [--examples 1000]

Three networks are trained from different initializations by a plain PyTorch loop (SGD, momentum 0.9) on mnist5k;
then the loss on a grid x grid plane is measured on the first ``--examples`` test examples (one batch), three ways,
timed in this process, interleaved, best of ``--repeats``:

- lmc:     ``stability.lmc.plane(a, b, c, data, grid=21)``: the plane through the three networks (Gram-Schmidt
  coordinates), every grid point stacked, ``max_members`` 64 at a time; the input layer's output at every point
  formed from the three networks' outputs (three products per batch: θ(u, v) is affine in (u, v)); error and loss,
  plus the three networks at their exact coordinates;
- loss-landscapes: ``planar_interpolation(a, b, c, Loss(cross_entropy), steps=grid)``: grid x grid points,
  moving a copy of A in place along (b − a)/steps and (c − a)/steps; loss only;
- loop:    ``load_state_dict`` of θ(u, v) at every grid point of lmc's plane, evaluate (loss and error).

Rates: ``nominal`` counts every grid point's full forward (2·MACs per example per point, the per-point way's work);
``required`` counts the work lmc does (the input layer three times per batch, the rest once per point). Both as
FLOP/s and as a fraction of the 2048x2048 float32 ``torch.mm`` rate measured in the same process. Agreement: lmc
against the loop on the same points, and lmc on loss-landscapes' own points (``directions=(b − a, c − a)``, its
snake-ordered grid mapped back) against loss-landscapes. Nothing here asserts anything about time.

Curves. Fitting a Bezier curve between two of the networks (``lmc.fit_curve``, ``--fit-steps`` iterations of batch
128, then measured at 21 t with BatchNorm statistics recomputed) against training one network for the same
iterations and batch by a plain PyTorch loop (SGD, momentum 0.9): the fit's cost as a ratio of a sibling's.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import _setup
import torch
import torch.nn.functional as F
from torch import nn

from stability import lmc
from stability.engine import StackedModel
from stability.maths.directions import plane_basis
from stability.maths.flops import layer_costs
from stability.presets import get_preset
from stability.stages.context import Context, prepare
from stability.testing.reference import train_plain

CASES = [("LeNet-300-100", "lenet300_mnist5k", {}), ("Conv-4 w1/4", "conv4_mnist5k", {})]


def context(preset: str, overrides: dict[str, str], root: str, threads: int) -> Context:
    return prepare(get_preset(preset).with_overrides({
        **overrides, "runtime.threads": str(threads), "runtime.quiet": "true", "runtime.device": "cpu",
        "runtime.results_root": root}))


def per_point_loop(nets: list[nn.Module], u: list[float], v: list[float], x, y) -> list[float]:
    """The reference way: one network per grid point, its state loaded, evaluated."""
    states = [n.state_dict() for n in nets]
    basis = plane_basis(*states, StackedModel(nets[0]).param_names)
    m = copy.deepcopy(nets[0]).eval()
    losses = []
    for vj in v:
        for ui in u:
            c = basis.coefficients([ui], [vj])[0].tolist()
            m.load_state_dict({k: sum(ck * s[k] for ck, s in zip(c, states)) if t.is_floating_point() else t
                               for k, t in states[0].items()})
            with torch.no_grad():
                out = m(x)
            losses.append(float(F.cross_entropy(out, y)))
            float((out.argmax(1) != y).float().mean())
    return losses


def landscapes(nets: list[nn.Module], steps: int, x, y):
    import loss_landscapes
    import loss_landscapes.metrics

    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    return loss_landscapes.planar_interpolation(copy.deepcopy(nets[0]).eval(), nets[1], nets[2], metric, steps=steps)


def landscapes_agreement(nets: list[nn.Module], theirs, steps: int, x, y) -> float:
    """Largest relative difference between loss-landscapes and lmc on loss-landscapes' own points."""
    start, one, two = (n.state_dict() for n in nets)
    d1 = {k: one[k] - start[k] for k in start}
    d2 = {k: two[k] - start[k] for k in start}
    ours = lmc.plane(nets[0], data=(x, y), directions=(d1, d2), grid=(steps, steps + 1),
                     ranges=((0.0, (steps - 1) / steps), (0.0, 1.0)), batch_size=len(x))
    return max(abs(ours.loss[j + 1 if i % 2 == 0 else j][i] - float(theirs[i][j])) / abs(float(theirs[i][j]))
               for i in range(steps) for j in range(steps))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter training and one repeat (a smoke run)")
    ap.add_argument("--grid", type=int, default=21, help="grid points per axis (default 21)")
    ap.add_argument("--examples", type=int, default=1000, help="test examples, one batch (default 1000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--train-steps", type=int, default=None, help="training iterations (default 300; 30 quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; 1 quick)")
    ap.add_argument("--fit-steps", type=int, default=None, help="curve fitting iterations (default 1000; 100 quick)")
    args = ap.parse_args(argv)
    steps = args.train_steps or (30 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print("\n".join(_setup.machine_lines()))
    mm = _setup.matmul_rate()
    print(f"matmul 2048x2048 float32: {mm / 1e9:.1f} GFLOP/s. {args.grid}x{args.grid} plane ({args.grid ** 2} points) on "
          f"{args.examples} test examples; networks trained {steps} iterations; best of {repeats}, interleaved.\n")
    header = (f"{'model':<14} {'lmc s':>7} {'l-l s':>7} {'loop s':>7} {'l-l/lmc':>8} {'loop/lmc':>9}  "
              f"{'nominal GF/s (mm)':>17} {'required GF/s (mm)':>18} {'|Δloss| loop':>12} {'rel Δ l-l':>10}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as root:
        contexts = [(label, context(preset, overrides, root, args.threads)) for label, preset, overrides in CASES]
        for label, ctx in contexts:
            case(label, ctx, args, steps, repeats, mm)
        fit_steps = args.fit_steps or (100 if args.quick else 1000)
        print(f"\nBezier curve fit ({fit_steps} iterations, batch 128, then 21 t measured on the test split, BatchNorm "
              f"reset) vs training one network for {fit_steps} iterations of batch 128:")
        print(f"{'model':<14} {'fit s':>7} {'sibling (plain loop) s':>23} {'fit / sibling':>14}")
        for label, ctx in contexts:
            curve_case(label, ctx, steps, fit_steps)


def curve_case(label: str, ctx: Context, steps: int, fit_steps: int) -> None:
    """The time of lmc.fit_curve against a plain loop training one network for the same iterations and batch."""
    x, y = ctx.data.x_train, ctx.data.y_train
    xt, yt = ctx.data.split("test")
    a, b = (train_plain(ctx.new_model(s), x, y, s, steps) for s in (1, 2))
    t0 = time.perf_counter()
    lmc.fit_curve(a, b, (x, y), steps=fit_steps, batch_size=128, eval_data=(xt, yt), points=21)
    fit = time.perf_counter() - t0
    net = copy.deepcopy(a)
    t0 = time.perf_counter()
    train_plain(net, x, y, 0, fit_steps, batch=128)
    sibling = time.perf_counter() - t0
    print(f"{label:<14} {fit:>7.2f} {sibling:>23.2f} {fit / sibling:>13.2f}x")


def case(label: str, ctx: Context, args: argparse.Namespace, steps: int, repeats: int, mm: float) -> None:
    """Train three networks, time the three ways on one plane, print the row."""
    x, y = ctx.data.x_train, ctx.data.y_train
    xt, yt = (t[:args.examples] for t in ctx.data.split("test"))
    nets = [train_plain(ctx.new_model(seed), x, y, seed, steps) for seed in (1, 2, 3)]
    points = args.grid * args.grid
    lmc.plane(*nets, (xt, yt), grid=2, batch_size=len(xt))  # warm-up
    landscapes(nets, 2, xt, yt)
    t_ours = t_theirs = t_loop = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        plane = lmc.plane(*nets, (xt, yt), grid=args.grid, batch_size=len(xt))
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        l_theirs = landscapes(nets, args.grid, xt, yt)
        t_theirs = min(t_theirs, time.perf_counter() - t0)
        t0 = time.perf_counter()
        l_loop = per_point_loop(nets, plane.u, plane.v, xt, yt)
        t_loop = min(t_loop, time.perf_counter() - t0)
    costs = layer_costs(ctx.model, ctx.data.input_shape)
    macs = sum(c.forward for c in costs)
    first = costs[0].forward
    nominal = 2.0 * len(xt) * macs * points
    required = 2.0 * len(xt) * (3 * first + (macs - first) * points)
    flat = [v for row in plane.loss for v in row]
    d_loop = max(abs(a - b) for a, b in zip(flat, l_loop))
    d_ll = landscapes_agreement(nets, l_theirs, args.grid, xt, yt)
    print(f"{label:<14} {t_ours:>7.3f} {t_theirs:>7.3f} {t_loop:>7.3f} {t_theirs / t_ours:>7.2f}x "
          f"{t_loop / t_ours:>8.2f}x  {nominal / t_ours / 1e9:>8.1f} ({nominal / t_ours / mm:>5.0%})  "
          f"{required / t_ours / 1e9:>9.1f} ({required / t_ours / mm:>5.0%})  {d_loop:>12.1e} {d_ll:>10.1e}")
    errors = ", ".join(f"{e:.3f}" for e, _ in plane.at_networks.values())
    print(f"{'':<14} input layer {costs[0].weight}: {first / macs:.0%} of the multiply-adds; networks' test "
          f"errors {errors}; grid loss {min(flat):.3f} .. {max(flat):.3f}")

if __name__ == "__main__":
    main()
