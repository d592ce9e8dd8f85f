"""One writer per run directory, safe across processes and hosts on a shared filesystem.

Protocol: a run is claimed by creating ``<run>/.lock`` with ``O_CREAT | O_EXCL`` (atomic even on
NFS v3+), written once with ``{"pid", "host", "started", "token"}``. While held, a daemon thread
touches the file's mtime every ``stale_after / 4`` seconds. Anyone who finds the file may break it
only if it is stale: same host and the pid is gone, or mtime older than ``stale_after`` (holder
died elsewhere), or unreadable and older than a short grace period (crash between create and
write). Breakers take turns through ``.lock.breaking`` (O_EXCL); the one holding it checks the lock is
still the one it judged stale, renames it to a unique ``.lock.stale.<uuid>`` name, deletes it, and
retries the create.
Release deletes the file only if its token is still ours. No fcntl/flock, sockets or servers.
Within a process claims are re-entrant (keyed by resolved path, shared across threads).
Mtime staleness compares the file server's clock with ours, so keep ``stale_after`` well above
any clock skew between hosts.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import StabilityError
from .ranks import is_writer
from .schema import LOCK

LOCK_NAME = LOCK
_GRACE = 2.0  # seconds an empty or unparseable lock file is given before it counts as stale
_HOST = socket.gethostname()


class RunLocked(StabilityError):
    """Another process holds the run directory and we may not (or no longer) wait for it."""

    def __init__(self, run_path: Path, info: dict[str, Any], waited: float | None = None) -> None:
        self.run_path, self.info, self.waited = Path(run_path), dict(info), waited
        lock = self.run_path / LOCK_NAME
        who = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
               f"since {info.get('started', '?')}")
        after = f" (gave up after waiting {waited:.1f}s)" if waited else ""
        super().__init__(
            f"run directory {self.run_path} is held by {who}{after}; wait for it to finish "
            f"(claim again with a longer wait), or, if that process is gone, delete {lock}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.run_path, self.info, self.waited)


class _Held:
    """A claim this process holds: its lock info, nesting count and heartbeat thread."""

    def __init__(self, lock: Path, info: dict[str, Any], every: float) -> None:
        self.info, self.count, self.stop = info, 1, threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(lock, every), daemon=True,
                                       name=f"runlock-heartbeat {lock.parent.name}")
        self.thread.start()

    def _beat(self, lock: Path, every: float) -> None:
        while not self.stop.wait(every):
            try:
                os.utime(lock)
            except OSError:
                pass


class _Seen(NamedTuple):  # a look at a lock file
    info: dict[str, Any] | None  # None: empty or unparseable
    age: float  # seconds since the last heartbeat (mtime)
    ident: tuple[int, int, str | None]  # (st_dev, st_ino, token): which file we judged


_mutex = threading.Lock()
_held: dict[Path, _Held] = {}


def _after_fork() -> None:  # a forked child holds nothing, whatever its parent held
    global _mutex
    _mutex = threading.Lock()
    _held.clear()


os.register_at_fork(after_in_child=_after_fork)


def _inspect(lock: Path) -> _Seen | None:
    """The lock file's content, age and identity, or None if there is no lock file."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    info = info if isinstance(info, dict) else None
    token = info.get("token") if info else None
    return _Seen(info, time.time() - st.st_mtime, (st.st_dev, st.st_ino, token))


def holder(run_path: Path) -> dict[str, Any] | None:
    """The current lock info of ``run_path`` ({} if unreadable), or None if it is not claimed."""
    seen = _inspect(Path(run_path) / LOCK_NAME)
    return None if seen is None else (seen.info or {})


def live_holder(run_path: Path, stale_after: float = 120.0) -> dict[str, Any] | None:
    """The lock info of ``run_path`` when a live process holds it; None when unclaimed or the lock is stale."""
    key = Path(run_path).resolve()
    with _mutex:
        if key in _held:
            return dict(_held[key].info)
        seen = _inspect(key / LOCK_NAME)
        if seen is None or _is_stale(seen, stale_after):
            return None
        return seen.info or {}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to someone else
        return True
    return True


def _is_stale(seen: _Seen, stale_after: float) -> bool:
    info = seen.info
    if info is None or not isinstance(info.get("pid"), int):
        return seen.age > _GRACE
    if seen.age > stale_after:
        return True
    if info.get("host") != _HOST:
        return False
    # Called under _mutex with the path absent from _held, so a lock naming our own pid is a
    # leftover of an earlier process that had the same pid (e.g. a restarted container).
    return info["pid"] == os.getpid() or not _alive(info["pid"])


def _break(lock: Path, seen: _Seen) -> None:
    """Move aside the stale lock ``seen``; one breaker at a time, or nothing when another is at work.

    Breakers take turns through ``.lock.breaking`` (created with O_EXCL). Under it the stale lock cannot
    change: its holder is gone and no other breaker acts, so the one checked is the one moved. Without it,
    a breaker that moved a live claimer's fresh lock by mistake could not always put it back (a third
    process may create the lock in between), and two processes would then both hold the run.
    """
    guard = lock.with_name(f"{LOCK_NAME}.breaking")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _GRACE:  # a breaker died between create and unlink
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.005)  # let the other breaker finish before the caller looks again
        return  # the caller loops: it finds the lock gone, broken by the other, or still there
    os.close(fd)
    try:
        now = _inspect(lock)
        if now is None or now.ident != seen.ident:
            return  # released, or already broken and claimed anew: not the lock judged stale
        aside = lock.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex}")
        os.rename(lock, aside)
        aside.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _try_create(lock: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    except FileNotFoundError:  # the previous holder removed the run directory it had created, unused
        lock.parent.mkdir(parents=True, exist_ok=True)
        return None  # the caller's loop tries again at once
    info = {"pid": os.getpid(), "host": _HOST, "token": uuid.uuid4().hex,
            "started": datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return info


def _release(key: Path) -> None:
    with _mutex:
        entry = _held[key]
        entry.count -= 1
        if entry.count:
            return
        del _held[key]
        entry.stop.set()
        entry.thread.join()
        lock = key / LOCK_NAME
        seen = _inspect(lock)
        if seen is not None and seen.info and seen.info.get("token") == entry.info["token"]:
            lock.unlink(missing_ok=True)


@contextmanager
def claim(run_path: Path, *, wait: float | None = None, poll: float = 0.2,
          stale_after: float = 120.0,
          on_wait: Callable[[dict[str, Any]], None] | None = None) -> Iterator[dict[str, Any]]:
    """Hold ``run_path`` for the ``with`` block; yields the lock info (pid, host, started, token).

    ``wait=None`` waits forever, ``wait=0`` raises :class:`RunLocked` at once if the run is held,
    otherwise waits at most ``wait`` seconds. ``on_wait(holder_info)`` is called once, when we
    start waiting.
    """
    run_path = Path(run_path)
    if not is_writer():
        yield {}  # a data-parallel run's ranks > 0 follow rank 0, which holds the lock; they write nothing
        return
    run_path.mkdir(parents=True, exist_ok=True)
    key = run_path.resolve()
    lock = key / LOCK_NAME
    t0 = time.monotonic()
    waiting = False
    while True:
        with _mutex:
            entry = _held.get(key)
            if entry is not None:
                entry.count += 1
                break
            info = _try_create(lock)
            if info is not None:
                entry = _held[key] = _Held(lock, info, stale_after / 4)
                break
            seen = _inspect(lock)
            if seen is None:
                continue  # released meanwhile: retry at once
            if _is_stale(seen, stale_after):
                _break(lock, seen)
                continue
        current = seen.info or {}
        elapsed = time.monotonic() - t0
        if wait is not None and elapsed >= wait:
            raise RunLocked(key, current, waited=elapsed if waiting else None)
        if not waiting:
            waiting = True
            if on_wait is not None:
                on_wait(current)
        time.sleep(poll if wait is None else max(0.0, min(poll, wait - elapsed)))
    try:
        yield entry.info
    finally:
        _release(key)
