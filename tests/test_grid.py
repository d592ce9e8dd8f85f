"""Grids on the real engines: the local executor, a real local Ray cluster, submitit's local executor.

The Ray cluster is started as a user would (``ray start --head``), bound to 127.0.0.1 with 2 CPUs,
no dashboard and a small object store, and stopped in teardown. Results must be bit-identical to
the local executor's, also when a Ray worker is killed while its unit runs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stability.apps.cli import main
from stability.grid.plan import load_grid, make_plan
from stability.grid.run import run_grid
from stability.grid.status import grid_status
from stability.store.files import load_tensors, read_csv

GRID = """
preset = "lenet300_mnist5k"
stages = {stages}

[set]
"model.width" = {width}
"training.steps" = "{steps}"
"training.batch_size" = 32
"training.eval_every" = "10it"
"training.checkpoint_every" = "{every}"

[axes]
{axes}

[instability]
rewind_points = {rewind}
siblings = 2
alphas = 4

[imp]
levels = 1
rewind = "5it"

[resources]
cpus = 1
units_per_task = 3
"""


def write_grid(path: Path, *, stages='["instability"]', width=0.1, steps="30it", every="5it",
               axes='"optimizer.lr" = [0.0012, 0.003]', rewind='["0it", "5it"]') -> Path:
    path.write_text(GRID.format(stages=stages, width=width, steps=steps, every=every, axes=axes, rewind=rewind))
    return path


def results(root: Path) -> tuple[dict, dict]:
    """Every weight file and every CSV of a results root (timings dropped), keyed by relative path."""
    weights = {str(p.relative_to(root)): load_tensors(p)[0] for p in sorted(root.rglob("*.safetensors"))
               if "grids" not in p.parts and "state" not in p.parts}
    tables = {str(p.relative_to(root)): [{k: v for k, v in r.items() if k != "seconds"} for r in read_csv(p)]
              for p in sorted(root.rglob("*.csv")) if "grids" not in p.parts}
    return weights, tables


def assert_same(a: Path, b: Path) -> None:
    wa, ta = results(a)
    wb, tb = results(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for f in wa:
        assert wa[f].keys() == wb[f].keys()
        assert all(torch.equal(wa[f][k], wb[f][k]) for k in wa[f]), f
    assert ta == tb


# ---------------------------------------------------------------- plan and bad input
def test_plan_has_units_with_dependencies_and_reruns_skip_complete_units(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.toml", stages='["instability", "imp"]'),
                     {"runtime.results_root": str(tmp_path / "runs")})
    plan = make_plan(grid)
    kinds = [u.kind for u in plan.units]
    assert kinds.count("train") == 2 and kinds.count("siblings") == 4 and kinds.count("instability") == 2
    assert kinds.count("imp") == 2
    by_id = plan.by_id()
    for unit in plan.units:
        assert all(kinds.index(by_id[d].kind) <= kinds.index(unit.kind) for d in unit.deps)
        if unit.kind == "siblings":
            assert by_id[unit.deps[0]].kind == "train" and unit.iterations > 0
    first = run_grid(grid)
    assert not first.failed and len(first.outcomes) == len(plan.units)
    assert all((tmp_path / "runs" / u.id).is_dir() for u in plan.units)  # units are the store's own runs
    again = run_grid(grid)
    assert again.outcomes == {} and sorted(again.skipped) == sorted(u.id for u in plan.units)
    frame = again.dataframe()
    assert list(frame["optimizer.lr"]) == [0.0012, 0.003] and set(frame["imp_status"]) == {"complete"}


def test_dry_run_prints_the_plan_and_work_and_writes_nothing(tmp_path, capsys):
    path = write_grid(tmp_path / "g.toml")
    assert main(["grid", str(path), "--dry-run", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "siblings" in out and "TFLOPs" in out and "iterations" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("axes, match", [
    ('"optimizer.lrr" = [0.1]', "unknown key 'lrr'"),
    ('"optimizer.lr" = []', "non-empty list"),
    ('"optimizer.lr" = [0.1, -1.0]', "optimizer.lr: must be a positive"),
    ('"model.name" = ["lenet5", "transformer"]', "model.name: unknown model 'transformer'"),
    ('"runtime.threads" = [1, 2]', "runtime settings"),
])
def test_a_bad_axis_exits_2_before_anything_is_submitted(tmp_path, capsys, axes, match):
    path = write_grid(tmp_path / "g.toml", axes=axes)
    assert main(["grid", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stages, axes, match", [
    ('["imp"]', '"training.method" = ["standard", "neq"]', "training.method: neq trains dense networks"),
    ('["imp"]', '"training.method" = ["edgepopup"]', "training.method: IMP prunes trained weights"),
])
def test_a_training_method_a_stage_cannot_use_is_refused_when_planning(tmp_path, capsys, stages, axes, match):
    path = write_grid(tmp_path / "g.toml", stages=stages, axes=axes)
    assert main(["grid", str(path), "--dry-run", "--out", str(tmp_path / "runs")]) == 2
    assert match in capsys.readouterr().err
    assert main(["grid", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_aligning_strong_tickets_is_refused_when_planning(tmp_path, capsys):
    path = write_grid(tmp_path / "g.toml", axes='"training.method" = ["edgepopup"]')
    path.write_text(path.read_text().replace("alphas = 4", 'alphas = 4\nalign = "weights"'))
    assert main(["grid", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert "instability.align: the siblings of a strong ticket" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    # Loopback only (Ray 2.x on Linux uses the machine's interface unless this is set), no memory
    # monitor, no usage reports. Set before Ray is imported in this process: it reads them then.
    # Token authentication with a token of this test's own (Ray 2.5x enables tokens for new local
    # clusters and keeps one in ~/.ray/auth_token; an explicit mode and token make the test
    # independent of whatever a user's home holds).
    import secrets

    settings = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_memory_monitor_refresh_ms": "0",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    env = dict(os.environ)
    port = _free_port()
    subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                    "--object-store-memory", "80000000", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, check=True, capture_output=True, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_ray_executor_gives_the_local_results_bit_for_bit(tmp_path, ray_cluster):
    path = write_grid(tmp_path / "g.toml", stages='["instability", "imp"]')
    local = run_grid(load_grid(path, {"runtime.results_root": str(tmp_path / "local")}))
    on_ray = run_grid(load_grid(path, {"runtime.results_root": str(tmp_path / "ray")}), executor="ray",
                      address=ray_cluster)
    assert not local.failed and not on_ray.failed
    assert {o["status"] for o in on_ray.outcomes.values()} == {"complete"}
    assert {o["pid"] for o in on_ray.outcomes.values()} - {os.getpid()}  # ran in Ray's workers
    assert_same(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried_and_the_result_is_unchanged(tmp_path, ray_cluster):
    path = write_grid(tmp_path / "g.toml", width=0.5, steps="400it", every="20it", axes='"optimizer.lr" = [0.0012]',
                      rewind='["0it"]')
    local = run_grid(load_grid(path, {"runtime.results_root": str(tmp_path / "local")}))
    assert not local.failed
    root = tmp_path / "ray"
    killed = {}

    def kill_a_sibling_worker():
        end = time.monotonic() + 120
        while time.monotonic() < end and not killed:
            for lock in root.glob("siblings_*/.lock"):
                try:
                    info = json.loads(lock.read_text())
                except (OSError, ValueError):
                    continue
                if (lock.parent / "state" / "latest.safetensors").is_file():  # mid-unit, with a state to resume
                    os.kill(info["pid"], signal.SIGKILL)
                    killed.update(info)
                    return
            time.sleep(0.01)

    import threading

    killer = threading.Thread(target=kill_a_sibling_worker)
    killer.start()
    on_ray = run_grid(load_grid(path, {"runtime.results_root": str(root)}), executor="ray", address=ray_cluster)
    killer.join()
    assert killed, "no sibling unit was caught running"
    assert killed["pid"] != os.getpid()
    outcome = next(o for o in on_ray.outcomes.values() if o["kind"] == "siblings")
    assert outcome["status"] == "complete" and outcome["pid"] != killed["pid"]  # retried in another worker
    assert_same(tmp_path / "local", root)


# ---------------------------------------------------------------- Slurm through submitit
@pytest.mark.slow
def test_submitit_executor_results_failures_status_and_rerun(tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_grid(tmp_path / "g.toml")
    local = run_grid(load_grid(path, {"runtime.results_root": str(tmp_path / "local")}))
    assert not local.failed
    root = tmp_path / "slurm"
    grid = load_grid(path, {"runtime.results_root": str(root)})
    plan = make_plan(grid)
    # a unit that cannot run: a plain file sits where its run directory must go
    victim = next(u for u in plan.units if u.kind == "siblings")
    root.mkdir()
    (root / victim.id).write_text("not a directory")
    code = main(["grid", str(path), "--executor", "slurm", "--slurm-local", "--out", str(root)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"failed: {victim.id}: FileExistsError" in err and "rerun the same command" in err
    assert main(["status", str(root), "--json"]) == 0
    units = {u["id"]: u for u in json.loads(capsys.readouterr().out)[0]["units"]}
    assert units[victim.id]["state"] == "failed" and "FileExistsError" in units[victim.id]["error"]
    sweep = next(u for u in plan.units if u.kind == "instability" and victim.id in u.deps)
    assert units[sweep.id]["state"] == "missing"  # blocked by its failed dependency
    assert sum(u["state"] == "complete" for u in units.values()) == len(units) - 2
    assert (root / "grids" / grid.hash / "slurm").is_dir()  # logs on the results root
    (root / victim.id).unlink()
    assert main(["grid", str(path), "--executor", "slurm", "--slurm-local", "--out", str(root)]) == 0
    status = grid_status(root)[0]["units"]
    assert {u["state"] for u in status} == {"complete"}
    assert_same(tmp_path / "local", root)


@pytest.mark.slow
def test_two_grid_commands_on_one_results_root_share_the_work_without_corrupting_it(tmp_path):
    path = write_grid(tmp_path / "g.toml")
    local = run_grid(load_grid(path, {"runtime.results_root": str(tmp_path / "ref")}))
    assert not local.failed
    root = tmp_path / "shared"
    cmd = [sys.executable, "-m", "stability.apps.cli", "grid", str(path), "--out", str(root), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    ran = [set(json.loads(o[0])["outcomes"]) for o in outs]
    plan_ids = {u.id for u in make_plan(load_grid(path, {"runtime.results_root": str(root)})).units}
    assert ran[0] | ran[1] == plan_ids  # every unit ran, some in one process and some in the other
    assert_same(tmp_path / "ref", root)
    assert not list(root.glob("*/.lock"))


def test_the_example_grids_load_and_the_packaged_ones_plan(tmp_path):
    examples = sorted((Path(__file__).resolve().parents[1] / "examples" / "grids").glob("*.toml"))
    assert len(examples) >= 3
    for path in examples:
        grid = load_grid(path, {"runtime.results_root": str(tmp_path)})
        assert grid.points() and grid.stages
        if grid.base.dataset.name == "mnist5k":
            plan = make_plan(grid)
            assert {u.kind for u in plan.units} >= {"train", *grid.stages}


def test_a_sweep_with_no_rewind_points_is_refused_before_anything_runs(tmp_path, capsys):
    path = write_grid(tmp_path / "g.toml", rewind="[]")
    path.write_text(path.read_text().replace("[set]\n", '[set]\n"training.rewind_points" = []\n'))
    assert main(["grid", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert "instability.rewind_points: no rewind points" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_diverged_siblings_do_not_block_their_sweep_which_marks_the_point_diverged(tmp_path):
    grid = load_grid(write_grid(tmp_path / "g.toml", axes='"optimizer.lr" = [0.0012]'),
                     {"runtime.results_root": str(tmp_path / "runs")})
    plan = make_plan(grid)
    assert not run_grid(grid).failed
    sib = next(u for u in plan.units if u.kind == "siblings" and u.args["rewind_step"] == 5)
    sweep = next(u for u in plan.units if u.kind == "instability")
    import shutil

    shutil.rmtree(sweep.run_dir(grid.root).path)
    run = sib.run_dir(grid.root)  # as resumable_train records a divergence
    run.update(status="diverged", divergence={"step": 7, "member": 1, "tensor": "loss", "run_dir": str(run.path),
                                              "message": "training diverged"})
    (run.path / "final.safetensors").unlink()
    again = run_grid(grid)
    assert again.blocked == [] and again.outcomes[sweep.id]["status"] == "complete"
    assert sib.id in again.skipped  # settled: not run again
    table = read_csv(sweep.run_dir(grid.root).path / "sweep.csv")
    assert {r["rewind_step"]: r["status"] for r in table} == {0: "ok", 5: "diverged"}
    states = {u["id"]: u["state"] for u in grid_status(grid.root)[0]["units"]}
    assert states[sib.id] == "diverged" and states[sweep.id] == "complete"
