"""The training engine: N copies of one architecture trained in lockstep.

A *member* is one copy (the trunk is a single member; siblings are several).
Members share the architecture and are held as stacked tensors ``[N, ...]``;
one step runs all members at once (batched matmuls for MLPs, the module once per
member for convolutional models on the CPU, ``vmap(functional_call)`` otherwise:
see ``StackedModel``). Each member has its own data-order and augmentation
generators, so the only thing that differs between members with equal weights is
their SGD noise: every member goes through exactly the same arithmetic, so members
with equal weights and noise stay bit-identical wherever they sit in the stack.

Where things live:

- ``runtime``: the device, and process-wide CPU tuning (threads, allocator, denormal floats);
- ``optim``: the learning-rate ``Schedule`` and the optimizers (Adam stepped member by member);
- ``stacked``: ``StackedModel``, the forward strategies and the hand-written MLP backward;
- ``members``: ``Members`` (weights, optimizer state, data streams), their serialization and
  checks, and ``derive_seed`` for their noise seeds;
- ``loop``: ``TrainSpec``, batches and epochs, and the training loop ``train_members``.

The plain one-model-at-a-time loop the batched one is checked against is
``stability.testing.reference.train_reference``.
"""
from __future__ import annotations

from .loop import TrainSpec, iterations_per_epoch, train_members
from .members import Members, check_matches_model, derive_seed, first_nonfinite
from .optim import Schedule
from .runtime import configure_threads, resolve_device
from .stacked import StackedModel

__all__ = [
    "Members",
    "Schedule",
    "StackedModel",
    "TrainSpec",
    "check_matches_model",
    "configure_threads",
    "derive_seed",
    "first_nonfinite",
    "iterations_per_epoch",
    "resolve_device",
    "train_members",
]
