from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import TINY_ARGS

from stability.apps.cli import main


@pytest.mark.slow
def test_train_end_to_end_in_a_subprocess(results_root):
    cmd = [sys.executable, "-m", "stability.apps.cli", "train", "--preset", "lenet300_mnist5k", *TINY_ARGS,
           "--out", str(results_root), "--threads", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "final test accuracy" in first.stdout and "rewind checkpoints  0it, 5it, 10it, 30it" in first.stdout
    assert first.stderr == ""  # no progress bar when not a terminal
    again = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True)
    summary = json.loads(again.stdout)
    assert summary["reused"] is True and summary["final_step"] == 30
    assert summary["run_dir"].startswith(str(results_root))


def test_toml_config_with_overrides(results_root, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('preset = "lenet300_mnist5k"\n[model]\nwidth = 0.1\n[training]\nsteps = "20it"\n'
                    'batch_size = 32\nrewind_points = ["5it"]\n')
    assert main(["train", str(path), "--set", "optimizer.lr=0.002", "--out", str(results_root), "--json",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((results_root / summary["run_dir"].split("/")[-1] / "manifest.json").read_text())
    assert manifest["config"]["optimizer"]["lr"] == 0.002 and manifest["config"]["training"]["steps"] == "20it"


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for line in ("optimizer.lr = 0.1", "training.steps = \"1000it\"", "model.init = \"default\"",
                 "dataset.data_root = \"\"", "runtime.device = \"auto\""):
        assert line in out


def test_presets_lists_paper_and_small_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("lenet300_mnist", "resnet20_cifar10", "vgg16_cifar10", "conv4_cifar10", "lenet300_mnist5k",
                 "conv4_mnist5k", "mlp_mnist1d"):
        assert name in out


@pytest.mark.parametrize("args, match", [
    (["--set", "dataset.name=imagenet"], "dataset.name: unknown dataset 'imagenet'; choose one of"),
    (["--set", "model.name=transformer"], "model.name: unknown model"),
    (["--set", "optimizer.name=rmsprop"], "optimizer.name: unknown optimizer 'rmsprop'; choose one of sgd, adam"),
    (["--set", "optimizer.lr=fast"], "optimizer.lr: expected a number"),
    (["--set", "optimizer.lr=-0.1"], "optimizer.lr: must be a positive number"),
    (["--set", "optimizer.colour=red"], "unknown key 'colour'"),
    (["--set", "training.steps=10epochs"], "training.steps: malformed step"),
    (["--set", "training.rewind_points=[\"40it\"]"], "at or past the final step"),
    (["--set", "dataset.name=cifar10"], "dataset.data_root"),
])
def test_bad_input_exits_2_names_the_setting_and_writes_nothing(results_root, capsys, args, match):
    code = main(["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, *args, "--out", str(results_root)])
    assert code == 2
    assert match in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_unknown_preset_and_missing_config(results_root, capsys, tmp_path):
    assert main(["train", "--preset", "lenet999", "--out", str(results_root)]) == 2
    assert "preset: unknown preset 'lenet999'; choose one of" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.toml"), "--out", str(results_root)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--out", str(results_root)]) == 2
    assert "--preset" in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_toml_syntax_error_exits_2_with_the_line(results_root, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[optimizer]\nlr = 0.1\nname = sgd\n")
    assert main(["train", str(path), "--out", str(results_root)]) == 2
    err = capsys.readouterr().err
    assert "TOML syntax error" in err and "line 3" in err
    assert list(results_root.iterdir()) == []


def test_missing_dataset_root_exits_2(results_root, tmp_path, capsys):
    code = main(["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--set", "dataset.name=mnist",
                 "--set", f"dataset.data_root={tmp_path / 'nowhere'}", "--out", str(results_root)])
    assert code == 2
    assert "dataset.data_root" in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_incompatible_results_directory_is_refused(results_root, capsys):
    assert main(["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), "--quiet"]) == 0
    capsys.readouterr()
    (run,) = results_root.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["format_version"] = 999
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root)]) == 2
    assert "incompatible version" in capsys.readouterr().err
