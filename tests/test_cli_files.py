"""``stability connect A.pt B.ckpt`` and ``stability hessian CKPT``: files trained elsewhere, named by their tensors."""
from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
from helpers import train_plain

from stability import lmc
from stability.apps.cli import main
from stability.hessian import hessian_settings, probe
from stability.stages.connect import connect_settings
from stability.stages.context import prepare
from stability.stages.external import connect_files, file_config
from stability.store.files import save_tensors

MODEL = ["--model", "lenet_300_100", "--set", "model.width=0.1", "--dataset", "mnist5k"]


def _train(net, x, y, seed: int, steps: int = 40):
    return train_plain(net, x, y, seed, steps, lr=0.1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two narrow LeNet-300-100s trained by a plain loop, saved as a DataParallel .pt and a Lightning .ckpt."""
    folder = tmp_path_factory.mktemp("files")
    ctx = prepare(file_config({"model.name": "lenet_300_100", "model.width": "0.1", "dataset.name": "mnist5k",
                               "runtime.threads": "2"}))
    x, y = ctx.data.x_train, ctx.data.y_train
    a, b = _train(ctx.new_model(1), x, y, 1), _train(ctx.new_model(2), x, y, 2)
    torch.save({f"module.{k}": v for k, v in a.state_dict().items()}, folder / "a.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in b.state_dict().items()}, "epoch": 3}, folder / "b.ckpt")
    return folder, ctx, a, b


def _connect(capsys, *args: str) -> tuple[int, dict]:
    code = main(["connect", *args, *MODEL, "--alphas", "5", "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else {}


def test_connect_files_equals_lmc_and_is_named_by_contents(files, results_root, tmp_path, capsys, one_torch_thread):
    folder, ctx, a, b = files
    code, summary = _connect(capsys, str(folder / "a.pt"), str(folder / "b.ckpt"), "--out", str(results_root))
    assert code == 0
    runs = list(results_root.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("connect_")
    assert {"curves.csv", "connect.json", "manifest.json"} <= {p.name for p in runs[0].iterdir()}
    assert json.loads((runs[0] / "manifest.json").read_text())["status"] == "complete"
    expected = lmc.barrier(a, b, ctx.data.split("test"), alphas=5)
    assert summary["barrier"]["test"] == pytest.approx(expected, abs=1e-6)
    record = (runs[0] / "connect.json").read_bytes()
    # rerun: the finished record is reused as written
    assert _connect(capsys, str(folder / "a.pt"), str(folder / "b.ckpt"), "--out", str(results_root))[0] == 0
    assert (runs[0] / "connect.json").read_bytes() == record
    # moved and renamed, or saved in another format: the same tensors name the same run
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(folder / "a.pt", moved / "renamed.pth")
    save_tensors(moved / "b.safetensors", b.state_dict())
    code, again = _connect(capsys, str(moved / "renamed.pth"), str(moved / "b.safetensors"), "--out",
                           str(results_root))
    assert code == 0 and [p.name for p in results_root.iterdir()] == [runs[0].name]
    assert (runs[0] / "connect.json").read_bytes() == record and again["a"] == str(folder / "a.pt")
    # the report as printed
    assert main(["connect", str(folder / "a.pt"), str(folder / "b.ckpt"), *MODEL, "--alphas", "5", "--out",
                 str(results_root)]) == 0
    out = capsys.readouterr().out
    assert f"a: {folder / 'a.pt'}" in out and "test: error barrier" in out and runs[0].name in out


def test_a_file_holding_a_runs_weights_names_that_runs_connect_record(tmp_path):
    """The golden name of tests/test_hashes.py's connect of two patterned trunks, reached from files."""
    from test_hashes import GOLDEN_CONNECT, _members

    for k in (1, 2):
        torch.save(_members(k, 30).member_state_dict(0), tmp_path / f"{k}.pt")
    cfg = file_config({"model.name": "lenet_300_100", "model.width": "0.1", "model.init": "glorot_normal",
                       "dataset.name": "mnist5k", "runtime.results_root": str(tmp_path / "out"),
                       "runtime.threads": "2"})
    result = connect_files(tmp_path / "1.pt", tmp_path / "2.pt", cfg, connect_settings(alphas=3))
    assert result.run_dir.name == GOLDEN_CONNECT["dense_alphas3"] == "connect_7c7eb4979933"
    # a dataset setting that changes the splits names another record
    other = connect_files(tmp_path / "1.pt", tmp_path / "2.pt", cfg.with_overrides({"dataset.val_size": "100"}),
                          connect_settings(alphas=3))
    assert other.run_dir.name != result.run_dir.name


def test_hessian_of_a_file_is_probed_and_named_by_contents(files, results_root, tmp_path, capsys, one_torch_thread):
    folder, ctx, a, _ = files
    args = [*MODEL, "--top", "1", "--set", "hessian.samples=256", "--out", str(results_root)]
    assert main(["hessian", str(folder / "a.pt"), *args, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    expected = probe(a, ctx.data.x_train, ctx.data.y_train, hessian_settings({"top_k": 1, "samples": 256}))
    assert first["rows"][0]["lambda_1"] == pytest.approx(expected.eigenvalues[0], rel=1e-6)
    assert first["rows"][0]["network"].startswith("sha256:") and first["run_dir"].split("/")[-1].startswith("hessian_")
    shutil.copy(folder / "a.pt", tmp_path / "moved.pt")
    assert main(["hessian", str(tmp_path / "moved.pt"), *args]) == 0
    out = capsys.readouterr().out
    assert first["rows"][0]["network"] in out and first["run_dir"] in out
    assert len(list(results_root.iterdir())) == 1


def _bad_files(folder, tmp_path):
    a = torch.load(folder / "a.pt", weights_only=True)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "code.pt")  # a whole module: unpickling it runs code
    torch.save({k: v for k, v in a.items() if k != "module.fc.2.bias"}, tmp_path / "short.pt")
    wide = prepare(file_config({"model.name": "lenet_300_100", "model.width": "0.2", "dataset.name": "mnist5k"}))
    torch.save(wide.model.state_dict(), tmp_path / "wide.pt")
    return {"code": tmp_path / "code.pt", "short": tmp_path / "short.pt", "wide": tmp_path / "wide.pt",
            "absent": tmp_path / "absent.pt"}


@pytest.mark.parametrize("case, match", [
    ("code", r"code\.pt' was not loaded: reading it would run code \(torch\.load\(weights_only=True\) refused"),
    ("short", r"short\.pt\): missing key 'fc.2.bias' for this architecture"),
    ("wide", r"wide\.pt\): key 'fc.0.weight' has shape \(60, 784\), this architecture expects \(30, 784\)"),
    ("absent", r"absent\.pt': no such file"),
    ("model", r"model\.name: unknown model 'transformer'; choose one of"),
    ("no_model", r"connect: a checkpoint file needs --model NAME"),
    ("mixed", r"connect A B: give two run directories or two state-dict files, not one of each"),
    ("hessian_code", r"code\.pt' was not loaded: reading it would run code"),
    ("hessian_at", r"hessian --at: applies to a run, not to a checkpoint file"),
    ("runs_with_model", r"connect --model: applies only to state-dict files"),
    ("runs_with_set", r"--set model.width: a run directory carries its own settings"),
])
def test_bad_files_exit_2_naming_the_file_or_setting_and_write_nothing(files, results_root, tmp_path, capsys, case,
                                                                        match):
    folder = files[0]
    bad = _bad_files(folder, tmp_path)
    good, out = str(folder / "b.ckpt"), ["--out", str(results_root)]
    argv = {
        "model": ["connect", str(folder / "a.pt"), good, "--model", "transformer", "--dataset", "mnist5k", *out],
        "no_model": ["connect", str(folder / "a.pt"), good, "--dataset", "mnist5k", *out],
        "mixed": ["connect", str(folder / "a.pt"), str(tmp_path), *MODEL, *out],
        "hessian_code": ["hessian", str(bad["code"]), *MODEL, *out],
        "hessian_at": ["hessian", str(folder / "a.pt"), *MODEL, "--at", "0it", *out],
        "runs_with_model": ["connect", str(tmp_path), str(tmp_path), "--model", "lenet5", *out],
        "runs_with_set": ["connect", str(tmp_path), str(tmp_path), "--set", "model.width=2", *out],
    }.get(case) or ["connect", str(bad[case]), good, *MODEL, *out]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert list(results_root.iterdir()) == []


PLUGIN = '''
import stability
from torch import nn

stability.register_model("files_plugin_mlp", lambda cfg, shape, n: nn.Sequential(nn.Flatten(), nn.Linear(784, 16),
                                                                                  nn.ReLU(), nn.Linear(16, n)),
                         replace=True)
'''


def test_a_plugin_model_from_files(tmp_path, results_root, monkeypatch, capsys):
    (tmp_path / "files_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "files_plugin", raising=False)
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        torch.save(net.state_dict(), tmp_path / f"{seed}.pt")
    argv = ["connect", str(tmp_path / "1.pt"), str(tmp_path / "2.pt"), "--model", "files_plugin_mlp", "--plugin",
            "files_plugin", "--dataset", "mnist5k", "--alphas", "3", "--out", str(results_root), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["barrier"]) == {"test"}
    sys.modules.pop("files_plugin", None)
