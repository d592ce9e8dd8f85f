"""State-dict files written elsewhere: read without running code, and matched to an architecture.

``read_state_file`` reads ``.pt``/``.pth``/``.bin`` and Lightning ``.ckpt`` files with
``torch.load(weights_only=True)`` (a file that would unpickle code is refused, never loaded), and ``.safetensors``
files (the suite's own through ``load_tensors``, so their digest is checked). ``match_state`` strips the prefixes
Lightning and DataParallel add and refuses missing, unexpected or wrongly shaped tensors, naming the first.
"""
from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .files import _DIGEST_KEY, load_tensors

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
# Where checkpoints keep the state dict inside a larger dict (Lightning, most training scripts, DDP wrappers).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# What Lightning (``self.model``), DataParallel/DDP (``module``) and some scripts (``net``) put before every key.
PREFIXES = ("model.", "module.", "net.")
ACCEPTED = ("a state dict saved by torch.save(model.state_dict(), path) as .pt, .pth or .bin, a .safetensors file, "
            "or a Lightning .ckpt; the state dict alone or inside a dict under "
            + ", ".join(repr(k) for k in WRAPPER_KEYS))


def is_state_file(path: str | Path) -> bool:
    """Whether ``path`` names a state-dict file by its suffix (rather than a run directory or a config)."""
    return Path(path).suffix.lower() in SUFFIXES


def read_state_file(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a state-dict file (on the CPU), unwrapped from a checkpoint dict; ConfigError naming the file
    when it is missing, of another format, damaged, or would run code to load."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{str(path)!r}: unknown state-dict file type {path.suffix or '(no suffix)'!r}; "
                          f"choose one of {', '.join(SUFFIXES)} ({ACCEPTED})")
    if not path.is_file():
        raise ConfigError(f"{str(path)!r}: no such file (expected {ACCEPTED})")
    obj = _read_safetensors(path) if suffix == ".safetensors" else _read_torch(path)
    return _unwrap(obj, path)


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f"it pickles {found.group(1)}" if found else "it pickles more than tensors"
            raise ConfigError(
                f"{str(path)!r} was not loaded: reading it would run code (torch.load(weights_only=True) refused "
                f"it: {what}); save the weights alone where you trust the file, e.g. "
                "torch.save(model.state_dict(), path) or torch.save(ckpt['state_dict'], path)") from None
        raise ConfigError(f"{str(path)!r} is not a torch file or is damaged ({_first_line(exc)}); "
                          f"expected {ACCEPTED}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file breaks the unpickler in many ways
        raise ConfigError(f"{str(path)!r} is truncated, damaged or not a torch file ({_first_line(exc)}); "
                          f"expected {ACCEPTED}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        metadata = header.get("__metadata__") or {}
    except (OSError, ValueError, AttributeError, MemoryError) as exc:
        raise ConfigError(f"{str(path)!r} is truncated or not a safetensors file ({_first_line(exc)})") from None
    if isinstance(metadata, dict) and _DIGEST_KEY in metadata:  # the suite's own: check its digest
        try:
            return load_tensors(path)[0]
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is truncated or not a safetensors file ({_first_line(exc)})") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside what a file held: itself, or under a wrapper key (nested wrappers too)."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _has_tensor(obj[k])), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj) and _has_tensor(obj):
        return {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    found = (f"a dict with keys {_some(list(obj))}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}")
    raise ConfigError(f"{str(path)!r}: not a dict of tensors (found {found}); expected {ACCEPTED}")


def _has_tensor(obj: Mapping) -> bool:
    return any(isinstance(v, Tensor) for v in obj.values()) or any(
        isinstance(v, Mapping) and _has_tensor(v) for k, v in obj.items() if k in WRAPPER_KEYS)


def match_state(state: Mapping[str, Any], template: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """``state`` as a state dict of ``template``'s architecture: prefixes stripped when that makes the keys match,
    floating tensors cast to the template's dtype, in the template's order, on the CPU, detached. ConfigError
    (naming ``what`` and the first offending key) for missing, unexpected or wrongly shaped tensors."""
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    stripped = _strip(tensors, set(template))
    missing = [k for k in template if k not in stripped]
    extra = [k for k in stripped if k not in template]
    hint = "is it a checkpoint of another model, or another width or depth?"
    if missing:
        has = f"; the file has {_some(list(tensors))}" if tensors else "; it holds no tensors"
        raise ConfigError(f"{what}: missing key {missing[0]!r}{_more(missing)} for this architecture{has}: {hint}")
    if extra:
        raise ConfigError(f"{what}: unexpected key {extra[0]!r}{_more(extra)} for this architecture "
                          f"(it expects {_some(list(template))}): {hint}")
    out = {}
    for k, ref in template.items():
        t = stripped[k].detach()
        if tuple(t.shape) != tuple(ref.shape):
            raise ConfigError(f"{what}: key {k!r} has shape {tuple(t.shape)}, this architecture expects "
                              f"{tuple(ref.shape)}: {hint}")
        if t.dtype != ref.dtype:
            if not ref.is_floating_point() and (t.is_floating_point() or t.is_complex()) and not bool(
                    torch.equal(t, t.round())):
                raise ConfigError(f"{what}: key {k!r} holds fractional values where this architecture keeps "
                                  f"{ref.dtype} (a counter or an index)")
            t = t.to(ref.dtype)
        out[k] = t.to("cpu")
    return out


def _strip(tensors: dict[str, Tensor], wanted: set[str]) -> dict[str, Tensor]:
    """``tensors`` with the prefix (``model.``, ``module.``, ``net.``, or a chain of them, ``module.model.``) shared
    by every key removed when that makes the keys the template's; else the reading closest to them (unchanged on a
    tie), for the error message."""
    candidates = [tensors]
    prefix = ""
    while tensors and set(candidates[-1]) != wanted:
        nxt = next((p for p in PREFIXES if all(k.startswith(prefix + p) for k in tensors)), None)
        if nxt is None:
            break
        prefix += nxt
        candidates.append({k[len(prefix):]: v for k, v in tensors.items()})
    return max(candidates, key=lambda c: (set(c) == wanted, len(wanted.intersection(c))))


def _some(keys: list, n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _more(keys: list) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
