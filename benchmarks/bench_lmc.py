"""stability.lmc against the PyPI package loss-landscapes and a hand loop: curves, and the Hessian over a DataLoader.

    python benchmarks/bench_lmc.py [--quick] [--alphas 30] [--repeats 3]

Curves. Two networks are trained from different initializations by a plain PyTorch loop (SGD, momentum 0.9) on
mnist5k; then the loss at the same α points θ(α) = (1 − α)·θ_a + α·θ_b is measured on the test split (1,000
examples, one batch) three ways, timed in this process, interleaved, best of ``--repeats``:

- lmc:     ``stability.lmc.interpolate`` (every α stacked; the input layer's output formed from the two ends');
- loss-landscapes: ``linear_interpolation`` (steps = alphas − 1: it walks α = 1/steps .. 1, moving a copy of A in
  place) plus one evaluation at α = 0, so both evaluate the same α points; loss only;
- hand loop: ``load_state_dict`` at every α, evaluate (loss and error).

Rates: ``nominal`` counts every α's full forward (2·MACs per example, the per-α way's work); ``required`` counts the
work lmc does (the input layer twice per batch, the rest once per α). Both as FLOP/s and as a fraction of the
2048x2048 float32 ``torch.mm`` rate measured in the same process. ResNet-20 (width 1/4) has BatchNorm:
loss-landscapes interpolates parameters only (buffers stay A's), so its losses differ there by design; lmc and
the hand loop interpolate the buffers too (``bn = interpolate``) and must agree.

Hessian. λmax of LeNet-300-100's training loss over 1,000 training examples read by a ``DataLoader`` (batch 250):
``lmc.hessian`` (Lanczos) against pyhessian's power iteration (same loader size, its dataloader mode), both to
relative tolerance 1e-4; HVPs and seconds side by side. Nothing here asserts anything about time.
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
from torch.utils.data import DataLoader, TensorDataset

from stability import lmc
from stability.maths.flops import layer_costs
from stability.presets import get_preset
from stability.stages.context import Context, prepare
from stability.testing.reference import fresh_model, train_plain

THREADS = 2
CASES = [("LeNet-300-100", "lenet300_mnist5k", {}), ("ResNet-20 w1/4", "resnet8_mnist5k",
                                                       {"model.depth": "20", "model.width": "0.25"})]


def context(preset: str, overrides: dict[str, str], root: str) -> Context:
    return prepare(get_preset(preset).with_overrides({
        **overrides, "runtime.threads": str(THREADS), "runtime.quiet": "true", "runtime.device": "cpu",
        "runtime.results_root": root}))


def hand_loop(a: nn.Module, b: nn.Module, alphas: list[float], x, y) -> list[float]:
    m = copy.deepcopy(a).eval()
    sa, sb = a.state_dict(), b.state_dict()
    losses, errors = [], []
    for alpha in alphas:
        m.load_state_dict({k: (1 - alpha) * sa[k] + alpha * sb[k] if sa[k].is_floating_point() else sa[k]
                           for k in sa})
        with torch.no_grad():
            out = m(x)
        losses.append(float(F.cross_entropy(out, y)))
        errors.append(float((out.argmax(1) != y).float().mean()))  # the error too, as lmc measures it
    return losses


def landscapes(a: nn.Module, b: nn.Module, alphas: list[float], x, y) -> list[float]:
    import loss_landscapes
    import loss_landscapes.metrics

    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    start = copy.deepcopy(a).eval()
    first = metric(loss_landscapes.model_interface.model_wrapper.wrap_model(start))
    rest = loss_landscapes.linear_interpolation(start, copy.deepcopy(b).eval(), metric, steps=len(alphas) - 1)
    return [first, *rest.tolist()]


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter training and one repeat (a smoke run)")
    ap.add_argument("--alphas", type=int, default=30)
    ap.add_argument("--train-steps", type=int, default=None, help="training iterations (default 300; 30 quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; 1 quick)")
    args = ap.parse_args(argv)
    steps = args.train_steps or (30 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(THREADS)
    print("\n".join(_setup.machine_lines()))
    mm = _setup.matmul_rate()
    print(f"matmul 2048x2048 float32: {mm / 1e9:.1f} GFLOP/s. {args.alphas} α on the test split; networks trained "
          f"{steps} iterations; best of {repeats}, interleaved.\n")
    header = (f"{'model':<15} {'lmc s':>7} {'l-l s':>7} {'hand s':>7} {'l-l/lmc':>8} {'hand/lmc':>9}  "
              f"{'nominal GF/s (mm)':>17} {'required GF/s (mm)':>18} {'|Δloss| hand':>12} {'|Δloss| l-l':>11}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as root:
        for label, preset, overrides in CASES:
            ctx = context(preset, overrides, root)
            x, y = ctx.data.x_train, ctx.data.y_train
            xt, yt = ctx.data.split("test")
            a, b = train_plain(fresh_model(ctx, 1), x, y, 1, steps), train_plain(fresh_model(ctx, 2), x, y, 2, steps)
            alphas = lmc.alpha_grid(args.alphas)
            case = (a, b, alphas, xt, yt)
            ours = lambda c=case: lmc.interpolate(c[0], c[1], (c[3], c[4]), alphas=c[2], batch_size=len(c[3]))
            theirs = lambda c=case: landscapes(*c)
            hand = lambda c=case: hand_loop(*c)
            ours(), theirs(), hand()  # warm-up
            t_ours, t_theirs, t_hand = float("inf"), float("inf"), float("inf")
            for _ in range(repeats):
                t, curve = timed(ours, 1)
                t_ours = min(t_ours, t)
                t, l_theirs = timed(theirs, 1)
                t_theirs = min(t_theirs, t)
                t, l_hand = timed(hand, 1)
                t_hand = min(t_hand, t)
            costs = layer_costs(ctx.model, ctx.data.input_shape)
            macs = sum(c.forward for c in costs)
            first = costs[0].forward
            nominal = 2.0 * len(xt) * macs * len(alphas)
            required = 2.0 * len(xt) * (2 * first + (macs - first) * len(alphas))
            d_hand = max(abs(u - v) for u, v in zip(curve.loss, l_hand))
            d_ll = max(abs(u - v) for u, v in zip(curve.loss, l_theirs))
            print(f"{label:<15} {t_ours:>7.3f} {t_theirs:>7.3f} {t_hand:>7.3f} {t_theirs / t_ours:>7.2f}x "
                  f"{t_hand / t_ours:>8.2f}x  {nominal / t_ours / 1e9:>8.1f} ({nominal / t_ours / mm:>5.0%})  "
                  f"{required / t_ours / 1e9:>9.1f} ({required / t_ours / mm:>5.0%})  {d_hand:>12.1e} {d_ll:>11.1e}")
            print(f"{'':<15} input layer {costs[0].weight}: {first / macs:.0%} of the multiply-adds; barrier "
                  f"{curve.barrier:.4f}, endpoint errors {curve.error[0]:.4f} / {curve.error[-1]:.4f}")
        hessian_case(root, repeats)


def hessian_case(root: str, repeats: int) -> None:
    from stability.hessian.pyhessian_adapter import pyhessian_top_eigenvalues

    ctx = context("lenet300_mnist5k", {}, root)
    x, y = ctx.data.x_train[:1000], ctx.data.y_train[:1000]
    net = train_plain(fresh_model(ctx, 1), ctx.data.x_train, ctx.data.y_train, 1, 200)
    loader = DataLoader(TensorDataset(x, y), batch_size=250)
    t_ours, ours = timed(lambda: lmc.hessian(net, loader, top_k=1, tol=1e-4), repeats)
    t_py, (theirs, n_py) = timed(lambda: pyhessian_top_eigenvalues(net, x, y, 1, tol=1e-4, max_iter=1000,
                                                                   batch_size=250), repeats)
    print("\nλmax of LeNet-300-100 over a DataLoader (1,000 examples, batch 250), tol 1e-4:")
    print(f"  lmc.hessian (Lanczos): {ours.eigenvalues[0]:.5f} in {t_ours:.3f} s, {ours.n_hvp} HVPs")
    print(f"  pyhessian (power it.): {theirs[0]:.5f} in {t_py:.3f} s, {n_py} HVPs")
    print(f"  ratio pyhessian / lmc: {t_py / t_ours:.2f}x; relative difference "
          f"{abs(ours.eigenvalues[0] - theirs[0]) / abs(theirs[0]):.1e}")


if __name__ == "__main__":
    main()
