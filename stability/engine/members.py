"""``Members``: N members' weights, optimizer state and data streams; their serialization and checks."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import CheckpointError
from .stacked import stack_states, unstack


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and platforms)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Members:
    """N members' weights, optimizer state and data streams at iteration ``step``."""

    step: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    order_seeds: list[int]
    aug_seeds: list[int]
    order_gens: list[torch.Generator] = field(default_factory=list)
    aug_gens: list[torch.Generator] = field(default_factory=list)
    perms: Tensor | None = None  # [N, n_train]: this epoch's data order per member
    optimizer_state: dict | None = None  # restored state, used to build the optimizer
    optimizer: torch.optim.Optimizer | None = None  # the live optimizer while training
    # Dropout masks per member (models with dropout only): created on first use from the member's
    # augmentation seed, so they are part of its noise seed, and saved with its state.
    drop_gens: list[torch.Generator] = field(default_factory=list)
    # State of a training method that changes what is updated (NEq: its statistics and frozen neurons),
    # saved as ``extra/<key>`` with the rest so a resumed run continues it bit for bit.
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.order_gens:
            self.order_gens = [torch.Generator().manual_seed(s) for s in self.order_seeds]
        if not self.aug_gens:
            self.aug_gens = [torch.Generator().manual_seed(s) for s in self.aug_seeds]

    @property
    def n(self) -> int:
        return len(self.order_seeds)

    def dropout_generators(self, device: torch.device) -> list[torch.Generator]:
        """Each member's dropout generator on ``device`` (seeded from its noise on first use)."""
        if not self.drop_gens:
            self.drop_gens = [torch.Generator(device=device).manual_seed(derive_seed(s, "dropout"))
                              for s in self.aug_seeds]
        return self.drop_gens

    @classmethod
    def from_model_states(cls, states: Sequence[Mapping[str, Tensor]], param_names: Sequence[str], step: int,
                          order_seeds: Sequence[int], aug_seeds: Sequence[int], device: torch.device) -> Members:
        """Members starting from per-member ``state_dict``s with fresh optimizer state."""
        stacked = stack_states(states)
        params = {k: stacked[k].to(device) for k in param_names}
        buffers = {k: v.to(device) for k, v in stacked.items() if k not in params}
        return cls(step, params, buffers, list(order_seeds), list(aug_seeds))

    # -- serialization: everything needed to resume bit-exactly
    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and metadata for a safetensors checkpoint."""
        t: dict[str, Tensor] = {}
        for k, v in self.params.items():
            t[f"param/{k}"] = v
        for k, v in self.buffers.items():
            t[f"buffer/{k}"] = v
        for i, g in enumerate(self.order_gens):
            t[f"rng/order/{i}"] = g.get_state()
        for i, g in enumerate(self.aug_gens):
            t[f"rng/aug/{i}"] = g.get_state()
        for i, g in enumerate(self.drop_gens):
            t[f"rng/dropout/{i}"] = g.get_state()
        if self.perms is not None:
            t["perms"] = self.perms
        for k, v in self.extra.items():
            t[f"extra/{k}"] = v.contiguous()
        opt_keys: dict[str, list[str]] = {}
        state = self.optimizer.state_dict()["state"] if self.optimizer is not None else (self.optimizer_state or {}).get("state", {})
        if state:
            for idx, st in state.items():
                for key, val in st.items():
                    if isinstance(val, Tensor):
                        t[f"opt/{idx}/{key}"] = val
                        opt_keys.setdefault(str(idx), []).append(key)
        meta = {"step": self.step, "members": self.n, "order_seeds": self.order_seeds,
                "aug_seeds": self.aug_seeds, "optimizer_keys": opt_keys}
        return t, meta

    @classmethod
    def from_tensors(cls, t: Mapping[str, Tensor], meta: Mapping, device: torch.device) -> Members:
        """Inverse of ``to_tensors``."""
        params = {k[6:]: v.to(device) for k, v in t.items() if k.startswith("param/")}
        buffers = {k[7:]: v.to(device) for k, v in t.items() if k.startswith("buffer/")}
        n = int(meta["members"])
        order_gens = [torch.Generator() for _ in range(n)]
        aug_gens = [torch.Generator() for _ in range(n)]
        for i in range(n):
            order_gens[i].set_state(t[f"rng/order/{i}"])
            aug_gens[i].set_state(t[f"rng/aug/{i}"])
        drop_gens = []
        if "rng/dropout/0" in t:
            drop_gens = [torch.Generator(device=device) for _ in range(n)]
            for i, g in enumerate(drop_gens):
                g.set_state(t[f"rng/dropout/{i}"])
        opt_state = None
        if meta.get("optimizer_keys"):
            opt_state = {"state": {int(idx): {key: t[f"opt/{idx}/{key}"].to(device) for key in keys}
                                   for idx, keys in meta["optimizer_keys"].items()}}
        perms = t["perms"].to(device) if "perms" in t else None
        extra = {k[6:]: v.to(device) for k, v in t.items() if k.startswith("extra/")}
        return cls(int(meta["step"]), params, buffers, list(meta["order_seeds"]), list(meta["aug_seeds"]),
                   order_gens, aug_gens, perms, opt_state, drop_gens=drop_gens, extra=extra)

    def member_state_dict(self, i: int) -> dict[str, Tensor]:
        """Member i as a plain model ``state_dict``."""
        return {**unstack(self.params, i), **unstack(self.buffers, i)}


def check_matches_model(names_params: Sequence[str], names_buffers: Sequence[str], members: Members, where: str) -> None:
    """Raise CheckpointError when a checkpoint's tensors do not fit the model."""
    if set(members.params) != set(names_params) or set(members.buffers) != set(names_buffers):
        missing = sorted(set(names_params) - set(members.params))
        extra = sorted(set(members.params) - set(names_params))
        raise CheckpointError(f"checkpoint {where} does not match the model (missing {missing[:5]}, unexpected {extra[:5]})")


def first_nonfinite(members: Members, member: int | None = None) -> tuple[int, str] | None:
    """(member, tensor name) of the first parameter or buffer holding NaN or inf, or None when all are finite."""
    for kind, tensors in (("parameter", members.params), ("buffer", members.buffers)):
        for name, t in tensors.items():
            if not t.is_floating_point():
                continue
            finite = torch.isfinite(t.detach()).flatten(1).all(1)
            if member is not None:
                if not bool(finite[member]):
                    return member, f"{kind} {name}"
            elif not bool(finite.all()):
                return int((~finite).nonzero()[0, 0]), f"{kind} {name}"
    return None
