"""Barrier between two independently trained torchvision networks, before and after traced weight matching.

Two ``torchvision/<arch>`` networks (CIFAR stem: 3x3 stride-1 first convolution, no stem max-pool) from
different seeds are trained on mnist5k (4,000 training and 1,000 test images, packaged with the suite) with a
plain PyTorch loop. The script prints each endpoint's test accuracy, then the error and loss barriers along
the straight line between them, with BatchNorm statistics reset on training images at every α, as they are
and after aligning B to A by Git Re-Basin weight matching (and, with ``--activations``, activation matching on
the same training images) on the permutation spec torch.fx traces.

    python examples/barrier_torchvision.py --arch resnet18 --epochs 3
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import stability
from stability.config import DatasetConfig, ModelConfig
from stability.data import load_dataset
from stability.models import build_model


def train(arch: str, data, seed: int, epochs: int, batch_size: int, lr: float) -> nn.Module:
    """``torchvision/<arch>`` trained for ``epochs`` epochs by SGD with momentum and a cosine schedule."""
    model = build_model(ModelConfig(name=f"torchvision/{arch}", stem="cifar"), data.input_shape, data.num_classes,
                        seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(data.x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(data.x_train), generator=g)
        for i in range(len(data.x_train) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  seed {seed} epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", help="a torchvision classification model (default resnet18)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed-a", type=int, default=0)
    parser.add_argument("--seed-b", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alphas", type=int, default=5, help="points on the line, both ends included")
    parser.add_argument("--bn-examples", type=int, default=500, help="training images the BatchNorm reset reads")
    parser.add_argument("--activations", action="store_true", help="also align by activation matching")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="save the two trained state dicts here (safetensors)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(DatasetConfig(name="mnist5k", val_size=0))
    print(f"torchvision/{args.arch} (cifar stem) on mnist5k: {len(data.x_train)} train, {len(data.x_test)} test, "
          f"{args.epochs} epochs, seeds {args.seed_a} and {args.seed_b}", flush=True)
    start = time.perf_counter()
    net_a = train(args.arch, data, args.seed_a, args.epochs, args.batch_size, args.lr)
    net_b = train(args.arch, data, args.seed_b, args.epochs, args.batch_size, args.lr)
    if args.out is not None:
        from safetensors.torch import save_file

        args.out.mkdir(parents=True, exist_ok=True)
        for tag, net in (("a", net_a), ("b", net_b)):
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / f"{tag}.safetensors"))
    acc_a, acc_b = (accuracy(n, data.x_test, data.y_test) for n in (net_a, net_b))

    test = (data.x_test, data.y_test)
    bn_data = (data.x_train[:args.bn_examples], data.y_train[:args.bn_examples])
    curve = {"alphas": args.alphas, "bn": "reset", "bn_data": bn_data, "batch_size": 500}
    naive = stability.lmc.interpolate(net_a, net_b, test, **curve)
    aligned_b, _ = stability.lmc.align(net_a, net_b, method="weights", example_input=data.x_train[:2])
    assert abs(accuracy(aligned_b, data.x_test, data.y_test) - acc_b) < 1e-9  # the same function
    aligned = stability.lmc.interpolate(net_a, aligned_b, test, **curve)
    rows = [("naive", naive), ("weight matching", aligned)]
    if args.activations:
        by_acts, _ = stability.lmc.align(net_a, net_b, method="activations", data=bn_data, examples=args.bn_examples)
        rows.append(("activation matching", stability.lmc.interpolate(net_a, by_acts, test, **curve)))

    print(f"\ntest accuracy: A (seed {args.seed_a}) {100 * acc_a:.2f}%, B (seed {args.seed_b}) {100 * acc_b:.2f}%")
    print(f"{'':<22}{'error barrier':>15}{'loss barrier':>14}   error along α (%)")
    for label, c in rows:
        path = " ".join(f"{100 * e:.1f}" for e in c.error)
        print(f"{label:<22}{100 * c.barrier:>14.2f}%{c.loss_barrier:>14.3f}   {path}")
    print(f"(α = {', '.join(f'{a:.2f}' for a in naive.alphas)}; BatchNorm reset on {args.bn_examples} training "
          f"images at each α; {time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
