"""Curves of low loss between two networks (Garipov et al. 2018): ``maths.bezier``, ``lmc.fit_curve``, the ``curve``
stage and command, the loader and the figure."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import fresh_model, tiny_config, train_plain
from torch import nn

from stability import lmc
from stability.apps.cli import main
from stability.errors import ConfigError
from stability.lmc import fit as fit_module
from stability.maths.bezier import curve_coefficients, line_coefficients, midpoint, point_on_curve
from stability.stages.context import prepare
from stability.stages.curve import curve_settings, curve_sweep, fit_curve_files
from stability.stages.instability import instability_settings
from stability.store.files import load_tensors, save_tensors

WIDTH = "0.3"  # LeNet-300-100 at width 0.3: 90-30 hidden units
FILE_ARGS = ["--model", "lenet_300_100", "--dataset", "mnist5k", "--set", f"model.width={WIDTH}", "--threads", "1"]


def _train(net: nn.Module, x, y, seed: int, steps: int = 150, lr: float = 0.05) -> nn.Module:
    return train_plain(net, x, y, seed, steps, lr)


_fresh = fresh_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one torch thread (the two cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two LeNet-300-100s (width 0.3) trained on mnist5k by a plain loop from different seeds (~1 s), and the same
    two as safetensors files."""
    folder = tmp_path_factory.mktemp("curve")
    ctx = prepare(tiny_config(folder / "unused", model__width=WIDTH))
    x, y = ctx.data.x_train, ctx.data.y_train
    a = _train(_fresh(ctx, 1), x, y, 1)
    b = _train(_fresh(ctx, 2), x, y, 2)
    save_tensors(folder / "a.safetensors", a.state_dict())
    save_tensors(folder / "b.safetensors", b.state_dict())
    return ctx, a, b, (x, y), ctx.data.split("test"), folder


def _file_cfg(root, **overrides):
    from stability.stages.external import file_config

    return file_config({"model.name": "lenet_300_100", "model.width": WIDTH, "dataset.name": "mnist5k",
                        "runtime.results_root": str(root), "runtime.threads": 1, "runtime.quiet": True, **overrides})


# ----------------------------------------------------------------------------- the maths
def test_coefficients_pass_through_the_ends_and_the_midpoint_bezier_is_the_line():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for kind in ("bezier", "polychain"):
        c = curve_coefficients(kind, t)
        assert torch.allclose(c.sum(1), torch.ones(11, dtype=torch.float64))
        assert c[0].tolist() == [1.0, 0.0, 0.0] and c[-1].tolist() == [0.0, 0.0, 1.0]
    assert curve_coefficients("polychain", 0.5)[0].tolist() == [0.0, 1.0, 0.0]  # the bend itself
    assert torch.allclose(curve_coefficients("polychain", 0.25)[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    a = {"w": torch.randn(5, 3), "n": torch.tensor(7)}
    b = {"w": torch.randn(5, 3), "n": torch.tensor(9)}
    m = midpoint(a, b)
    for tv in t.tolist():
        on_curve = point_on_curve(curve_coefficients("bezier", tv)[0].tolist(), a, m, b, ["w", "n"])
        on_line = point_on_curve(line_coefficients(tv)[0].tolist(), a, m, b, ["w", "n"])
        assert torch.allclose(on_curve["w"], on_line["w"], atol=1e-6) and on_curve["n"] == 7


def test_a_bezier_curve_through_the_midpoint_is_the_straight_line(pair):
    """No fitting (lr 0): the curve's error and loss equal the line's, and the line equals ``lmc.interpolate``."""
    _, a, b, train, test, _ = pair
    curve = lmc.fit_curve(a, b, train, eval_data=test, steps=3, lr=0.0)
    assert torch.equal(curve.middle["fc.0.weight"], 0.5 * (a.fc[0].weight + b.fc[0].weight).detach())
    assert curve.t == pytest.approx([i / 20 for i in range(21)])
    assert curve.error == pytest.approx(curve.line.error, abs=1e-9)
    assert curve.loss == pytest.approx(curve.line.loss, rel=1e-5)
    line = lmc.interpolate(a, b, test, alphas=21, bn="reset", bn_data=train)
    assert curve.line.error == pytest.approx(line.error, abs=1e-9)
    assert curve.line.loss == pytest.approx(line.loss, rel=1e-5)
    assert curve.barrier == pytest.approx(curve.line_barrier) and not curve.untrained
    frame = curve.dataframe()
    assert list(frame.columns) == ["path", "t", "error", "loss"] and len(frame) == 42
    assert len(curve.trace) == 3 and curve.settings["seed"] == 0


def test_fitting_the_curve_lowers_the_barrier_between_independent_networks(pair):
    """Observed (width-0.3 MLPs, 150 plain SGD steps each, seeds 1 and 2; 100 fitting steps, ~0.2 s): the line's test
    error barrier 0.223 (loss barrier 1.01), the Bezier curve's 0.003-0.012 (loss 0.01-0.04)."""
    _, a, b, train, test, _ = pair
    curve = lmc.fit_curve(a, b, train, eval_data=test, steps=100, batch_size=64)
    assert curve.line_barrier > 0.15 and curve.line_loss_barrier > 0.6
    assert curve.barrier < 0.05 and curve.barrier < curve.line_barrier - 0.1
    assert curve.loss_barrier < 0.2
    assert curve.error[0] == curve.line.error[0] and curve.error[-1] == curve.line.error[-1]  # the ends stay fixed
    chain = lmc.fit_curve(a, b, train, eval_data=test, steps=100, batch_size=64, kind="polychain")
    assert chain.barrier < chain.line_barrier - 0.1
    aligned = lmc.fit_curve(a, b, train, eval_data=test, steps=1, lr=0.0, align="weights")
    assert aligned.line_barrier < curve.line_barrier  # after weight matching the line is lower already


def test_the_same_seed_gives_the_same_curve_and_another_seed_another(pair):
    _, a, b, train, _, _ = pair
    one = lmc.fit_curve(a, b, train, steps=5, points=3, batch_size=64, seed=3)
    again = lmc.fit_curve(a, b, train, steps=5, points=3, batch_size=64, seed=3)
    other = lmc.fit_curve(a, b, train, steps=5, points=3, batch_size=64, seed=4)
    assert all(torch.equal(one.middle[k], again.middle[k]) for k in one.middle)
    assert not torch.equal(one.middle["fc.0.weight"], other.middle["fc.0.weight"])


# ----------------------------------------------------------------------------- records, resume
def test_a_killed_fit_resumes_and_finishes_identical(pair, tmp_path, monkeypatch):
    _, _, _, _, _, folder = pair
    settings = curve_settings(steps=60, checkpoint_every=20, points=5, splits=["test"])
    whole = fit_curve_files(folder / "a.safetensors", folder / "b.safetensors", _file_cfg(tmp_path / "whole"), settings)

    real, calls = fit_module._train_step, []

    def dies_at_step_45(*args, **kwargs):
        calls.append(1)
        if len(calls) == 46:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "_train_step", dies_at_step_45)
    cfg = _file_cfg(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        fit_curve_files(folder / "a.safetensors", folder / "b.safetensors", cfg, settings)
    run = tmp_path / "killed" / whole.run_dir.name
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert not (run / "curve.csv").exists() and (run / "state" / "fit.safetensors").is_file()

    def counts(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(fit_module, "_train_step", counts)
    resumed = fit_curve_files(folder / "a.safetensors", folder / "b.safetensors", cfg, settings)
    assert len(calls) == 20  # from the checkpoint at step 40
    assert resumed.run_dir.name == whole.run_dir.name
    for name in ("curve.csv", "fit.csv"):
        assert (run / name).read_text() == (whole.run_dir / name).read_text()
    got, _ = load_tensors(run / "middle.safetensors")
    want, _ = load_tensors(whole.run_dir / "middle.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["iterations"] == 60 and set(summary["line_barrier"]) == {"test"}
    calls.clear()
    again = fit_curve_files(folder / "a.safetensors", folder / "b.safetensors", cfg, settings)
    assert again.reused and not calls and again.barriers == resumed.barriers


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_the_setting(pair, tmp_path):
    _, a, b, train, _, _ = pair
    with pytest.raises(ConfigError, match="steps"):
        lmc.fit_curve(a, b, train, steps=0)
    with pytest.raises(ConfigError, match="lr"):
        lmc.fit_curve(a, b, train, lr=-0.1)
    with pytest.raises(ConfigError, match="kind"):
        lmc.fit_curve(a, b, train, kind="spline")
    with pytest.raises(ConfigError, match="points"):
        lmc.fit_curve(a, b, train, points=1)
    narrow = prepare(tiny_config(tmp_path / "unused", model__width="0.2")).new_model()
    with pytest.raises(ConfigError, match="same architecture"):
        lmc.fit_curve(a, narrow, train, steps=1)
    with pytest.raises(ConfigError, match="curve.steps"):
        curve_settings(steps="0ep")
    with pytest.raises(ConfigError, match="curve.bn"):
        curve_settings(bn="repair")


@pytest.mark.parametrize("extra, match", [
    (["--steps", "0"], "curve.steps"),
    (["--kind", "spline"], "curve.kind"),
    (["--lr", "-1"], "curve.lr"),
    (["--rewind", "5it"], "--sweep"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(pair, tmp_path, capsys, extra, match):
    _, _, _, _, _, folder = pair
    out = tmp_path / "out"
    args = ["curve", str(folder / "a.safetensors"), str(folder / "b.safetensors"), *FILE_ARGS, "--out", str(out)]
    assert main([*args, *extra]) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_cli_refuses_another_architecture_and_writes_nothing(pair, tmp_path, capsys):
    _, _, _, _, _, folder = pair
    other = prepare(tiny_config(tmp_path / "unused", model__width="0.2")).new_model()
    save_tensors(tmp_path / "other.safetensors", other.state_dict())
    out = tmp_path / "out"
    assert main(["curve", str(folder / "a.safetensors"), str(tmp_path / "other.safetensors"), *FILE_ARGS,
                 "--out", str(out)]) == 2
    assert "shape" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- the command, loader and figure
def test_cli_fits_records_and_plots_a_curve(pair, tmp_path, capsys):
    from analysis.load import curve_barriers, fitted_curves

    _, _, _, _, _, folder = pair
    out = tmp_path / "out"
    assert main(["curve", str(folder / "a.safetensors"), str(folder / "b.safetensors"), *FILE_ARGS, "--steps", "40",
                 "--points", "5", "--kind", "polychain", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "polychain" and set(summary["barrier"]) == {"test", "train"}
    assert summary["barrier"]["test"] < summary["line_barrier"]["test"]
    frame = fitted_curves(out)
    assert set(frame["path"]) == {"curve", "line"} and len(frame) == 2 * 2 * 5
    assert frame["model.name"].iloc[0] == "lenet_300_100" and frame["curve.kind"].iloc[0] == "polychain"
    barriers = curve_barriers(out)
    assert barriers.set_index("split")["barrier"].to_dict() == pytest.approx(summary["barrier"])
    assert main(["plot", str(out), "--kind", "curve", "--out", str(tmp_path / "fig"), "--format", "png"]) == 0
    assert (tmp_path / "fig" / f"curve_{summary['run_dir'].rsplit('_', 1)[1]}.png").is_file()


def test_curve_sweep_measures_the_curve_at_each_rewind_point(tmp_path):
    """A sweep over one rewind point: the curve between its two siblings beside the line (curve runs of their own)."""
    cfg = tiny_config(tmp_path, training__rewind_points="5it", runtime__threads="1")
    result = curve_sweep(cfg, curve_settings(steps=10, points=3, splits=["test"]), instability_settings(alphas=3))
    assert [r["rewind_step"] for r in result.table] == [5]
    row = result.table[0]
    assert row["instability_mean"] is not None and row["curve_barrier"] <= row["line_barrier"] + 0.05
    assert (tmp_path / row["run"] / "middle.safetensors").is_file()
    again = curve_sweep(cfg, curve_settings(steps=10, points=3, splits=["test"]), instability_settings(alphas=3))
    assert again.curves[5].reused and again.table == result.table


def test_cli_sweep_reads_the_preset_and_reuses_finished_curves(tmp_path, capsys):
    from helpers import TINY_ARGS

    args = ["curve", "--sweep", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--rewind", "5it", "--steps", "10",
            "--points", "3", "--splits", "test", "--set", "instability.alphas=3", "--out", str(tmp_path), "--threads",
            "1", "--quiet"]
    assert main([*args, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["table"]
    assert [r["rewind_step"] for r in table] == [5] and table[0]["run"].startswith("curve_")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "5it" in out and table[0]["run"] in out
    assert main(["curve", "--sweep", str(tmp_path / "a"), str(tmp_path / "b")]) == 2


def test_batchnorm_statistics_are_recomputed_along_both_paths(pair):
    """A BatchNorm network (any module): the fit runs in train mode (batch statistics), and with bn = reset the
    midpoint curve is ``lmc.interpolate(bn="reset")``'s line, whose statistics differ from interpolated ones."""
    _, _, _, (x, y), test, _ = pair

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    a, b = _train(net(1), x, y, 1, steps=30), _train(net(2), x, y, 2, steps=30)
    flat = lmc.fit_curve(a, b, (x, y), eval_data=test, steps=1, lr=0.0, points=3, batch_size=64)
    line = lmc.interpolate(a, b, test, alphas=3, bn="reset", bn_data=(x, y))
    assert flat.loss == pytest.approx(line.loss, rel=1e-4) and flat.line.loss == pytest.approx(line.loss, rel=1e-4)
    kept = lmc.interpolate(a, b, test, alphas=3)
    assert flat.line.loss[1] != pytest.approx(kept.loss[1], rel=1e-3)
    fitted = lmc.fit_curve(a, b, (x, y), eval_data=test, steps=20, points=3, batch_size=64)
    assert fitted.loss[0] == pytest.approx(flat.loss[0]) and fitted.loss[1] < flat.loss[1]
    assert torch.equal(fitted.middle["2.running_mean"], flat.middle["2.running_mean"])  # the midpoint's buffers
