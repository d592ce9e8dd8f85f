from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY_ARGS, tiny_config

from stability.errors import CheckpointError, ConfigError
from stability.methods import METHODS
from stability.methods.base import Method
from stability.stages.checkpoints import load_weights
from stability.stages.context import prepare
from stability.stages.trunk import train_trunk, trunk_dir
from stability.store.files import load_tensors, read_csv, read_json


def _weights(run_dir, step):
    return load_weights(run_dir, step)


def test_trunk_saves_rewind_points_and_metrics(results_root):
    cfg = tiny_config(results_root)
    result = train_trunk(cfg)
    assert result.checkpoints == [0, 5, 10, 30]
    rows = read_csv(result.run_dir / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert {"train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error"} <= set(rows[0])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["hash"] == cfg.run_hash()
    assert manifest["config"]["optimizer"]["lr"] == cfg.optimizer.lr
    assert "torch" in manifest["versions"]
    # The step-0 checkpoint is the seeded initialization itself.
    ctx = prepare(cfg)
    init = ctx.new_model().state_dict()
    w0 = _weights(result.run_dir, 0)
    assert all(torch.equal(init[k], w0[k]) for k in init)


def test_rerun_of_finished_run_does_no_work(results_root):
    cfg = tiny_config(results_root)
    first = train_trunk(cfg)
    stamp = (first.run_dir / "checkpoints" / "step_30.safetensors").stat().st_mtime_ns
    again = train_trunk(cfg)
    assert again.reused and again.run_dir == first.run_dir
    assert (first.run_dir / "checkpoints" / "step_30.safetensors").stat().st_mtime_ns == stamp


def test_same_seeds_same_weights_and_noise_seed_changes_only_noise(tmp_path):
    a = train_trunk(tiny_config(tmp_path / "a"))
    b = train_trunk(tiny_config(tmp_path / "b"))
    c = train_trunk(tiny_config(tmp_path / "c", training__noise_seed="1"))
    wa, wb, wc = (_weights(r.run_dir, 30) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    # Same init seed: a different noise seed starts from the very same weights.
    w0a, w0c = _weights(a.run_dir, 0), _weights(c.run_dir, 0)
    assert all(torch.equal(w0a[k], w0c[k]) for k in w0a)


def test_missing_rewind_checkpoint_is_produced_by_exact_replay(tmp_path):
    full = train_trunk(tiny_config(tmp_path / "full", training__rewind_points="5it,10it,17it"))
    late = train_trunk(tiny_config(tmp_path / "late"))  # no 17it checkpoint
    assert 17 not in late.checkpoints
    again = train_trunk(tiny_config(tmp_path / "late"), extra_checkpoints=[17])
    assert 17 in again.checkpoints
    w_full, w_late = _weights(full.run_dir, 17), _weights(late.run_dir, 17)
    assert all(torch.equal(w_full[k], w_late[k]) for k in w_full)


class _Watch:
    """TrainHooks that change nothing and note what the engine asked of them."""

    freeze = False

    def __init__(self, seen: list):
        self.seen = seen

    def covered(self, step: int) -> bool:
        return True

    def attach(self, members) -> dict:
        self.seen.append(f"attach {members.step}")
        return {}

    def __call__(self, members) -> None:
        self.seen.append(members.step)


class _Watching(Method):
    """A method of the test's own, added by one registration: plain training watched through its hooks."""

    name = "watching"

    def __init__(self):
        self.seen: list = []

    def hooks(self, run, rundir, first, n):
        return _Watch(self.seen)

    def summary(self, run, rundir, first, end, final):
        return {"watched": {"steps": end - first, "final_tensors": len(final())}}


def test_a_method_registered_in_one_line_is_trained_through_its_hooks(tmp_path, monkeypatch):
    method = _Watching()
    monkeypatch.setitem(METHODS._entries, "watching", method)  # as ``METHODS.register``, undone after the test
    plain = train_trunk(tiny_config(tmp_path / "plain"))
    cfg = tiny_config(tmp_path / "watched", training__method="watching")
    watched = train_trunk(cfg)
    assert method.seen == ["attach 0", *range(30)]  # asked before every step, from the state it attached to
    w_plain, w_watched = _weights(plain.run_dir, 30), _weights(watched.run_dir, 30)
    assert all(torch.equal(w_plain[k], w_watched[k]) for k in w_plain)  # hooks that change nothing change nothing
    state = ["fc.0.weight", "fc.0.bias", "fc.1.weight", "fc.1.bias", "fc.2.weight", "fc.2.bias"]
    assert read_json(watched.run_dir / "summary.json")["watched"] == {"steps": 30, "final_tensors": len(state)}
    again = train_trunk(cfg)
    assert again.reused and again.summary["watched"] == {"steps": 30, "final_tensors": len(state)}
    with pytest.raises(ConfigError, match="training.method: unknown method 'watchd'; choose one of standard, "
                                          "edgepopup, supermask, neq, watching"):
        prepare(cfg.with_overrides({"training.method": "watchd"}))


def test_resume_from_intermediate_state_is_bit_identical(tmp_path):
    ref = train_trunk(tiny_config(tmp_path / "ref"))
    cfg = tiny_config(tmp_path / "cut")
    train_trunk(cfg)
    run = trunk_dir(cfg)
    # Simulate a crash after step 15: keep only the state of step 15, drop later files.
    ctx = prepare(cfg)
    from stability.stages.trunk import produce_checkpoints

    for step in (10, 30):
        (run / "checkpoints" / f"step_{step}.safetensors").unlink()
    (run / "state" / "latest.safetensors").unlink()
    produce_checkpoints(ctx, run, [15])
    os.replace(run / "checkpoints" / "step_15.safetensors", run / "state" / "latest.safetensors")
    run.update(status="running")
    resumed = train_trunk(cfg)
    w_ref, w_res = _weights(ref.run_dir, 30), _weights(resumed.run_dir, 30)
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    assert read_csv(ref.run_dir / "metrics.csv") == read_csv(resumed.run_dir / "metrics.csv")


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path):
    args = ["--set=training.steps=400it", "--set=training.checkpoint_every=10it", "--set=training.eval_every=100it"]
    cmd = [sys.executable, "-m", "stability.apps.cli", "train", "--preset", "lenet300_mnist5k", *TINY_ARGS, *args,
           "--threads", "1", "--quiet"]
    ref = subprocess.run(cmd + ["--out", str(tmp_path / "ref"), "--json"], capture_output=True, text=True, check=True)
    ref_dir = json.loads(ref.stdout)["run_dir"]

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    latest = None
    while time.time() < deadline:
        found = list(out.glob("train_*/state/latest.safetensors"))
        if found:
            latest = found[0]
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest is not None, "the run never saved a resumable state"
    run_dir = latest.parent.parent
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "running", "the kill came too late to test resuming"
    _, meta = load_tensors(latest)
    assert 0 < meta["step"] < 400

    done = subprocess.run(cmd + ["--out", str(out), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["run_dir"] == str(run_dir)
    w_ref, w_res = load_weights(ref_dir, 400), load_weights(run_dir, 400)
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    assert read_csv(run_dir / "metrics.csv") == read_csv(f"{ref_dir}/metrics.csv")


def test_truncated_checkpoint_is_a_clear_error(results_root):
    cfg = tiny_config(results_root)
    result = train_trunk(cfg)
    path = result.run_dir / "checkpoints" / "step_5.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(result.run_dir, 5)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    from stability.stages.checkpoints import load_members

    small = train_trunk(tiny_config(tmp_path / "a"))
    ctx = prepare(tiny_config(tmp_path / "b", model__width="0.2"))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_members(small.run_dir / "checkpoints" / "step_5.safetensors", ctx)


@pytest.mark.parametrize("override, match", [
    ({"training__rewind_points": "30it"}, "at or past the final step"),
    ({"training__rewind_points": "1ep"}, "at or past the final step"),
    ({"training__batch_size": "100000"}, "training.batch_size"),
])
def test_bad_steps_write_nothing(results_root, override, match):
    with pytest.raises(ConfigError, match=match):
        train_trunk(tiny_config(results_root, **override))
    assert list(results_root.iterdir()) == []


def test_sgd_momentum_schedule_and_adam_paths_train(tmp_path):
    for i, extra in enumerate([
        {"optimizer__name": "sgd", "optimizer__momentum": "0.9", "optimizer__nesterov": "true",
         "optimizer__weight_decay": "1e-4", "optimizer__lr": "0.05", "schedule__kind": "step",
         "schedule__milestones": "10it,20it", "schedule__warmup": "5it"},
        {"optimizer__name": "adam", "schedule__kind": "cosine"},
    ]):
        result = train_trunk(tiny_config(tmp_path / str(i), **extra))
        rows = result.metrics
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
