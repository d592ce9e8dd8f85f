"""The run store: one directory per run, named by a settings hash, written atomically.

Records are files a person can open: JSON for settings and summaries, CSV for
tables, safetensors for tensors (loading a checkpoint never executes code).
Every write goes to a temporary file in the same directory and is renamed into
place, so a killed process leaves the old file or the new one, never half.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError, StabilityError

# Bumped when the layout of a run directory changes incompatibly.
FORMAT_VERSION = 1
_ORDER_KEY = "__tensor_order__"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Atomically write rows (dicts) as CSV; columns default to the union in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    return value


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a CSV written by ``write_csv`` back into dicts with numbers parsed."""
    with open(path, newline="") as fh:
        return [{k: _parse_number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _parse_number(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> None:
    """Atomically save tensors as safetensors; metadata values are stored as JSON strings."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    # safetensors stores tensors in its own order; keep ours so a round trip gives the same dict order
    # (mask and parameter order decides e.g. which random draws go to which tensor).
    meta[_ORDER_KEY] = json.dumps(list(plain))
    atomic_write_bytes(path, st_save(plain, metadata=meta))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its JSON metadata; a damaged file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        from safetensors import safe_open  # metadata needs the header

        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: {exc}") from None
    meta = {k: json.loads(v) for k, v in raw_meta.items()}
    order = meta.pop(_ORDER_KEY, None)
    if order is not None and set(order) == set(tensors):
        tensors = {k: tensors[k] for k in order}
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, for manifests."""
    import numpy

    from . import __version__

    return {
        "stability": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


class RunDir:
    """A run's directory: ``root/<kind>_<hash>/`` with ``manifest.json``."""

    def __init__(self, root: str | Path, kind: str, run_hash: str):
        self.root = Path(root)
        self.kind = kind
        self.hash = run_hash
        self.path = self.root / f"{kind}_{run_hash}"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        """The manifest, checked for a compatible format version."""
        manifest = read_json(self.manifest_path)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StabilityError(
                f"run directory {str(self.path)!r} was written by an incompatible version of the suite "
                f"(format_version {version!r}, this version reads {FORMAT_VERSION}); "
                "move it away or use a different runtime.results_root"
            )
        return manifest

    def is_complete(self) -> bool:
        return self.exists() and self.manifest().get("status") == "complete"

    def start(self, config: Mapping[str, Any], hashed: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Create the directory and write (or refresh) a 'running' manifest."""
        if self.exists():
            manifest = self.manifest()
            manifest["status"] = "running" if manifest.get("status") != "complete" else "complete"
        else:
            manifest = {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "hash": self.hash,
                "status": "running",
                "config": dict(config),
                "hashed_settings": dict(hashed),
                "versions": library_versions(),
            }
        if extra:
            manifest.update(extra)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_path, manifest)

    def update(self, **fields: Any) -> None:
        """Set fields of the manifest (e.g. status='complete')."""
        manifest = self.manifest()
        manifest.update(fields)
        write_json(self.manifest_path, manifest)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


def iter_runs(root: str | Path, kind: str | None = None) -> Iterable[RunDir]:
    """Every run directory under ``root`` (optionally of one kind)."""
    root = Path(root)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if (child / "manifest.json").is_file() and "_" in child.name:
            k, h = child.name.rsplit("_", 1)
            if kind is None or k == kind:
                yield RunDir(root, k, h)
