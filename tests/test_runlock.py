"""The run lock: real processes racing for one run directory, stale locks, re-entrancy."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stability.store.lock import LOCK_NAME, RunLocked, claim, holder

ROOT = Path(__file__).resolve().parents[1]

# Waits until an agreed time, claims the run, holds it, and logs "start end" while still holding.
RACER = """
import sys, time
from stability.store.lock import claim
run, log, start_at, hold = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start_at - time.time()))
with claim(run, poll=0.01):
    t0 = time.time()
    time.sleep(hold)
    with open(log, "a") as fh:
        fh.write(f"{t0} {time.time()}\\n")
"""

# Claims the run, says "ready", and holds it until stdin is closed (or for argv[2] seconds).
HOLDER = """
import sys, time
from stability.store.lock import claim
with claim(sys.argv[1], stale_after=float(sys.argv[3])):
    print("ready", flush=True)
    if sys.argv[2] == "stdin":
        sys.stdin.read()
    else:
        time.sleep(float(sys.argv[2]))
"""


def _python(code: str, *args: object, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                            text=True, **kw)


@pytest.fixture
def held(tmp_path):
    """A run directory held by another process until the test ends."""
    run = tmp_path / "run"
    proc = _python(HOLDER, run, "stdin", 120.0, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    yield run, proc
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def _intervals(log: Path) -> list[tuple[float, float]]:
    return sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())


def _assert_serial(log: Path, n: int) -> None:
    spans = _intervals(log)
    assert len(spans) == n
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans


def _race(run: Path, log: Path, n: int, hold: float) -> None:
    start_at = time.time() + 1.0
    procs = [_python(RACER, run, log, start_at, hold) for _ in range(n)]
    assert [p.wait(timeout=30) for p in procs] == [0] * n


def _write_lock(run: Path, **info) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    lock.write_text(json.dumps({"started": "2000-01-01T00:00:00", "token": "x" * 32, **info}))
    return lock


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(LOCK_NAME))


def test_two_processes_take_turns(tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    _race(run, log, 2, 0.5)
    _assert_serial(log, 2)
    assert _leftovers(run) == []


def test_racing_breakers_of_a_stale_lock_still_take_turns(tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    _write_lock(run, pid=_dead_pid(), host=socket.gethostname())
    _race(run, log, 4, 0.15)
    _assert_serial(log, 4)
    assert _leftovers(run) == []


def test_no_wait_names_the_holder(held):
    run, proc = held
    info = holder(run)
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
    with pytest.raises(RunLocked) as exc, claim(run, wait=0):
        pass
    msg = str(exc.value)
    assert str(proc.pid) in msg and socket.gethostname() in msg and str(run) in msg
    assert info["started"] in msg and LOCK_NAME in msg
    assert holder(run) == info  # a failed claim leaves the holder's lock alone


def test_on_wait_is_called_once_then_times_out(held):
    run, proc = held
    calls: list[dict] = []
    t0 = time.monotonic()
    with (pytest.raises(RunLocked, match="waiting"),
          claim(run, wait=0.5, poll=0.05, on_wait=calls.append)):
        pass
    assert 0.5 <= time.monotonic() - t0 < 3
    assert len(calls) == 1 and calls[0]["pid"] == proc.pid
    assert calls[0]["host"] == socket.gethostname()


def test_waits_for_the_holder_to_finish(tmp_path):
    run = tmp_path / "run"
    proc = _python(HOLDER, run, 0.5, 120.0, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    ready = time.monotonic()
    calls: list[dict] = []
    with claim(run, wait=10, poll=0.02, on_wait=calls.append) as info:
        assert time.monotonic() - ready > 0.4  # only once the holder let go
        assert info["pid"] == os.getpid() and holder(run) == info
    assert [c["pid"] for c in calls] == [proc.pid]
    proc.wait(timeout=10)


def test_lock_of_a_dead_pid_on_this_host_is_broken(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, pid=_dead_pid(), host=socket.gethostname())
    with claim(run, wait=0) as info:
        assert info["token"] != "x" * 32 and holder(run) == info
    assert _leftovers(run) == []


def test_old_lock_from_another_host_is_broken(tmp_path):
    run = tmp_path / "run"
    _age(_write_lock(run, pid=1, host="elsewhere.invalid"), 1000)
    with claim(run, wait=0, stale_after=120) as info:
        assert holder(run) == info
    assert _leftovers(run) == []


def test_fresh_lock_from_another_host_is_kept(tmp_path):
    run = tmp_path / "run"
    lock = _write_lock(run, pid=1, host="elsewhere.invalid")
    before = lock.read_text()
    with pytest.raises(RunLocked, match="elsewhere.invalid"), claim(run, wait=0.5, poll=0.05):
        pass
    assert lock.read_text() == before


def test_empty_lock_gets_a_grace_period_then_is_broken(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.touch()
    assert holder(run) == {}
    with pytest.raises(RunLocked), claim(run, wait=0):
        pass
    assert lock.exists()
    _age(lock, 10)
    with claim(run, wait=0) as info:
        assert holder(run) == info


def test_reentrant_in_one_process_and_across_threads(tmp_path):
    run = tmp_path / "a" / "run"  # missing parents are created
    lock = run / LOCK_NAME
    entered, leave = threading.Event(), threading.Event()
    seen: list[dict] = []

    def other_thread() -> None:
        with claim(run, wait=0) as info:
            seen.append(info)
            entered.set()
            leave.wait(10)

    with claim(run, wait=0) as outer:
        with claim(tmp_path / "a" / ".." / "a" / "run", wait=0) as inner:
            assert inner["token"] == outer["token"]
        assert lock.exists() and holder(run) == outer
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert entered.wait(10) and seen[0]["token"] == outer["token"]
    assert holder(run) == outer  # the other thread still holds it
    leave.set()
    thread.join(10)
    assert not lock.exists()


def test_released_after_outermost_exit(tmp_path):
    run = tmp_path / "run"
    with claim(run, wait=0):
        with claim(run, wait=0):
            pass
        assert (run / LOCK_NAME).exists()
    assert _leftovers(run) == []
    with pytest.raises(ZeroDivisionError), claim(run, wait=0):
        raise ZeroDivisionError
    assert _leftovers(run) == []


def test_heartbeat_keeps_a_live_lock_fresh(tmp_path):
    run = tmp_path / "run"
    with claim(run, wait=0, stale_after=0.4):
        lock = run / LOCK_NAME
        _age(lock, 100)
        time.sleep(0.35)
        assert time.time() - lock.stat().st_mtime < 0.3


def test_live_holder_with_short_stale_after_is_not_broken(tmp_path):
    run = tmp_path / "run"
    proc = _python(HOLDER, run, "stdin", 0.4, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # well past stale_after: only the heartbeat keeps it fresh
        with (pytest.raises(RunLocked, match=str(proc.pid)),
              claim(run, wait=0.5, poll=0.05, stale_after=0.4)):
            pass
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0



def test_a_waiter_survives_the_holder_removing_the_directory_it_created(tmp_path):
    """A holder that wrote nothing removes the run directory it created; the waiter then claims it."""
    import subprocess
    import sys

    from stability.store.files import RunDir

    code = ("import time\nfrom stability.store.files import RunDir\n"
            f"with RunDir({str(tmp_path)!r}, 'siblings', 'abc').claim():\n"
            "    print('held', flush=True)\n    time.sleep(1.0)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    run = RunDir(tmp_path, "siblings", "abc")
    with run.claim(wait=30):
        assert run.path.is_dir() and (run.path / ".lock").is_file()
    assert holder.wait(30) == 0
