"""The run store: one directory per run, named by a settings hash, written atomically.

Records are files a person can open: JSON for settings and summaries, CSV for
tables, safetensors for tensors (loading a checkpoint never executes code).
Every write goes to a temporary file in the same directory and is renamed into
place, so a killed process leaves the old file or the new one, never half.
"""
from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import CheckpointError, RecordError, StabilityError
from .ranks import is_writer, sync_ranks
from .schema import MANIFEST

# Bumped when the layout of a run directory changes incompatibly.
FORMAT_VERSION = 1
_ORDER_KEY = "__tensor_order__"
_DIGEST_KEY = "__sha256__"  # of every tensor's name, dtype, shape and bytes, recorded when the file is written


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (on rank 0 only of a data-parallel run)."""
    if not is_writer():
        return
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
    """Read a JSON file; an unreadable one raises RecordError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"record {str(path)!r} is truncated or corrupt: {exc}") from None


def read_record(path: str | Path) -> Any | None:
    """A JSON record, or None when it is missing or damaged (a damaged one is moved aside, with a warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except RecordError as exc:
        quarantine(path, str(exc))
        return None


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
    """Read a CSV written by ``write_csv`` back into dicts with numbers parsed; a damaged one raises RecordError."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            raw = list(reader)
            header = reader.fieldnames
    except (csv.Error, UnicodeDecodeError) as exc:
        raise RecordError(f"record {str(path)!r} is corrupt: {exc}") from None
    if header is None or any(None in row or None in row.values() for row in raw):
        raise RecordError(f"record {str(path)!r} is truncated or corrupt (empty, or rows with missing or extra cells)")
    return [{k: _parse_number(v) for k, v in row.items()} for row in raw]


def _parse_number(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def short_digest(tensors: Mapping[str, torch.Tensor] | None) -> str | None:
    """What names a run by tensor contents: the first 16 hex digits of ``tensors_digest`` (None for None)."""
    return None if tensors is None else tensors_digest(tensors)[:16]


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> None:
    """Atomically save tensors as safetensors, with their digest; metadata values are stored as JSON strings."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    # safetensors stores tensors in its own order; keep ours so a round trip gives the same dict order
    # (mask and parameter order decides e.g. which random draws go to which tensor).
    meta[_ORDER_KEY] = json.dumps(list(plain))
    meta[_DIGEST_KEY] = json.dumps(tensors_digest(plain))
    atomic_write_bytes(path, st_save(plain, metadata=meta))


def tensors_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a safetensors file from its header alone (no tensor read, no digest check)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        return {k: json.loads(v) for k, v in (header.get("__metadata__") or {}).items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: {exc}") from None


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its JSON metadata, checking the digest recorded when it was written.

    A missing, truncated or damaged file, or one whose tensors do not match their digest, raises
    CheckpointError naming the path. (Files written before digests were recorded load unchecked.)
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        raw_meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except (SafetensorError, ValueError, OSError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: {exc}") from None
    recorded = meta.pop(_DIGEST_KEY, None)
    if recorded is not None and recorded != tensors_digest(tensors):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its tensors do not match the SHA-256 digest "
                              "recorded when it was written")
    order = meta.pop(_ORDER_KEY, None)
    if order is not None and set(order) == set(tensors):
        tensors = {k: tensors[k] for k in order}
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def quarantine(path: str | Path, reason: str) -> Path:
    """Move a damaged file aside (``<name>.corrupt``) so it is never used again, and say so on stderr."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    if not is_writer():
        return target
    os.replace(path, target)
    print(f"warning: {reason}; moved it to {target.name} and will recompute it", file=sys.stderr)
    return target


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left behind (``.<name>.<random>.tmp``) under ``folder``."""
    removed = []
    for tmp in Path(folder).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the suite's source when it runs from a git checkout ("+dirty" with local changes)."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                "stability"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def library_versions() -> dict[str, str]:
    """Versions of the code that shapes results, for manifests: the suite (and its commit), torch, numpy."""
    import numpy

    from .._version import __version__

    out = {
        "stability": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    commit = source_commit()
    if commit:
        out["commit"] = commit
    return out


def producer_differs(recorded: Mapping[str, Any] | None) -> str | None:
    """How the code that made a record differs from this one (suite version or commit), or None."""
    recorded = recorded or {}
    current = library_versions()
    diffs = []
    for key in ("stability", "commit"):
        theirs, ours = recorded.get(key), current.get(key)
        if theirs is not None and ours is not None and theirs != ours:
            diffs.append(f"{key} {theirs} (this is {ours})")
    if recorded and "stability" not in recorded:
        diffs.append("an unknown version")
    return ", ".join(diffs) or None


class RunDir:
    """A run's directory: ``root/<kind>_<hash>/`` with ``manifest.json``."""

    def __init__(self, root: str | Path, kind: str, run_hash: str):
        self.root = Path(root)
        self.kind = kind
        self.hash = run_hash
        self.path = self.root / f"{kind}_{run_hash}"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        """The manifest, checked for a compatible format version (RecordError when it is damaged)."""
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict):
            raise RecordError(f"record {str(self.manifest_path)!r} is corrupt: not a JSON object")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StabilityError(
                f"run directory {str(self.path)!r} was written by an incompatible version of the suite "
                f"(format_version {version!r}, this version reads {FORMAT_VERSION}); "
                "move it away or use a different runtime.results_root"
            )
        return manifest

    def status(self) -> str | None:
        """``running``, ``complete``, ``diverged``, or None (no manifest, or a damaged one)."""
        if not self.exists():
            return None
        try:
            return self.manifest().get("status")
        except RecordError:
            return None

    def is_complete(self) -> bool:
        return self.status() == "complete"

    def start(self, config: Mapping[str, Any], hashed: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Create the directory and write (or refresh) a 'running' manifest.

        A damaged manifest is rebuilt (with a warning); temporary files a killed writer left are removed.
        """
        manifest = None
        if self.exists():
            try:
                manifest = self.manifest()
            except RecordError as exc:
                print(f"warning: {exc}; rebuilding it (the run's other records are checked as they are read)",
                      file=sys.stderr)
        if manifest is not None:
            manifest["status"] = "running"  # until the caller's final update: a kill mid-repair is not "complete"
            current = library_versions()
            if manifest.get("versions") != current:  # resumed or repaired by other code: keep both
                manifest.setdefault("earlier_versions", []).append(manifest.get("versions"))
                manifest["versions"] = current
            manifest["config"] = dict(config)
            manifest["hashed_settings"] = dict(hashed)
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
        if is_writer():
            self.path.mkdir(parents=True, exist_ok=True)
            remove_orphans(self.path)
        write_json(self.manifest_path, manifest)

    def update(self, **fields: Any) -> None:
        """Set fields of the manifest (e.g. status='complete')."""
        if is_writer():
            manifest = self.manifest()
            manifest.update(fields)
            write_json(self.manifest_path, manifest)
        if "status" in fields:
            sync_ranks()  # a data-parallel run's other ranks read the status rank 0 wrote

    def check_reuse(self, accept_other_versions: bool = True) -> None:
        """Before reusing a finished result: say so when other code made it, or refuse when asked to."""
        try:
            versions = self.manifest().get("versions")
        except RecordError:
            return
        differs = producer_differs(versions)
        if differs is None:
            return
        if not accept_other_versions:
            raise StabilityError(f"run {str(self.path)!r} was made by {differs}; runtime.accept_other_versions = "
                                 "false refuses it: move the run directory away to recompute it, or allow reuse")
        print(f"note: reusing {self.path.name}, made by {differs} "
              "(set runtime.accept_other_versions=false to refuse)", file=sys.stderr)

    def claim(self, wait: float | None = None):
        """Hold this run directory for one writer (a lock file with pid and host; see ``runlock``).

        Another process computing the same run makes this wait (saying so) until it is done; the
        caller then finds its finished result. Leaves no directory behind if nothing was written.
        """
        return _Claim(self, wait)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


class PointTable:
    """The rows of a stage measured point by point (rewind steps, training steps, alphas).

    Rows of points finished by an earlier (complete or interrupted) run of the same settings are
    read back; each newly measured point is written at once, so a rerun resumes after the last
    finished point. A damaged file is moved aside (with a warning) and its points measured again.
    """

    def __init__(self, path: str | Path, key: str, columns: Sequence[str] | None = None,
                 required: Sequence[str] = ()):
        self.path, self.key, self.columns = Path(path), key, list(columns) if columns else None
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                rows = read_csv(self.path)
                missing = [c for c in required if rows and c not in rows[0]]
                if missing:
                    raise RecordError(f"record {str(self.path)!r} lacks columns {missing}")
                self.rows = rows
            except RecordError as exc:
                quarantine(self.path, str(exc))

    def done(self, point: Any) -> list[dict[str, Any]]:
        """The stored rows of ``point`` (empty when it still has to be measured)."""
        return [r for r in self.rows if r[self.key] == point]

    def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append one point's rows and write the table."""
        self.rows.extend(dict(r) for r in rows)
        self.write()

    def drop(self, point: Any) -> None:
        """Forget the rows of ``point`` (e.g. what a killed measurement of it left)."""
        self.rows = [r for r in self.rows if r[self.key] != point]

    def keep(self, points: Sequence[Any]) -> None:
        """Drop rows of points not in ``points`` and order the rest as ``points`` are."""
        order = {p: i for i, p in enumerate(points)}
        self.rows = sorted((r for r in self.rows if r[self.key] in order), key=lambda r: order[r[self.key]])

    def write(self) -> None:
        write_csv(self.path, self.rows, self.columns)


class _Claim:
    def __init__(self, run: RunDir, wait: float | None):
        self.run, self.wait, self.inner = run, wait, None
        self.created = False

    def __enter__(self) -> RunDir:
        from .lock import claim

        self.created = not self.run.path.exists()
        path = self.run.path

        def on_wait(holder: Mapping[str, Any]) -> None:
            print(f"waiting: run {path.name} is being computed by pid {holder.get('pid')} on host "
                  f"{holder.get('host')} (since {holder.get('started')}); its result will be reused", file=sys.stderr)

        self.inner = claim(path, wait=self.wait, on_wait=on_wait)
        self.inner.__enter__()
        return self.run

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)
        if self.created and self.run.path.is_dir() and not any(self.run.path.iterdir()):
            try:
                self.run.path.rmdir()  # nothing was written: leave no trace
            except OSError as error:  # a waiting process has just put its own lock there: keep the folder
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise


def read_table(run: RunDir, name: str, columns: Collection[str]) -> list[dict[str, Any]] | None:
    """The CSV record ``name`` of a run, or None when it is missing or damaged (a damaged one is moved aside)."""
    path = run / name
    if not path.is_file():
        return None
    try:
        rows = read_csv(path)
        if rows and not set(columns) <= set(rows[0]):
            raise RecordError(f"record {str(path)!r} lacks columns {sorted(set(columns) - set(rows[0]))}")
        return rows
    except RecordError as exc:
        quarantine(path, str(exc))
        return None
