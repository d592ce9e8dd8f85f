"""Bad input is refused before any work: exit code 2, a message naming the setting, nothing written."""
from __future__ import annotations

import os

import pytest
from helpers import TINY_ARGS

from stability.apps.cli import main
from stability.config import check_results_root
from stability.errors import ConfigError
from stability.presets import load_toml

PRESET = ["--preset", "lenet300_mnist5k"]


def _case(command, args=(), match="", toml=None, out="runs", id=None):
    return pytest.param(command, list(args), match, toml, out, id=id)


CASES = [
    # ---- misspelt TOML sections and keys
    _case("train", match="unknown section [trainng]; sections are dataset, model, optimizer, schedule, training, "
          "runtime, strong, neq, instability, imp, hessian", toml='[trainng]\nsteps = "10it"\n', id="toml-section"),
    _case("train", match="unknown section [instabilty]", toml="[instabilty]\nsiblings = 3\n", id="toml-stage-section"),
    _case("train", match="[imp] must be a table", toml="imp = 3\n", id="toml-stage-not-a-table"),
    _case("train", match="preset must be a string", toml='preset = ["lenet300_mnist5k"]\n', id="toml-preset-list"),
    _case("train", match="unknown key 'stpes' in [training]", toml='[training]\nstpes = "10it"\n', id="toml-run-key"),
    _case("instability", match="instability.siblngs: unknown setting; settings are", toml="[instability]\nsiblngs = 3\n",
          id="toml-instability-key"),
    _case("imp", match="imp.levles: unknown setting; settings are", toml="[imp]\nlevles = 2\n", id="toml-imp-key"),
    _case("hessian", match="hessian.topk: unknown setting; settings are", toml="[hessian]\ntopk = 2\n",
          id="toml-hessian-key"),
    _case("instability", match="instability.chance_margin: must be a number in [0, 1)",
          toml="[instability]\nchance_margin = 1.5\n", id="chance-margin-instability"),
    _case("imp", match="imp.chance_margin: must be a number in [0, 1)", toml="[imp]\nchance_margin = -0.1\n",
          id="chance-margin-imp"),
    # ---- optimizer, schedule, runtime, model numbers
    _case("train", ["--set", "optimizer.beta1=1.0"], "optimizer.beta1: must be in [0, 1)", id="beta1-one"),
    _case("train", ["--set", "optimizer.beta1=-0.1"], "optimizer.beta1: must be in [0, 1)", id="beta1-negative"),
    _case("train", ["--set", "optimizer.beta2=1.5"], "optimizer.beta2: must be in [0, 1)", id="beta2-above-one"),
    _case("train", ["--set", "optimizer.beta2=nan"], "optimizer.beta2: must be in [0, 1)", id="beta2-nan"),
    _case("train", ["--set", "optimizer.eps=-1e-8"], "optimizer.eps: must be a finite number >= 0", id="eps-negative"),
    _case("train", ["--set", "optimizer.lr=inf"], "optimizer.lr: must be a positive number", id="lr-inf"),
    _case("train", ["--set", "optimizer.lr=nan"], "optimizer.lr: must be a positive number", id="lr-nan"),
    _case("train", ["--set", "optimizer.weight_decay=nan"], "optimizer.weight_decay: must be a finite number >= 0",
          id="weight-decay-nan"),
    _case("train", ["--set", "optimizer.weight_decay=inf"], "optimizer.weight_decay: must be a finite number >= 0",
          id="weight-decay-inf"),
    _case("train", ["--set", "optimizer.momentum=nan"], "optimizer.momentum: must be in [0, 1)", id="momentum-nan"),
    _case("train", ["--set", "schedule.gamma=-0.5"], "schedule.gamma: must be a finite number >= 0", id="gamma-negative"),
    _case("train", ["--set", "schedule.gamma=inf"], "schedule.gamma: must be a finite number >= 0", id="gamma-inf"),
    _case("train", ["--set", "runtime.eval_batch_size=0"], "runtime.eval_batch_size: must be >= 1", id="eval-batch-0"),
    _case("train", ["--set", "runtime.eval_batch_size=-5"], "runtime.eval_batch_size: must be >= 1",
          id="eval-batch-negative"),
    _case("train", ["--set", "model.width=inf"], "model.width: must be a positive finite number", id="width-inf"),
    _case("train", ["--set", "model.width=nan"], "model.width: must be a positive finite number", id="width-nan"),
    # ---- results root
    _case("train", match="runtime.results_root: '{tmp}/file' is an existing file, not a directory", out="file",
          id="out-is-a-file"),
    _case("train", match="runtime.results_root: '{tmp}/file/runs' cannot be created: '{tmp}/file' is an existing file",
          out="file/runs", id="out-under-a-file"),
    _case("instability", match="runtime.results_root: '{tmp}/file' is an existing file", out="file",
          id="instability-out-is-a-file"),
    _case("train", ["--set", "runtime.results_root="], "runtime.results_root: must name a directory", out=None,
          id="results-root-empty"),
    # ---- stage settings: instability
    _case("instability", match="instability.alpha_grid: expected a list of numbers",
          toml='[instability]\nalpha_grid = [0, "half", 1]\n', id="alpha-grid-text"),
    _case("instability", match="instability.alpha_grid: expected a list of numbers",
          toml="[instability]\nalpha_grid = [0, true, 1]\n", id="alpha-grid-bool"),
    _case("instability", match="instability.alpha_grid: expected a list", toml="[instability]\nalpha_grid = 0.5\n",
          id="alpha-grid-scalar"),
    _case("instability", match="instability.alphas: the α grid must be increasing",
          toml="[instability]\nalpha_grid = [0, 0.5, 2]\n", id="alpha-grid-out-of-range"),
    _case("instability", match="instability.bn_batches: must be at least 1", toml="[instability]\nbn_batches = -1\n",
          id="bn-batches-negative"),
    _case("instability", match="instability.siblings: expected an integer", toml="[instability]\nsiblings = 2.5\n",
          id="siblings-fraction"),
    _case("instability", match="instability.splits: expected a list", toml="[instability]\nsplits = 3\n",
          id="splits-scalar"),
    _case("instability", ["--siblings", "1"], "instability.siblings: need at least 2", id="siblings-1"),
    _case("instability", ["--threshold", "nan"], "instability.threshold: must be in (0, 1)", id="threshold-nan"),
    # ---- stage settings: imp
    _case("imp", match="imp.rate_overrides: value for 'output' must be a number, got 'low'",
          toml='[imp]\nrate_overrides = { output = "low" }\n', id="rate-overrides-text"),
    _case("imp", match="imp.rate_overrides: rate for 'output' must be a number in [0, 1)",
          toml="[imp]\nrate_overrides = { output = 1.5 }\n", id="rate-overrides-above-one"),
    _case("imp", match="imp.rate_overrides: rate for 'fc.0' must be a number in [0, 1)",
          toml="[imp]\nrate_overrides = { 'fc.0' = -0.1 }\n", id="rate-overrides-negative"),
    _case("imp", match="imp.rate_overrides: expected a table of name = value", toml="[imp]\nrate_overrides = 0.1\n",
          id="rate-overrides-scalar"),
    _case("imp", match="imp.rate_overrides: 'fc9' names no prunable layer of model 'lenet_300_100'; layers are fc.0, ",
          toml='[imp]\nstrategy = "layerwise"\nrate_overrides = { fc9 = 0.1 }\n', id="rate-overrides-unknown-layer"),
    _case("imp", ["--replicates", "0"], "imp.replicates: must be at least 1", id="replicates-0"),
    _case("imp", match="imp.conv_fraction: must be in [0, 1)", toml="[imp]\nconv_fraction = 1.0\n",
          id="conv-fraction-one"),
    _case("imp", match="imp.conv_fraction: must be in [0, 1)", toml="[imp]\nconv_fraction = -0.1\n",
          id="conv-fraction-negative"),
    _case("imp", match="imp.levels: expected an integer", toml="[imp]\nlevels = 2.5\n", id="levels-fraction"),
    _case("imp", ["--prune-fraction", "1.0"], "imp.prune_fraction: must be in (0, 1)", id="prune-fraction-one"),
    _case("imp", match="imp.exclude: expected a list", toml="[imp]\nexclude = 3\n", id="exclude-scalar"),
    # ---- stage settings: hessian
    _case("hessian", ["--path", "5it", "--alpha-grid", "0,abc,1"],
          "hessian --alpha-grid: expected comma-separated numbers", id="hessian-alpha-grid-text"),
    _case("hessian", ["--path", "5it", "--alpha-grid", "0,2"], "hessian --alpha-grid: values must lie in [0, 1]",
          id="hessian-alpha-grid-out-of-range"),
    _case("hessian", ["--alpha-grid", "0,1"], "hessian --alpha-grid: only applies along a path",
          id="hessian-alpha-grid-no-path"),
    _case("hessian", ["--trace", "--trace-probes", "0"], "hessian --trace-probes: must be at least 1",
          id="trace-probes-0"),
    _case("hessian", ["--trace", "--trace-probes", "-3"], "hessian --trace-probes: must be at least 1",
          id="trace-probes-negative"),
    _case("hessian", match="hessian.tol: expected a number", toml='[hessian]\ntol = "small"\n', id="hessian-tol-text"),
    _case("hessian", match="hessian.smallest: expected true or false", toml='[hessian]\nsmallest = "yes"\n',
          id="hessian-smallest-text"),
    _case("hessian", ["--samples", "0"], "hessian.samples must be an integer >= 1", id="hessian-samples-0"),
    # ---- flags are --set: the same conversion, the same messages
    _case("instability", ["--siblings", "two"], "instability.siblings: expected an integer, got 'two'",
          id="flag-not-a-number"),
    _case("instability", ["--set", "instability.siblings=1"], "instability.siblings: need at least 2",
          id="set-stage-key"),
    _case("instability", ["--set", "instability.sibling=3"], "instability.sibling: unknown setting; settings are",
          id="set-stage-key-misspelt"),
    _case("train", ["--set", "imp.levels=2"], "--set 'imp.levels': unknown section 'imp'; sections are dataset, ",
          id="set-stage-key-of-another-command"),
    _case("imp", ["--set", "earlybird.density=0.2"], "sections are dataset, model, optimizer, schedule, training, "
          "runtime, strong, neq, imp, instability", id="set-sections-listed"),
    _case("train", ["--device", "gpu"], "runtime.device: unknown device 'gpu'; choose one of auto, cpu, cuda",
          id="device-unknown"),
    _case("train", ["--threads", "-1"], "runtime.threads: must be >= 0", id="threads-negative"),
    _case("earlybird", ["--window", "1"], "earlybird.window: must be an integer >= 2", id="earlybird-window-1"),
    _case("hessian", ["--set", "hessian.top_k=-1"], "hessian.top_k must be an integer >= 0", id="set-hessian-key"),
]


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command, args, match, toml, out", CASES)
def test_bad_input_exits_2_names_the_setting_and_writes_nothing(tmp_path, capsys, monkeypatch, command, args, match,
                                                                toml, out):
    monkeypatch.chdir(tmp_path)  # a relative results root that slipped through would land here, and be seen
    (tmp_path / "file").write_text("not a directory\n")
    if toml is None:
        source = PRESET
    else:
        path = tmp_path / "run.toml"
        path.write_text('preset = "lenet300_mnist5k"\n' + toml if "preset" not in toml else toml)
        source = [str(path)]
    before = _snapshot(tmp_path)
    argv = [command, *source, *TINY_ARGS, *args] + (["--out", str(tmp_path / out)] if out else [])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert match.replace("{tmp}", str(tmp_path)) in err
    assert err.startswith("error: ") and "Traceback" not in err
    assert _snapshot(tmp_path) == before  # no run directory, no results root, nothing else
    assert (tmp_path / "file").read_text() == "not a directory\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write anywhere: os.access reports every directory writable")
@pytest.mark.parametrize("out, match", [
    ("locked", "runtime.results_root: directory '{tmp}/locked' is not writable"),
    ("locked/runs", ("runtime.results_root: '{tmp}/locked/runs' cannot be created: its nearest existing parent "
                     "'{tmp}/locked' is not writable")),
    ("locked/a/b", "its nearest existing parent '{tmp}/locked' is not writable"),
])
def test_results_root_not_writable_is_refused(tmp_path, capsys, monkeypatch, out, match):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = main(["train", *PRESET, *TINY_ARGS, "--out", str(tmp_path / out)])
        assert code == 2
        assert match.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_results_root_that_can_be_made_is_accepted(tmp_path):
    check_results_root(str(tmp_path))  # exists
    check_results_root(str(tmp_path / "a" / "b" / "c"))  # made on the first write
    assert list(tmp_path.iterdir()) == []  # checking creates nothing
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is an existing file"):
        check_results_root(str(tmp_path / "file"))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        check_results_root(str(tmp_path / "dangling" / "runs"))


def test_toml_with_every_allowed_table_loads(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "lenet300_mnist5k"\ndescription = "a test"\n[optimizer]\nlr = 0.01\n'
                    "[instability]\nsiblings = 3\n[imp]\nlevels = 2\n[hessian]\ntop_k = 2\n")
    cfg, extra = load_toml(path)
    assert cfg.optimizer.lr == 0.01
    # the preset's own [imp] table comes along, the file's keys on top
    assert extra == {"instability": {"siblings": 3}, "hessian": {"top_k": 2},
                     "imp": {"strategy": "layerwise", "prune_fraction": 0.2, "rate_overrides": {"output": 0.1},
                             "levels": 2}}
