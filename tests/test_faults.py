"""Fault injection: kills at every file boundary, damaged records, concurrent runs, NaN and chance-level runs.

Run alone with ``pytest tests/test_faults.py``. A "kill" is injected in-process: the store's one
write primitive raises right after its n-th file appears (or leaves a temporary file behind and
raises before the rename), for every n of an uninterrupted run; the rerun must end with the same
weights and records. Real SIGKILLs of the CLI check the same from outside, stale lock included.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARGS, tiny_config

from stability.apps.cli import main
from stability.errors import TrainingDiverged
from stability.maths.sweep import first_stable_step
from stability.stages.context import prepare
from stability.stages.imp import imp_settings, run_imp
from stability.stages.instability import instability_settings, instability_sweep
from stability.stages.trunk import train_trunk, trunk_checkpoint
from stability.store import files as store
from stability.store.files import load_tensors, read_csv, read_json, save_tensors

CLI = [sys.executable, "-m", "stability.apps.cli"]
_REAL_WRITE = store.atomic_write_bytes


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the suite can catch it."""


def count_writes(monkeypatch, fn) -> int:
    """Files an uninterrupted call of ``fn`` writes."""
    real = store.atomic_write_bytes
    n = 0

    def counting(path, data):
        nonlocal n
        real(path, data)
        n += 1

    monkeypatch.setattr(store, "atomic_write_bytes", counting)
    fn()
    monkeypatch.setattr(store, "atomic_write_bytes", real)
    return n


def kill_at_write(monkeypatch, n: int, before_rename: bool = False) -> None:
    """The n-th write (1-based) is the last: the file appears (or only its temporary file does), then a kill."""
    real = store.atomic_write_bytes
    count = 0

    def killing(path, data):
        nonlocal count
        count += 1
        if count == n and before_rename:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.killed.tmp").write_bytes(data[: len(data) // 2])
            raise Killed(str(path))
        real(path, data)
        if count == n:
            raise Killed(str(path))

    monkeypatch.setattr(store, "atomic_write_bytes", killing)


def weight_files(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file under a results root (relative path -> tensors)."""
    return {str(p.relative_to(root)): load_tensors(p)[0] for p in sorted(root.rglob("*.safetensors"))
            if "state" not in p.parts}


def records(root: Path) -> dict[str, list]:
    """Every CSV under a results root (relative path -> rows)."""
    return {str(p.relative_to(root)): read_csv(p) for p in sorted(root.rglob("*.csv"))}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)


def no_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "reused")}


# ---------------------------------------------------------------- kills at every file boundary
def _kill_and_resume(tmp_path, monkeypatch, run, label: str, stride: int = 1):
    ref_root = tmp_path / f"{label}-ref"
    n_writes = count_writes(monkeypatch, lambda: run(ref_root))
    assert n_writes > 5
    reference = (weight_files(ref_root), records(ref_root))
    checked = 0
    for n in range(1, n_writes + 1, stride):
        for before_rename in (False, True):
            root = tmp_path / f"{label}-{n}-{int(before_rename)}"
            kill_at_write(monkeypatch, n, before_rename)
            with pytest.raises(Killed):
                run(root)
            monkeypatch.setattr(store, "atomic_write_bytes", _REAL_WRITE)
            run(root)  # the rerun resumes
            assert same_tensors(weight_files(root), reference[0]), f"weights differ after a kill at write {n}"
            assert records(root) == reference[1], f"records differ after a kill at write {n}"
            assert not list(root.rglob("*.tmp")), "orphaned temporary files were not removed"
            checked += 1
    return n_writes, checked


def test_trunk_killed_at_every_file_boundary_resumes_identically(tmp_path, monkeypatch):
    def run(root):
        result = train_trunk(tiny_config(root))
        return result

    n_writes, checked = _kill_and_resume(tmp_path, monkeypatch, run, "train")
    assert checked == 2 * n_writes
    # summary.json equals the uninterrupted one (but for the time it took)
    ref = read_json(next((tmp_path / "train-ref").glob("train_*/summary.json")))
    for summary in (tmp_path).glob("train-*-*/train_*/summary.json"):
        got = read_json(summary)
        assert no_timing(got) | {"run_dir": ""} == no_timing(ref) | {"run_dir": ""}


@pytest.mark.slow
def test_sweep_killed_at_every_file_boundary_resumes_identically(tmp_path, monkeypatch):
    settings = instability_settings(rewind_points=["5it", "10it"], siblings=2, alphas=4)

    def run(root):
        return instability_sweep(tiny_config(root), settings)

    n_writes, checked = _kill_and_resume(tmp_path, monkeypatch, run, "sweep")
    assert checked == 2 * n_writes


@pytest.mark.slow
def test_imp_killed_at_file_boundaries_resumes_identically(tmp_path, monkeypatch):
    settings = imp_settings(levels=2, baselines=["reinit"], rewind="5it")

    def run(root):
        return run_imp(tiny_config(root), settings)

    n_writes, checked = _kill_and_resume(tmp_path, monkeypatch, run, "imp", stride=3)
    assert checked >= 2 * (n_writes // 3)


def _wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(path_glob.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {pattern} appeared: {proc.stderr.read()}")
        time.sleep(0.002)
    raise AssertionError(f"{pattern} did not appear")


@pytest.mark.slow
def test_sigkill_when_a_checkpoint_appears_then_rerun_gives_the_uninterrupted_records(tmp_path):
    """The issue's recipe: kill -9 the moment checkpoints/step_k appears (a real process, its lock left behind)."""
    args = ["train", "--preset", "lenet300_mnist5k", "--set=model.width=0.25", "--set=training.steps=400it",
            "--set=training.eval_every=20it", "--set=training.checkpoint_every=40it",
            "--set=training.rewind_points=200it", "--quiet", "--threads", "1"]
    ref = tmp_path / "ref"
    subprocess.run(CLI + args + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(CLI + args + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(out, "train_*/checkpoints/step_200.safetensors", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = next(out.glob("train_*"))
    assert (run_dir / ".lock").is_file()  # a killed writer leaves its lock; the rerun finds it stale
    done = subprocess.run(CLI + args + ["--out", str(out), "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    ref_dir = next(ref.glob("train_*"))
    assert read_csv(run_dir / "metrics.csv") == read_csv(ref_dir / "metrics.csv")
    assert no_timing(summary) | {"run_dir": ""} == no_timing(read_json(ref_dir / "summary.json")) | {"run_dir": ""}
    assert same_tensors(weight_files(out), weight_files(ref))


# ---------------------------------------------------------------- damaged records
def _flip(path: Path, offset_from_end: int = 200, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = max(len(data) - offset_from_end, 0)
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flip64", "truncate"])
@pytest.mark.parametrize("target", ["trunk_rewind", "trunk_step0", "trunk_final", "siblings_final", "curves",
                                    "manifest", "metrics"])
def test_damaged_records_are_detected_and_recomputed_never_used(tmp_path, capsys, damage, target):
    cfg = tiny_config(tmp_path / "runs")
    settings = instability_settings(rewind_points=["5it", "10it"], siblings=2, alphas=4)
    clean = instability_sweep(cfg, settings)
    reference = (weight_files(tmp_path / "runs"), clean.table)
    trunk = next((tmp_path / "runs").glob("train_*"))
    sib = Path(clean.summary["siblings"][0]["run_dir"])
    path = {"trunk_rewind": trunk / "checkpoints" / "step_5.safetensors",
            "trunk_step0": trunk / "checkpoints" / "step_0.safetensors",
            "trunk_final": trunk / "checkpoints" / "step_30.safetensors",
            "siblings_final": sib / "final.safetensors",
            "curves": clean.run_dir / "curves.csv",
            "manifest": trunk / "manifest.json",
            "metrics": trunk / "metrics.csv"}[target]
    damage(path)
    # the siblings are trained again from the (replayed) rewind checkpoint when their inputs were damaged
    if target in ("trunk_rewind", "trunk_step0"):
        for s in (tmp_path / "runs").glob("siblings_*"):
            (s / "final.safetensors").unlink()
    capsys.readouterr()
    again = instability_sweep(cfg, settings)
    err = capsys.readouterr().err
    if target not in ("curves",) or damage is _truncate:
        assert str(path.name) in err  # reported, with its path
    assert again.table == reference[1] or _same_table(again.table, reference[1])
    got = {k: v for k, v in weight_files(tmp_path / "runs").items()}
    assert same_tensors(got, reference[0])


def _same_table(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k])
                                                      and math.isnan(y[k])) for k in x) for x, y in zip(a, b))


def test_flipped_bytes_in_a_checkpoint_are_caught_by_its_digest(tmp_path):
    cfg = tiny_config(tmp_path)
    trunk = train_trunk(cfg)
    path = trunk.run_dir / "checkpoints" / "step_10.safetensors"
    intact = load_tensors(path)[0]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight: safetensors itself cannot notice
    path.write_bytes(bytes(data))
    with pytest.raises(store.CheckpointError, match="digest"):
        load_tensors(path)
    members = trunk_checkpoint(prepare(cfg), 10)  # replayed from step 5, never the damaged file
    assert all(torch.equal(members.to_tensors()[0][k], intact[k]) for k in intact if k.startswith("param/"))
    assert (path.parent / "step_10.safetensors.corrupt").is_file()


def test_finished_trunk_with_a_truncated_checkpoint_is_repaired_not_already_complete(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    trunk = train_trunk(cfg)
    path = trunk.run_dir / "checkpoints" / "step_30.safetensors"
    intact = load_tensors(path)[0]
    _truncate(path)
    capsys.readouterr()
    train_trunk(cfg)
    assert "step_30.safetensors" in capsys.readouterr().err
    assert all(torch.equal(load_tensors(path)[0][k], v) for k, v in intact.items())


def test_missing_step0_empty_manifest_and_missing_metrics_are_recovered(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    ref = train_trunk(cfg)
    ref_weights, ref_rows = weight_files(tmp_path), read_csv(ref.run_dir / "metrics.csv")
    (ref.run_dir / "checkpoints" / "step_0.safetensors").unlink()
    (ref.run_dir / "manifest.json").write_text("")
    (ref.run_dir / "metrics.csv").unlink()
    capsys.readouterr()
    again = train_trunk(cfg)
    err = capsys.readouterr().err
    assert "manifest.json" in err
    assert read_csv(again.run_dir / "metrics.csv") == ref_rows
    assert same_tensors(weight_files(tmp_path), ref_weights)
    assert read_json(again.run_dir / "manifest.json")["status"] == "complete"


def test_finished_imp_without_imp_json_or_with_a_damaged_level_record_is_rebuilt(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    settings = imp_settings(levels=2, rewind="5it")
    ref = run_imp(cfg, settings)
    (ref.run_dir / "imp.json").unlink()
    record = ref.run_dir / "replicate_0" / "level_2" / "record.json"
    record.write_text(record.read_text()[:20])
    mask = ref.run_dir / "masks" / "replicate_0_level_1.safetensors"
    _flip(mask, 30, 8)
    capsys.readouterr()
    again = run_imp(cfg, settings)
    err = capsys.readouterr().err
    assert "imp.json" in err and "level 1" in err and "level 2" in err
    assert again.levels == ref.levels
    assert no_timing(again.summary) == no_timing(ref.summary)


def test_stale_running_status_with_a_broken_latest_state_resumes_automatically(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    ref = train_trunk(cfg)
    ref_weights = weight_files(tmp_path)
    run_dir = ref.run_dir
    manifest = read_json(run_dir / "manifest.json")
    manifest["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "summary.json").unlink()
    for step in (10, 30):
        (run_dir / "checkpoints" / f"step_{step}.safetensors").unlink()
    latest = run_dir / "state" / "latest.safetensors"
    latest.parent.mkdir(exist_ok=True)
    latest.write_bytes(b"\x00" * 50)
    capsys.readouterr()
    again = train_trunk(cfg)
    assert "latest.safetensors" in capsys.readouterr().err
    assert same_tensors(weight_files(tmp_path), ref_weights)
    assert read_csv(again.run_dir / "metrics.csv") == read_csv(run_dir / "metrics.csv")


# ---------------------------------------------------------------- one writer per run
def test_two_identical_commands_started_together_train_once(tmp_path):
    args = ["train", "--preset", "lenet300_mnist5k", "--set=model.width=0.25", "--set=training.steps=300it",
            "--set=training.rewind_points=100it", "--quiet", "--threads", "1", "--out", str(tmp_path), "--json"]
    procs = [subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    summaries = [json.loads(o[0]) for o in outs]
    assert sorted(s["reused"] for s in summaries) == [False, True]  # one trained, the other reused its result
    waited = next(o[1] for o, s in zip(outs, summaries) if s["reused"])
    assert "waiting: run train_" in waited and "pid" in waited
    assert summaries[0]["final_test_accuracy"] == summaries[1]["final_test_accuracy"]
    assert not list(tmp_path.glob("train_*/.lock"))


# ---------------------------------------------------------------- NaN and chance-level runs
DIVERGE = ["--set=optimizer.name=sgd", "--set=optimizer.lr=1000", "--set=model.width=1.0"]  # NaN at step ~3
CHANCE = ["--set=optimizer.name=adam", "--set=optimizer.lr=1000"]


def test_diverged_trunk_is_never_stable_never_matching_and_gets_no_hessian(tmp_path, capsys):
    base = ["--preset", "lenet300_mnist5k", *TINY_ARGS, *DIVERGE, "--out", str(tmp_path), "--quiet"]
    assert main(["train", *base]) == 3
    err = capsys.readouterr().err
    assert "diverged" in err and "step" in err
    manifest = read_json(next(tmp_path.glob("train_*/manifest.json")))
    assert manifest["status"] == "diverged" and manifest["divergence"]["step"] >= 1
    assert not (next(tmp_path.glob("train_*")) / "summary.json").exists()
    assert main(["train", *base]) == 3  # a rerun says so again, without training
    code = main(["instability", *base, "--rewind", "0it,5it", "--alphas", "5"])
    out, err = capsys.readouterr()
    assert code == 3 and "stable" not in out and "diverged" in err
    assert main(["imp", *base, "--levels", "1"]) == 3
    assert "success rate" not in capsys.readouterr().out
    assert main(["hessian", *base, "--at", "5it", "--samples", "50"]) == 3
    assert "LinAlgError" not in capsys.readouterr().err
    assert not list(tmp_path.glob("instability_*")) and not list(tmp_path.glob("imp_*"))


def test_untrained_endpoints_are_flagged_and_never_stable_or_matching(tmp_path, capsys):
    base = ["--preset", "lenet300_mnist5k", *TINY_ARGS, *CHANCE, "--out", str(tmp_path), "--quiet"]
    assert main(["instability", *base, "--rewind", "0it,5it", "--alphas", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["first_stable_step"] is None
    rows = summary["per_split"]["test"]
    assert [r["status"] for r in rows] == ["untrained", "untrained"]
    assert not any(r["stable"] for r in rows)
    assert all(r["instability_mean"] < 0.02 for r in rows)  # barrier ~0: by the formula it would be "stable"
    sweep_dir = next(tmp_path.glob("instability_*"))
    assert {r["flag"] for r in read_csv(sweep_dir / "curves.csv")} == {"untrained"}
    assert {r["status"] for r in read_csv(sweep_dir / "sweep.csv")} == {"untrained"}
    code = main(["instability", *base, "--rewind", "0it,5it", "--alphas", "5"])
    out, err = capsys.readouterr()
    assert code == 0 and "untrained" in out and "did not learn" in err
    assert main(["imp", *base, "--levels", "2", "--rewind", "5it", "--json"]) == 0
    imp = json.loads(capsys.readouterr().out)
    assert imp["tickets"]["success_rate"] == 0.0
    assert imp["tickets"]["aggregate"]["matching_levels"] == []
    assert {f["status"] for f in imp["flagged"]} == {"untrained"}


def test_diverged_siblings_mark_their_point_diverged_and_the_first_stable_step_skips_it(tmp_path):
    cfg = tiny_config(tmp_path)
    ctx = prepare(cfg)
    start = trunk_checkpoint(ctx, 5)
    blown = type(start)(start.step, {k: v * 1e30 for k, v in start.params.items()}, start.buffers,
                        start.order_seeds, start.aug_seeds, start.order_gens, start.aug_gens)
    settings = instability_settings(rewind_points=["5it", "10it"], siblings=2, alphas=4)
    result = instability_sweep(cfg, settings, ctx=ctx, start_states={5: blown, 10: trunk_checkpoint(ctx, 10)},
                               label="blown")
    by_step = {r["rewind_step"]: r for r in result.table}
    assert by_step[5]["status"] == "diverged" and by_step[5]["stable"] is False
    assert math.isnan(by_step[5]["instability_mean"])
    assert by_step[10]["status"] == "ok"
    assert result.summary["diverged"]["5"]["step"] == 5
    assert result.first_stable_step == (10 if by_step[10]["stable"] else None)
    # the siblings run is recorded as diverged, and a rerun raises again without training
    from stability.stages.siblings import SiblingSettings, train_siblings

    with pytest.raises(TrainingDiverged):
        train_siblings(ctx, 5, SiblingSettings(2), start=blown, label="blown@5")


def test_first_stable_step_skips_diverged_points_and_untrained_ones_break_stability():
    steps, values = [0, 10, 20, 30], [0.10, 0.01, float("nan"), 0.01]
    assert first_stable_step(steps, values, 0.02, ["ok", "ok", "diverged", "ok"]) == 10
    assert first_stable_step(steps, values, 0.02, ["ok", "ok", "diverged", "untrained"]) is None
    assert first_stable_step(steps, [0.10, 0.0, 0.01, 0.01], 0.02, ["ok", "untrained", "ok", "ok"]) == 20


def test_a_non_finite_checkpoint_is_never_loaded(tmp_path):
    cfg = tiny_config(tmp_path)
    trunk = train_trunk(cfg)
    path = trunk.run_dir / "checkpoints" / "step_10.safetensors"
    tensors, meta = load_tensors(path)
    name = next(k for k in tensors if k.startswith("param/"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_tensors(path, tensors, meta)  # a valid file (digest and all) holding NaN
    from stability.stages.checkpoints import load_members

    with pytest.raises(store.CheckpointError, match="non-finite"):
        load_members(path, prepare(cfg))


# ---------------------------------------------------------------- which code made a result
def test_manifest_records_the_code_and_reuse_by_another_version_is_noted_or_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    trunk = train_trunk(cfg)
    manifest = read_json(trunk.run_dir / "manifest.json")
    assert manifest["versions"]["stability"]
    if (Path(store.__file__).parents[1] / ".git").exists():
        assert len(manifest["versions"]["commit"].split("+")[0]) == 40
    manifest["versions"]["stability"] = "0.0.1"
    (trunk.run_dir / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train_trunk(cfg).reused
    assert "made by stability 0.0.1" in capsys.readouterr().err
    strict = ["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(tmp_path), "--quiet",
              "--set=runtime.accept_other_versions=false"]
    assert main(strict) == 2
    assert "accept_other_versions" in capsys.readouterr().err


def test_orphaned_temporary_files_are_removed_on_resume(tmp_path):
    cfg = tiny_config(tmp_path)
    trunk = train_trunk(cfg)
    orphan = trunk.run_dir / "checkpoints" / ".step_5.safetensors.abc123.tmp"
    orphan.write_bytes(b"half a file")
    manifest = read_json(trunk.run_dir / "manifest.json")
    manifest["status"] = "running"
    (trunk.run_dir / "manifest.json").write_text(json.dumps(manifest))
    train_trunk(cfg)
    assert not orphan.exists()



def test_a_diverged_imp_level_is_marked_never_matching_and_stops_its_replicate(tmp_path, monkeypatch, capsys):
    import stability.stages.imp.levels as imp_module

    real_branch = imp_module.train_branch

    def branch(ctx, run, start, end_step, **kw):
        if run.hash == "2":  # level 2 starts from blown-up weights: its loss overflows in the real loop
            for v in start.params.values():
                v.mul_(1e30)
        return real_branch(ctx, run, start, end_step, **kw)

    monkeypatch.setattr(imp_module, "train_branch", branch)
    cfg = tiny_config(tmp_path)
    settings = imp_settings(levels=3, rewind="5it", baselines=["reinit"])
    result = run_imp(cfg, settings)
    rows = {(r["level"], r["kind"]): r for r in result.levels}
    assert {rows[(2, k)]["status"] for k in ("imp", "reinit")} == {"diverged"}
    assert math.isnan(rows[(2, "imp")]["final_test_accuracy"])
    assert (3, "imp") not in rows  # the replicate stops at the diverged level
    assert 2 not in result.summary["tickets"]["aggregate"]["matching_levels"]
    assert {(f["level"], f["status"]) for f in result.summary["flagged"]} == {(2, "diverged")}
    # the CLI reads the finished run back and exits 3 (a diverged level is in it)
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(tmp_path), "--quiet",
                 "--levels", "3", "--rewind", "5it", "--baselines", "reinit"])
    assert code == 3 and "diverged" in capsys.readouterr().err


# ---------------------------------------------------------------- regressions found in review
def test_a_damaged_level_final_redoes_that_level_from_the_previous_one_not_from_its_own_mask(tmp_path, capsys):
    from stability.maths.pruning import density

    cfg = tiny_config(tmp_path)
    settings = imp_settings(levels=2, prune_fraction=0.5, rewind="5it")
    first = run_imp(cfg, settings)
    final = first.run_dir / "replicate_0" / "level_1" / "final.safetensors"
    _flip(final, 40, 4)
    (first.run_dir / "imp.json").unlink()
    again = run_imp(cfg, settings)
    assert "level 1 of replicate 0" in capsys.readouterr().err
    assert [(r["level"], r["density"]) for r in again.levels] == [(r["level"], r["density"]) for r in first.levels]
    masks, _ = load_tensors(first.run_dir / "masks" / "replicate_0_level_1.safetensors")
    assert density(masks) == pytest.approx(0.5, abs=0.01)
    assert again.levels == first.levels


def test_a_kill_during_a_repair_never_leaves_a_complete_run_with_partial_records(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    ref = train_trunk(cfg)
    ref_rows = read_csv(ref.run_dir / "metrics.csv")
    (ref.run_dir / "metrics.csv").write_text("step,member\n")  # damaged: the trunk is trained again
    kill_at_write(monkeypatch, 4)
    with pytest.raises(Killed):
        train_trunk(cfg)
    monkeypatch.setattr(store, "atomic_write_bytes", _REAL_WRITE)
    assert read_json(ref.run_dir / "manifest.json")["status"] == "running"
    again = train_trunk(cfg)
    assert not again.reused and read_csv(ref.run_dir / "metrics.csv") == ref_rows
    assert again.summary["final_step"] == 30 and again.final["step"] == 30


def test_a_damaged_instability_json_is_moved_aside_and_rewritten(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    settings = instability_settings(rewind_points=["5it"], siblings=2, alphas=3)
    first = instability_sweep(cfg, settings)
    path = first.run_dir / "instability.json"
    _truncate(path)
    again = instability_sweep(cfg, settings)
    assert "instability.json" in capsys.readouterr().err and (path.parent / "instability.json.corrupt").is_file()
    assert read_json(path)["first_stable_step"] == first.first_stable_step and again.table == first.table


def test_a_replicate_that_diverged_counts_as_a_failure_in_the_aggregate_not_as_missing():
    import pandas as pd

    from stability.maths.metrics import ticket_summary

    rows = [(0, 0, 1.0, 0.97), (0, 1, 0.8, 0.972), (0, 2, 0.64, float("nan")),
            (1, 0, 1.0, 0.97), (1, 1, 0.8, 0.975), (1, 2, 0.64, 0.975)]
    frame = pd.DataFrame([{"replicate": r, "level": lv, "kind": "imp", "density": d, "test_accuracy": a}
                          for r, lv, d, a in rows])
    summary = ticket_summary(frame)
    assert 2 not in summary["aggregate"]["matching_levels"]  # replicate 0 diverged there
    assert summary["aggregate"]["sparsest_matching"]["level"] == 1
