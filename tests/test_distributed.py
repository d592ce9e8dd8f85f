"""Data-parallel runs (``runtime.distributed``): 2 gloo processes on this CPU, started by ``torch.distributed.run``
and bound to loopback, against the one-process run of the same settings.

Each rank runs ``tests/workers/ddp_rank.py``, which makes any write by a rank > 0 under the results root an
error (only rank 0 writes the run store) and can kill rank 0 after its n-th rolling state.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stability.apps.cli import main
from stability.engine import distributed
from stability.errors import ConfigError
from stability.stages.checkpoints import load_weights
from stability.store.files import load_tensors, read_csv

WORKER = Path(__file__).parent / "workers" / "ddp_rank.py"
ARGS = ["train", "--preset", "lenet300_mnist5k", "--set=model.width=0.1", "--set=training.steps=30it",
        "--set=training.batch_size=32", "--set=training.eval_every=10it", "--set=training.checkpoint_every=5it",
        "--set=training.rewind_points=10it", "--threads", "1", "--quiet"]
LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, *extra: str, processes: int = 2, stop_after_states: int = 0,
           own_group: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node processes`` of the worker, on 127.0.0.1 only."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "STABILITY_DIST_TIMEOUT": "120", "STOP_AFTER_STATES": str(stop_after_states),
           "OWN_GROUP": "1" if own_group else "0"}
    asked = [] if own_group else ["--set=runtime.distributed=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), str(root), *ARGS,
           "--out", str(root), *asked, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False)


def one_process(root: Path) -> Path:
    assert main([*ARGS, "--out", str(root)]) == 0
    return next(root.glob("train_*"))


def close(a: dict, b: dict, atol: float = 1e-6) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < atol, f"weights differ by {worst}"
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return one_process(tmp_path_factory.mktemp("one"))


def test_two_gloo_processes_train_the_one_process_weights(reference, tmp_path):
    done = launch(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list(tmp_path.glob("train_*"))
    assert [r.name for r in runs] == [reference.name]  # the world size does not name the run
    for step in (0, 10, 30):
        close(load_weights(reference, step), load_weights(runs[0], step))
    ref_rows, rows = read_csv(reference / "metrics.csv"), read_csv(runs[0] / "metrics.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for r, q in zip(ref_rows, rows):
        assert abs(r["test_loss"] - q["test_loss"]) < 1e-5 and abs(r["train_loss"] - q["train_loss"]) < 1e-5
    assert json.loads((runs[0] / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_killed_distributed_run_resumes_under_one_process_and_under_two(reference, tmp_path):
    for resume_with in (1, 2):
        root = tmp_path / f"resumed_by_{resume_with}"
        killed = launch(root, stop_after_states=2)
        assert killed.returncode != 0
        state = next(root.glob("train_*/state/latest.safetensors"))
        assert load_tensors(state)[1]["step"] == 10  # killed after the rolling state of step 10
        if resume_with == 1:
            run = one_process(root)
        else:
            done = launch(root)
            assert done.returncode == 0, done.stderr[-3000:]
            run = next(root.glob("train_*"))
        close(load_weights(reference, 30), load_weights(run, 30))


def test_a_users_own_process_group_leaves_a_suite_run_on_one_rank_alone(reference, tmp_path):
    """A script that started its own process group (as Lightning's DDP does) and runs the suite on rank 1 only,
    without runtime.distributed: the run is an ordinary one-process run that writes its records (no waiting for
    the other rank, no rank-0-only writing)."""
    done = launch(tmp_path, own_group=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next(tmp_path.glob("train_*"))
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    assert all(torch.equal(a, b) for a, b in zip(load_weights(reference, 30).values(), load_weights(run, 30).values()))


def test_world_size_that_does_not_divide_the_batch_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "runs"
    assert main([*ARGS, "--out", str(out), "--set=runtime.distributed=true"]) == 2  # 32 among 3 ranks
    err = capsys.readouterr().err
    assert "training.batch_size" in err and "3 ranks" in err
    assert not out.exists() and not distributed.active()


def test_distributed_outside_a_launcher_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "runs"
    assert main([*ARGS, "--out", str(out), "--set=runtime.distributed=true"]) == 2
    err = capsys.readouterr().err
    assert "runtime.distributed" in err and "torchrun" in err
    assert not out.exists()


def test_dropout_is_refused_under_distributed(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="model.dropout"):
        distributed.start(True, 32, torch.device("cpu"), dropout=True)


@pytest.mark.slow
def test_a_grid_trains_a_data_parallel_unit_as_a_two_task_submitit_job(reference, tmp_path, monkeypatch):
    """submitit's LocalExecutor runs the trunk unit as a 2-task job; its ranks meet on 127.0.0.1."""
    pytest.importorskip("submitit")
    from stability.grid.plan import load_grid
    from stability.grid.run import run_grid

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("STABILITY_DIST_TIMEOUT", "120")
    grid = tmp_path / "g.toml"
    grid.write_text("""stages = ["instability"]
preset = "lenet300_mnist5k"

[set]
"model.width" = 0.1
"training.steps" = "30it"
"training.batch_size" = 32
"training.eval_every" = "10it"
"training.checkpoint_every" = "5it"
"training.rewind_points" = ["10it"]
"runtime.distributed" = true

[instability]
rewind_points = ["10it"]
siblings = 2
alphas = 3

[resources]
cpus = 1
tasks_per_node = 2
units_per_task = 1
time = 5
""")
    root = tmp_path / "runs"
    result = run_grid(load_grid(grid, {"runtime.results_root": str(root)}), executor="slurm", local=True)
    assert not result.failed, result.outcomes
    run = next(root.glob("train_*"))
    assert run.name == reference.name
    close(load_weights(reference, 30), load_weights(run, 30))
    # the siblings (both members on each rank, each batch split across the ranks) and their curves equal the
    # one-process grid's
    alone, one = tmp_path / "alone", tmp_path / "one.toml"
    one.write_text(grid.read_text().replace("tasks_per_node = 2", "tasks_per_node = 1"))
    assert not run_grid(load_grid(one, {"runtime.results_root": str(alone), "runtime.distributed": "false"})).failed
    for name in ("siblings_*/final.safetensors", "instability_*/curves.csv"):
        ours, theirs = next(root.glob(name)), next(alone.glob(name))
        assert ours.relative_to(root) == theirs.relative_to(alone)
        if name.endswith(".csv"):
            for a, b in zip(read_csv(ours), read_csv(theirs), strict=True):
                assert all(abs(a[k] - b[k]) < 1e-5 for k in a if isinstance(a[k], float)), (a, b)
        else:
            close(load_tensors(theirs)[0], load_tensors(ours)[0])
    logs = "".join(p.read_text() for p in root.rglob("*_1_log.err"))  # the second task ran and said nothing wrong
    assert list(root.rglob("*_1_log.out")), "the job had no second task"
    assert "Traceback" not in logs


def test_a_data_parallel_grid_is_refused_when_its_ranks_do_not_divide_the_batch(tmp_path):
    from stability.grid.plan import load_grid, make_plan

    grid = tmp_path / "g.toml"
    grid.write_text('stages = []\npreset = "lenet300_mnist5k"\n[set]\n"runtime.distributed" = true\n'
                    '"training.batch_size" = 30\n[resources]\ngpus = 4\n')
    with pytest.raises(ConfigError, match="training.batch_size: 30 does not divide among the 4 ranks"):
        make_plan(load_grid(grid, {"runtime.results_root": str(tmp_path / "runs")}))
    assert not (tmp_path / "runs").exists()
