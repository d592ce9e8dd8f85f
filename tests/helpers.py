"""Tiny settings shared by the tests: seconds, not minutes, on 2 CPU cores."""
from __future__ import annotations

from stability.config import Config
from stability.presets import get_preset

TINY = {
    "model.width": "0.1",
    "training.steps": "30it",
    "training.batch_size": "32",
    "training.eval_every": "10it",
    "training.checkpoint_every": "5it",
    "training.rewind_points": "5it,10it",
    "runtime.threads": "2",
    "runtime.quiet": "true",
}


def tiny_config(root, preset: str = "lenet300_mnist5k", **overrides: str) -> Config:
    """A preset shrunk to a few iterations of a narrow model, writing under ``root``."""
    extra = {k.replace("__", "."): v for k, v in overrides.items()}
    return get_preset(preset).with_overrides({**TINY, "runtime.results_root": str(root), **extra})


TINY_ARGS = [f"--set={k}={v}" for k, v in TINY.items() if not k.startswith("runtime.")]


def train_plain(net, x, y, seed: int, steps: int, lr: float = 0.05, batch: int = 64):
    """Training as a user's own script does it: a plain PyTorch loop, SGD with momentum 0.9, batches of ``batch``
    drawn with replacement from a generator seeded by ``seed``; returns the network in eval mode."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval()


def fresh_model(ctx, seed: int):
    """The context's architecture with every layer re-initialized from ``seed`` (independent networks start apart)."""
    import torch

    net = ctx.new_model()
    torch.manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net
