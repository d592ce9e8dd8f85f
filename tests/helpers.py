"""Tiny settings shared by the tests: seconds, not minutes, on 2 CPU cores."""
from __future__ import annotations

from stability.config import Config
from stability.presets import get_preset
from stability.testing.reference import fresh_model, train_plain  # noqa: F401  (the tests import them from here)

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
