"""What ``stability.lmc`` accepts as a network, and how it becomes a template module plus a state dict.

A network is an ``nn.Module``; a state dict (``{name: tensor}``) with a ``model=`` template of its architecture; or
a path to a state-dict file (``.pt``/``.pth``, read with ``weights_only=True``; ``.safetensors``; a Lightning
``.ckpt``), also with ``model=``. Keys, shapes and prefixes are checked by ``store.statefiles.match_state``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError

Network = nn.Module | Mapping[str, Tensor] | str | PathLike


def resolve(network: Network, model: nn.Module | None, what: str) -> tuple[nn.Module, dict[str, Tensor]]:
    """``(template, state)``: the architecture to run and the network's tensors (detached, in the template's
    order). ``model`` is the template for state dicts and files (for a module: itself unless given)."""
    if isinstance(network, nn.Module):
        template = model if model is not None else network
        state = {k: v.detach() for k, v in network.state_dict().items()}
        if model is not None:
            from ..store.statefiles import match_state

            state = match_state(state, model.state_dict(), what)
        return template, state
    if model is None:
        raise ConfigError(f"{what}: a state dict or a checkpoint file needs the architecture: pass model=<an "
                          "nn.Module of that architecture>")
    from ..store.statefiles import match_state, read_state_file

    if isinstance(network, (str, PathLike)):
        state = read_state_file(Path(network))
        return model, match_state(state, model.state_dict(), f"{what} ({network})")
    if isinstance(network, Mapping):
        return model, match_state(dict(network), model.state_dict(), what)
    raise ConfigError(f"{what}: expected an nn.Module, a state dict or a path to a checkpoint file, got "
                      f"{type(network).__name__}")


def resolve_pair(model_a: Network, model_b: Network,
                 model: nn.Module | None) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """``(template, state_a, state_b)`` of two networks of one architecture (B's checked against A's); a state
    dict or file for B takes A's module as its template when no ``model`` is given."""
    template, a = resolve(model_a, model, "model_a")
    b_template = model if model is not None else (None if isinstance(model_b, nn.Module) else template)
    _, b = resolve(model_b, b_template, "model_b")
    same_architecture(a, b, "model_b")
    return template, a, b


def device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given, else the template's (its first parameter's or buffer's; the CPU without any)."""
    if device is not None:
        return torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def private(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of the template on ``device`` (the suite switches modes and swaps tensors in it; the caller's
    module is never touched), its gradients dropped."""
    stash = {p: p.grad for p in model.parameters()}
    try:
        for p in stash:
            p.grad = None
        return copy.deepcopy(model).to(device)
    finally:
        for p, g in stash.items():
            p.grad = g


def module_with(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``template`` holding ``state`` (eval mode)."""
    out = copy.deepcopy(template)
    out.load_state_dict(dict(state))
    return out.eval()


def same_architecture(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str) -> None:
    """ConfigError naming the first tensor where two networks' state dicts differ in names or shapes."""
    for k in a:
        if k not in b:
            raise ConfigError(f"{what}: tensor {k!r} is missing: the networks must have the same architecture")
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise ConfigError(f"{what}: tensor {k!r} has shape {tuple(b[k].shape)}, expected {tuple(a[k].shape)}: "
                              "the networks must have the same architecture")
    extra = [k for k in b if k not in a]
    if extra:
        raise ConfigError(f"{what}: unexpected tensor {extra[0]!r}: the networks must have the same architecture")
