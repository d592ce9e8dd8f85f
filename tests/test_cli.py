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
    (["--set", "dataset.name=imagenet21k"], "dataset.name: unknown dataset 'imagenet21k'; choose one of"),
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


def _inputs(command, *argv):
    """What `stability COMMAND --preset lenet300_mnist5k ARGV...` would run with, without running it."""
    from stability.apps.cli import build_parser
    from stability.apps.overrides import load_config

    return load_config(build_parser(command).parse_args([command, "--preset", "lenet300_mnist5k", *argv]))


def test_stage_flags_are_aliases_of_set():
    from stability.stages.instability import instability_settings

    by_flag = _inputs("instability", "--siblings", "3", "--splits", "test,train", "--repair", "--rewind", "0it,5it",
                      "--alpha-grid", "0,0.5,1")
    by_set = _inputs("instability", "--set", "instability.siblings=3", "--set", "instability.splits=test,train",
                     "--set", "instability.repair=true", "--set", "instability.rewind_points=0it,5it",
                     "--set", "instability.alpha_grid=[0, 0.5, 1]")
    settings = instability_settings(by_flag.tables["instability"])
    assert settings == instability_settings(by_set.tables["instability"])
    assert (settings.siblings.siblings, settings.splits, settings.curve.repair, settings.rewind_points,
            settings.curve.alpha_grid) == \
        (3, ("test", "train"), True, ("0it", "5it"), (0.0, 0.5, 1.0))
    assert by_flag.cfg == by_set.cfg  # stage settings leave the run config alone
    # a flag wins over --set of the same setting
    assert _inputs("instability", "--siblings", "3", "--set", "instability.siblings=4").tables["instability"] == \
        {"siblings": "3"}


def test_stage_flags_override_the_presets_tables_key_by_key():
    tables = _inputs("imp", "--levels", "2", "--set", "instability.siblings=3").tables
    assert tables["imp"]["levels"] == "2" and tables["imp"]["strategy"] == "layerwise"  # the preset's [imp]
    assert tables["instability"] == {"siblings": "3"}


def test_runtime_flags_are_aliases_of_set():
    by_flag = _inputs("train", "--out", "elsewhere", "--device", "cpu", "--threads", "1", "--quiet",
                      "--plugin", "a", "--plugin", "b").cfg
    by_set = _inputs("train", "--set", "runtime.results_root=elsewhere", "--set", "runtime.device=cpu",
                     "--set", "runtime.threads=1", "--set", "runtime.quiet=true",
                     "--set", 'runtime.plugins=["a", "b"]').cfg
    assert by_flag == by_set
    assert (by_flag.runtime.results_root, by_flag.runtime.threads, by_flag.runtime.plugins) == ("elsewhere", 1,
                                                                                               ("a", "b"))


def _help(command):
    from stability.apps.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("command", ["instability", "imp", "hessian", "connect", "earlybird", "grid"])
def test_flag_help_reads_the_settings_defaults(command, capsys):
    from stability.apps.measure import TRACE_PROBES
    from stability.config import RuntimeConfig
    from stability.hessian.settings import HessianSettings
    from stability.maths.pruning import CRITERIA
    from stability.stages.connect import ConnectSettings
    from stability.stages.earlybird import EarlybirdSettings
    from stability.stages.imp import ImpSettings
    from stability.stages.instability import InstabilitySettings

    _help(command)
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    expected = {
        "instability": [f"[instability.alphas; default {InstabilitySettings().curve.alphas}]",
                        f"[instability.threshold; default {InstabilitySettings().threshold}]",
                        "[instability.rewind_points; default training.rewind_points]",
                        f"instability.align_examples = {InstabilitySettings().curve.align_examples}"],
        "imp": [f"[imp.levels; default {ImpSettings().levels}]", f"[imp.criterion; default {ImpSettings().criterion}]",
                ", ".join(CRITERIA), f"imp.prune_fraction = {ImpSettings().prune_fraction}"],
        "hessian": [f"[hessian.top_k; default {HessianSettings().top_k}]", f"(default {TRACE_PROBES})",
                    "--alpha-grid ALPHAS", "(default 0,0.25,0.5,0.75,1)"],
        "connect": [f"[connect.alphas; default {ConnectSettings().curve.alphas}]",
                    f"[connect.align_examples; default {ConnectSettings().curve.align_examples}]"],
        "earlybird": [f"[earlybird.density; default {EarlybirdSettings().density}]",
                      "[earlybird.every; default training.eval_every]"],
        "grid": [f"[runtime.results_root; default {RuntimeConfig().results_root}]"],
    }[command]
    for text in expected:
        assert text in out
    if command == "hessian":
        assert "--alphas" not in out


def test_alphas_is_a_count_and_hessian_takes_an_alpha_grid(capsys):
    from stability.apps.cli import main

    with pytest.raises(SystemExit) as exit_info:  # the explicit list is --alpha-grid; --alphas is a count elsewhere
        main(["hessian", "--preset", "lenet300_mnist5k", "--path", "5it", "--alphas", "0,1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --alphas" in capsys.readouterr().err


class _Track:
    run_dir = "nowhere"
    rows = ()


@pytest.mark.parametrize("flags, probes", [([], 0), (["--trace"], 50), (["--trace", "--trace-probes", "7"], 7),
                                           (["--trace-probes", "7"], 0)])
def test_hessian_trace_probes_default_only_with_trace(monkeypatch, capsys, flags, probes):
    from stability.stages import landscape

    seen = []
    monkeypatch.setattr(landscape, "hessian_track", lambda cfg, settings, **_: seen.append(settings) or _Track())
    assert main(["hessian", "--preset", "lenet300_mnist5k", "--json", *flags]) == 0
    assert seen[0].trace_probes == probes


def test_train_report_prints_the_methods_summary(capsys):
    from stability.apps import report

    summary = {"run_dir": "runs/train_x", "final_step": 30, "final_test_accuracy": 0.9, "checkpoints": ["0it", "30it"],
               "seconds": 1.0, "untrained": False, "method": "edgepopup", "mask_density": 0.3}
    report.train(summary, reused=False)
    assert "mask density        0.3000 (edgepopup: weights the evaluation keeps)" in capsys.readouterr().out
    report.train({**summary, "method": "standard", "mask_density": None}, reused=False)
    assert "mask density" not in capsys.readouterr().out


def test_presets_and_help_do_not_import_torch():
    code = ("import sys\nfrom stability.apps.cli import main\nassert main(['presets']) == 0\n"
            "assert 'torch' not in sys.modules, 'stability presets imported torch'")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    code = ("import sys\nfrom stability.apps.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nassert 'torch' not in sys.modules, 'stability --help imported torch'")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "presets,train,instability" in done.stdout
