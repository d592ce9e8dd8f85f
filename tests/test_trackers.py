"""Tracker sinks with the real packages, no network: what TensorBoard, MLflow (file store) and W&B (offline) hold
equals the records on disk, value by value; a failing tracker warns once and changes nothing; a reused run logs
nothing twice; ``stability export`` sends finished runs; an unknown or missing tracker exits 2 writing nothing."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY_ARGS, tiny_config

from stability import trackers
from stability.apps.cli import main
from stability.errors import ConfigError
from stability.stages.imp import imp_settings, run_imp
from stability.stages.instability import instability_settings, instability_sweep
from stability.stages.trunk import train_trunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _runs(root: Path, kind: str) -> list[Path]:
    return sorted(root.glob(f"{kind}_*"))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 2-point sweep and a 2-level IMP run with TensorBoard and MLflow logging live."""
    base = tmp_path_factory.mktemp("trackers")
    cfg = tiny_config(base / "results", training__rewind_points="0it,10it",
                      runtime__trackers='["tensorboard", "mlflow"]')
    sweep = instability_sweep(cfg, instability_settings(siblings=2, alphas=3))
    imp = run_imp(cfg, imp_settings(levels=2, rewind="10it", baselines=["reinit"]))
    return cfg, sweep, imp, base


def _events(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _series(table: pd.DataFrame, key: str, column: str, **where) -> list[tuple[int, float]]:
    for k, v in where.items():
        table = table[table[k] == v]
    return [(int(s), float(x)) for s, x in zip(table[key], table[column]) if pd.notna(x)]


def _close(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-7)  # TB stores float32


def test_tensorboard_event_files_hold_the_records(logged):
    cfg, sweep, imp, _ = logged
    root = Path(cfg.runtime.results_root)
    trunk = _runs(root, "train")[0]
    metrics, events = pd.read_csv(trunk / "metrics.csv"), _events(trunk)
    for column, tag in (("test_error", "test/error"), ("train_loss", "train/loss"), ("val_loss", "val/loss")):
        _close(events[tag], _series(metrics, "step", column))
    table, events = pd.read_csv(sweep.run_dir / "sweep.csv"), _events(sweep.run_dir)
    assert len(table) == 2
    _close(events["instability/test"], _series(table, "rewind_step", "instability_mean", split="test"))
    _close(events["loss_barrier/test"], _series(table, "rewind_step", "loss_barrier_mean", split="test"))
    levels, events = pd.read_csv(imp.run_dir / "levels.csv"), _events(imp.run_dir)
    assert sorted(set(levels["level"])) == [0, 1, 2]
    for kind in ("imp", "reinit"):
        for column in ("density", "final_test_accuracy", "early_stop_test_accuracy"):
            _close(events[f"{kind}/{column}"], _series(levels, "level", column, kind=kind))


def test_tensorboard_holds_settings_tags_tables_and_figures(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, sweep, imp, _ = logged
    acc = EventAccumulator(str(sweep.run_dir / "tb"))
    acc.Reload()
    texts = acc.Tags()["tensors"]
    assert {"run/run_dir/text_summary", "run/hash/text_summary", "table/sweep/text_summary"} <= set(texts)
    assert "figure/interpolation" in acc.Tags()["images"]
    run_dir = acc.Tensors("run/run_dir/text_summary")[0].tensor_proto.string_val[0].decode()
    assert run_dir == str(sweep.run_dir.resolve())
    acc = EventAccumulator(str(imp.run_dir / "tb"))
    acc.Reload()
    assert "figure/imp_accuracy_density" in acc.Tags()["images"]


def test_mlflow_file_store_holds_the_records(logged):
    from mlflow.tracking import MlflowClient

    _, sweep, imp, base = logged
    client = MlflowClient(tracking_uri=(base / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("stability")
    runs = {r.data.tags["stability.hash"]: r for r in client.search_runs([experiment.experiment_id])}
    run = runs[sweep.run_dir.name.rsplit("_", 1)[1]]
    assert run.data.tags["stability.run_dir"] == str(sweep.run_dir.resolve())
    assert run.data.params["instability.siblings"] == "2"
    assert run.info.status == "FINISHED"
    table = pd.read_csv(sweep.run_dir / "sweep.csv")
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "instability/test")]
    _close(sorted(history), _series(table, "rewind_step", "instability_mean", split="test"))
    run = runs[imp.run_dir.name.rsplit("_", 1)[1]]
    levels = pd.read_csv(imp.run_dir / "levels.csv")
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "imp/final_test_accuracy")]
    _close(sorted(history), _series(levels, "level", "final_test_accuracy", kind="imp"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/imp_accuracy_density.png" in artifacts


def _wandb_records(path: Path):
    """The records of a W&B offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_run_holds_the_sweep(logged, tmp_path, monkeypatch):
    _, sweep, _, _ = logged
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert trackers.export(sweep.run_dir, ["wandb:sweeps"], group="grid-a") == {sweep.run_dir.name: ["wandb"]}
    import wandb

    wandb.teardown()  # the W&B service writes the offline file behind the run; this waits for it
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, names, summary = [], [], {}
    for record in _wandb_records(path):
        which = record.WhichOneof("record_type")
        if which == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif which == "run":
            names.append((record.run.display_name, record.run.run_group, record.run.project))
        elif which == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    assert (sweep.run_dir.name, "grid-a", "sweeps") in names
    got = [(h["rewind_step"], h["instability/test"]) for h in history if "instability/test" in h]
    _close(got, _series(pd.read_csv(sweep.run_dir / "sweep.csv"), "rewind_step", "instability_mean", split="test"))
    assert summary["run/run_dir"] == str(sweep.run_dir.resolve())


def test_a_reused_run_does_not_log_again(logged):
    cfg, sweep, _, _ = logged
    files = sorted((sweep.run_dir / "tb").iterdir())
    instability_sweep(cfg, instability_settings(siblings=2, alphas=3))
    assert sorted((sweep.run_dir / "tb").iterdir()) == files


def test_a_failing_tracker_warns_once_and_changes_no_record(tmp_path, monkeypatch, capsys):
    def fail(self, report):
        raise RuntimeError("cannot start")

    monkeypatch.setattr(trackers.sinks.TensorBoardSink, "log", fail)
    monkeypatch.setattr(trackers, "_WARNED", set())
    plain = train_trunk(tiny_config(tmp_path / "a"))
    tracked = train_trunk(tiny_config(tmp_path / "b", runtime__trackers='["tensorboard"]'))
    imp_settings_ = imp_settings(levels=1, rewind="10it")
    run_imp(tiny_config(tmp_path / "b", runtime__trackers='["tensorboard"]'), imp_settings_)
    assert tracked.run_dir.name == plain.run_dir.name  # runtime.trackers names no run
    assert (tracked.run_dir / "metrics.csv").read_text() == (plain.run_dir / "metrics.csv").read_text()
    assert capsys.readouterr().err.count("warning: tracker tensorboard") == 1
    assert not (tracked.run_dir / "tb").exists()


def test_unknown_or_missing_tracker_exits_2_writing_nothing(results_root, capsys, monkeypatch):
    code = main(["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--tracker", "comet", "--out", str(results_root)])
    assert code == 2 and "unknown tracker 'comet'" in capsys.readouterr().err
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    code = main(["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--tracker", "wandb", "--out", str(results_root)])
    assert code == 2 and "pip install 'stability[wandb]'" in capsys.readouterr().err
    assert not any(results_root.iterdir())
    with pytest.raises(ConfigError, match="stability\\[mlflow\\]"):
        trackers.require(["mlflow"])


def test_export_sends_each_finished_run_once(logged, tmp_path, capsys):
    cfg, _, _, _ = logged
    root = Path(cfg.runtime.results_root)
    finished = [p.name for p in trackers.finished_runs(root)]
    assert main(["export", str(root), "--to", f"tensorboard:{tmp_path / 'tb'}", "--json"]) == 0
    logged_runs = json.loads(capsys.readouterr().out)
    assert sorted(logged_runs) == sorted(finished) and all(v == ["tensorboard"] for v in logged_runs.values())
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == sorted(finished)
    assert all(len(list((tmp_path / "tb" / name).glob("events.out.tfevents.*"))) == 1 for name in finished)
    assert main(["export", str(root), "--to", "neptune"]) == 2


def test_a_grid_logs_each_unit_grouped_by_the_grid_name(tmp_path):
    """Every unit of a grid logs to its own tracker run under the grid's name (the file's stem), with the axis values
    among the logged settings; the group names no run."""
    grid = tmp_path / "tiny_widths.toml"
    grid.write_text('preset = "lenet300_mnist5k"\nstages = ["instability"]\n\n[set]\n"model.width" = 0.1\n'
                    '"training.steps" = "20it"\n"training.batch_size" = 32\n"training.eval_every" = "10it"\n'
                    f'"runtime.trackers" = ["tensorboard:{tmp_path / "tb"}"]\n\n[axes]\n"training.noise_seed" = [0, 1]\n\n'
                    '[instability]\nrewind_points = ["0it"]\nsiblings = 2\nalphas = 3\n')
    root = tmp_path / "runs"
    assert main(["grid", str(grid), "--out", str(root)]) == 0
    finished = sorted(p.name for p in trackers.finished_runs(root))
    assert finished and sorted(p.name for p in (tmp_path / "tb" / "tiny_widths").iterdir()) == finished
    # the same settings without the group name the same runs
    from stability.grid.plan import load_grid

    assert load_grid(grid).base.runtime.tracker_group == "tiny_widths"
    assert load_grid(grid, {"runtime.tracker_group": "other"}).base.runtime.tracker_group == "other"
