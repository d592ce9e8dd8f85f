"""analysis: records on disk -> DataFrames -> figures, and the `stability plot` command.

Most tests write small records by hand in the exact on-disk formats (fast, numbers
known); one loads records the suite itself wrote on a tiny config.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_config
from matplotlib.figure import Figure

import analysis
from analysis import figures
from stability.errors import ConfigError, StabilityError
from stability.store import schema
from stability.store.files import FORMAT_VERSION, write_csv, write_json

# ----------------------------------------------------------------------------- synthetic records
TRUNK = {
    "dataset": {"name": "mnist5k", "val_size": 500},
    "model": {"name": "lenet_300_100", "width": 0.5, "hidden": []},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False},
    "schedule": {"kind": "constant", "milestones": []},
    "training": {"steps": "100it", "batch_size": 60, "init_seed": 0, "rewind_points": ["0it", "10it", "50it"]},
    "runtime": {"results_root": "results", "quiet": True},
}
CONV = {**TRUNK, "model": {"name": "conv4", "width": 0.25, "hidden": []},
        "optimizer": {"name": "adam", "lr": 0.001, "momentum": 0.0, "nesterov": False}}
H_TRAIN, H_CONV, H_SWEEP, H_SPARSE = "a1a1a1a1a1a1", "b2b2b2b2b2b2", "c3c3c3c3c3c3", "d4d4d4d4d4d4"
H_AUTO, H_ZERO, H_HSTEP, H_HPATH = "e5e5e5e5e5e5", "f6f6f6f6f6f6", "0a0a0a0a0a0a", "0b0b0b0b0b0b"
INSTABILITY = {"siblings": 3, "splits": ["test", "train"], "threshold": 0.02, "bn": "interpolate", "alphas": 3}
# Error barriers per pair (0-1, 0-2, 1-2) at each rewind step; the sweep table below is computed by hand.
BARRIERS = {"test": {0: (0.05, 0.07, 0.09), 10: (0.01, 0.015, 0.02), 50: (0.0, 0.005, 0.01)},
            "train": {0: (0.05, 0.07, 0.09), 10: (0.025, 0.03, 0.035), 50: (0.0, 0.005, 0.01)}}
ENDS = {"test": 0.10, "train": 0.05}
SWEEP_ROWS = [  # mean and stdev of the barriers above
    (0, "test", 0.07, 0.02, False), (0, "train", 0.07, 0.02, False),
    (10, "test", 0.015, 0.005, True), (10, "train", 0.03, 0.005, False),
    (50, "test", 0.005, 0.005, True), (50, "train", 0.005, 0.005, True),
]
# IMP final test accuracy per (kind, level) over replicates 0 and 1; densities 1, 0.8, 0.64.
ACC = {("imp", 0): (0.90, 0.92), ("imp", 1): (0.91, 0.93), ("imp", 2): (0.92, 0.90),
       ("reinit", 1): (0.85, 0.87), ("reinit", 2): (0.80, 0.84),
       ("random", 1): (0.84, 0.84), ("random", 2): (0.78, 0.80)}
DENSITY = {0: 1.0, 1: 0.8, 2: 0.64}


def _run(root, kind, run_hash, config, status="complete", **extra):
    path = root / f"{kind}_{run_hash}"
    path.mkdir(parents=True)
    write_json(path / "manifest.json", {"format_version": FORMAT_VERSION, "kind": kind, "hash": run_hash,
                                        "status": status, "config": config, "hashed_settings": {"trunk": H_TRAIN},
                                        **extra})
    return path


def _trunk(root, run_hash, config):
    path = _run(root, "train", run_hash, config)
    rows = [{"step": s, "member": 0, "lr": 0.1, "train_loss": 2.3 - s / 50, "train_error": 0.9 - s / 200,
             "val_loss": 2.3 - s / 60, "val_error": 0.9 - s / 210, "test_loss": 2.3 - s / 60,
             "test_error": 0.9 - s / 220} for s in (0, 50, 100)]
    write_csv(path / "metrics.csv", rows, ["step", "member", "lr", "train_loss", "train_error", "val_loss",
                                           "val_error", "test_loss", "test_error"])
    write_json(path / "summary.json", {"hash": run_hash, "final_step": 100})


def _sweep(root, run_hash, barriers, label=None, first=None, by_split=None, batchnorm=None):
    path = _run(root, "instability", run_hash, {"training": TRUNK, "instability": INSTABILITY}, label=label)
    curves = []
    for split, by_step in barriers.items():
        for k, values in by_step.items():
            for pair, barrier in zip(("0-1", "0-2", "1-2"), values):
                for alpha in (0.0, 0.5, 1.0):
                    err = ENDS[split] + (barrier if alpha == 0.5 else 0.0)
                    curves.append({"rewind_step": k, "pair": pair, "split": split, "alpha": alpha, "error": err,
                                   "loss": 10 * err})
    write_csv(path / "curves.csv", curves, ["rewind_step", "pair", "split", "alpha", "error", "loss"])
    table = [{"rewind_step": k, "split": s, "instability_mean": m, "instability_std": sd,
              "loss_barrier_mean": 10 * m, "loss_barrier_std": 10 * sd, "pairs": 3, "stable": st}
             for k, s, m, sd, st in SWEEP_ROWS if s in barriers and k in barriers[s]]
    write_csv(path / "sweep.csv", table, list(table[0]))
    write_json(path / "instability.json", {
        "settings": INSTABILITY, "bn_mode": "interpolate", "rewind_points": sorted(barriers["test"]),
        "threshold": 0.02, "primary_split": "test", "first_stable_step": first,
        "first_stable_step_by_split": by_split or {"test": first}, "per_split": {}, "label": label,
        **({} if batchnorm is None else {"batchnorm": batchnorm})})


def _imp(root, run_hash, rewind, rewind_step, first_stable=None, instability=False):
    imp = {"levels": 2, "prune_fraction": 0.2, "strategy": "global", "rewind": rewind,
           "baselines": ["reinit", "random"], "replicates": 2}
    path = _run(root, "imp", run_hash, {"training": TRUNK, "imp": imp, "instability": INSTABILITY},
                rewind_step=rewind_step)
    rows = []
    for rep in (0, 1):
        for (kind, level), accs in ACC.items():
            rows.append({"replicate": rep, "level": level, "kind": kind, "density": DENSITY[level],
                         "final_test_accuracy": accs[rep], "final_test_loss": 1 - accs[rep],
                         "early_stop_step": 40 + 10 * level + 10 * rep, "early_stop_test_accuracy": accs[rep] - 0.01,
                         "early_stop_val_loss": 0.3, "trajectory_length": 50.0 - level,
                         "instability": 0.01 * level if instability and kind == "imp" else "",
                         "rewind_step": rewind_step})
    rows.sort(key=lambda r: (r["replicate"], r["level"]))
    write_csv(path / "levels.csv", rows, list(rows[0]))
    info = {"rewind": rewind} if first_stable is None else {"rewind": rewind, "first_stable_step": first_stable}
    write_json(path / "imp.json", {"settings": imp, "rewind_step": rewind_step, "rewind": info, "tickets": {},
                                   "trajectory_length": {}})


def _hessian(root, run_hash, axis, lambda_min=True, density=True):
    path = _run(root, "hessian", run_hash, {"training": TRUNK, "hessian": {"top_k": 2, "trace_probes": 10}})
    points = (0, 50, 100) if axis == "step" else (0.0, 0.5, 1.0)
    rows = []
    for i, p in enumerate(points):
        row = {axis: p, **({"rewind_step": 10} if axis == "alpha" else {}),
               "lambda_1": 5.0 + 10 * i, "lambda_2": 3.0 + 5 * i,
               "lambda_min": -1.0 + 0.4 * i if lambda_min else None, "trace": 50.0 + 70 * i,
               "trace_stderr": 5.0 if lambda_min else None, "n_hvp": 120, "seconds": 0.5}
        rows.append(row)
    write_csv(path / "hessian.csv", rows, list(rows[0]))
    if density:
        grid = np.linspace(-2, 30, 40)
        dens = [{axis: p, "x": float(x), "density": float(np.exp(-((x - 5 * i) ** 2)) + 1e-30)}
                for i, p in enumerate(points[::2]) for x in grid]
        write_csv(path / "density.csv", dens, [axis, "x", "density"])
    write_json(path / "hessian.json", {"settings": {"top_k": 2, "trace_probes": 10, "samples": 256}})


@pytest.fixture
def records(tmp_path):
    """A results root holding one record of every kind, numbers chosen to check by hand."""
    root = tmp_path / "results"
    _trunk(root, H_TRAIN, TRUNK)
    _trunk(root, H_CONV, CONV)
    _sweep(root, H_SWEEP, BARRIERS, first=10, by_split={"test": 10, "train": 50})
    _sweep(root, H_SPARSE, {"test": {10: (0.001, 0.002, 0.003)}}, label="r0-level1", first=10)
    _imp(root, H_AUTO, "auto", 10, first_stable=10)
    _imp(root, H_ZERO, "0", 0, instability=True)
    _hessian(root, H_HSTEP, "step")
    _hessian(root, H_HPATH, "alpha", lambda_min=False, density=False)
    return root


# ----------------------------------------------------------------------------- loading
def test_runs_has_one_row_per_run_with_settings_flattened_and_lifted(records):
    df = analysis.runs(records)
    assert len(df) == 8
    assert list(df.columns[:5]) == ["kind", "hash", "status", "path", "label"]
    assert sorted(df["kind"].value_counts().items()) == [("hessian", 2), ("imp", 2), ("instability", 2),
                                                          ("train", 2)]
    # Stage runs nest the trunk config under "training": it is lifted so every run has model.name.
    assert df.set_index("hash").loc[H_SWEEP, "model.name"] == "lenet_300_100"
    assert df.set_index("hash").loc[H_CONV, "model.name"] == "conv4"
    assert df.set_index("hash").loc[H_SWEEP, "instability.siblings"] == 3
    assert df.set_index("hash").loc[H_TRAIN, "training.rewind_points"] == ("0it", "10it", "50it")
    assert df.set_index("hash").loc[H_SPARSE, "label"] == "r0-level1"


def test_a_single_run_directory_loads_like_a_root(records):
    one = records / f"instability_{H_SWEEP}"
    assert analysis.runs(one)["hash"].tolist() == [H_SWEEP]
    assert len(analysis.interpolation_curves(one)) == 2 * 3 * 3 * 3
    assert analysis.imp_levels(one).empty
    # Several sources at once, the same run given twice counted once.
    both = analysis.runs([one, records / f"train_{H_TRAIN}", one])
    assert sorted(both["hash"]) == sorted([H_SWEEP, H_TRAIN])


def test_every_record_type_round_trips(records):
    curves = analysis.training_curves(records)
    assert len(curves) == 6 and set(curves["run_hash"]) == {H_TRAIN, H_CONV}
    row = curves[(curves["run_hash"] == H_TRAIN) & (curves["step"] == 50)].iloc[0]
    assert row["train_loss"] == pytest.approx(2.3 - 1.0) and row["test_error"] == pytest.approx(0.9 - 50 / 220)
    assert row["optimizer.lr"] == 0.1 and row["run_kind"] == "train"

    interp = analysis.interpolation_curves(records)
    mid = interp[(interp["run_hash"] == H_SWEEP) & (interp["rewind_step"] == 0) & (interp["split"] == "test")
                 & (interp["pair"] == "0-2") & (interp["alpha"] == 0.5)]
    assert mid["error"].tolist() == [pytest.approx(0.17)] and mid["loss"].tolist() == [pytest.approx(1.7)]
    assert interp["pair"].map(type).eq(str).all()

    levels = analysis.imp_levels(records)
    assert len(levels) == 2 * 2 * 7
    auto = levels[levels["run_hash"] == H_AUTO]
    assert set(auto["rewind"]) == {"auto"} and set(auto["first_stable_step"]) == {10}
    assert auto["instability"].isna().all()
    zero = levels[(levels["run_hash"] == H_ZERO) & (levels["kind"] == "imp")]
    assert zero.sort_values(["replicate", "level"])["instability"].tolist()[:3] == [0.0, 0.01, 0.02]

    track = analysis.hessian_tracks(records)
    steps = track[track["track"] == "step"].sort_values("step")
    assert steps["lambda_1"].tolist() == [5.0, 15.0, 25.0] and steps["lambda_2"].tolist() == [3.0, 8.0, 13.0]
    assert steps["alpha"].isna().all() and steps["hessian.samples"].iloc[0] == 256
    path = track[track["track"] == "alpha"]
    assert path["lambda_min"].isna().all() and set(path["rewind_step"]) == {10}

    dens = analysis.hessian_densities(records)
    assert set(dens["run_hash"]) == {H_HSTEP} and set(dens["step"]) == {0, 100} and len(dens) == 80


def test_sweeps_carry_the_first_stable_step_and_sparse_ones_can_be_left_out(records):
    df = analysis.sweeps(records)
    dense = df[df["run_hash"] == H_SWEEP].set_index(["rewind_step", "split"])
    assert dense.loc[(10, "test"), "instability_mean"] == pytest.approx(0.015)
    assert set(dense["first_stable_step"]) == {10}
    assert dense.loc[(0, "train"), "split_first_stable_step"] == 50
    assert dense.loc[(0, "test"), "split_first_stable_step"] == 10
    assert set(dense["threshold"]) == {0.02} and set(dense["primary_split"]) == {"test"}
    assert df[df["run_hash"] == H_SPARSE]["label"].tolist() == ["r0-level1"]
    assert set(analysis.sweeps(records, include_sparse=False)["run_hash"]) == {H_SWEEP}
    assert set(analysis.interpolation_curves(records, include_sparse=False)["run_hash"]) == {H_SWEEP}


def test_missing_files_give_empty_frames_with_the_right_columns(tmp_path):
    root = tmp_path / "results"
    for kind, h in (("train", "111111111111"), ("instability", "222222222222"), ("imp", "333333333333"),
                    ("hessian", "444444444444")):
        _run(root, kind, h, {"training": TRUNK}, status="running")  # a run that has written only its manifest
    assert len(analysis.runs(root)) == 4
    expected = {
        analysis.training_curves: ["step", "member", "train_loss", "test_error"],
        analysis.interpolation_curves: ["rewind_step", "pair", "split", "alpha", "error", "loss"],
        analysis.sweeps: ["rewind_step", "split", "instability_mean", "first_stable_step", "threshold"],
        analysis.imp_levels: ["replicate", "level", "kind", "density", "final_test_accuracy", "early_stop_step"],
        analysis.hessian_tracks: ["step", "alpha", "lambda_1", "lambda_min", "trace", "trace_stderr"],
        analysis.hessian_densities: ["step", "alpha", "x", "density"],
    }
    for loader, columns in expected.items():
        df = loader(root)
        assert df.empty, loader.__name__
        assert {"run_kind", "run_hash", *columns} <= set(df.columns), loader.__name__
    empty = tmp_path / "empty"
    empty.mkdir()
    assert analysis.runs(empty).empty and list(analysis.runs(empty).columns)[:3] == ["kind", "hash", "status"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.runs(tmp_path / "nowhere")


def test_filter_selects_by_setting_value_list_and_tuple(records):
    df = analysis.runs(records)
    assert analysis.filter(df, **{"model.name": "conv4"})["hash"].tolist() == [H_CONV]
    assert set(analysis.filter(df, kind=["imp", "hessian"])["kind"]) == {"imp", "hessian"}
    assert set(analysis.filter(df, **{"imp.rewind": "auto"})["hash"]) == {H_AUTO}
    # A list setting is compared whole, not as a set of allowed values.
    assert len(analysis.filter(df, **{"training.rewind_points": ["0it", "10it", "50it"]})) == 8
    assert analysis.filter(df, **{"training.rewind_points": ["0it"]}).empty
    assert set(analysis.filter(df, **{"optimizer.lr": lambda c: c < 0.01})["hash"]) == {H_CONV}
    curves = analysis.training_curves(records)
    assert set(analysis.filter(curves, **{"model.name": "lenet_300_100"}, step=100)["run_hash"]) == {H_TRAIN}
    with pytest.raises(ConfigError, match="model.nmae"):
        analysis.filter(df, **{"model.nmae": "x"})


def test_aggregate_gives_mean_std_count_over_pairs_and_replicates_by_hand(records):
    curves = analysis.filter(analysis.interpolation_curves(records), run_hash=H_SWEEP, split="test")
    agg = analysis.aggregate(curves, ["rewind_step", "alpha"], "error").set_index(["rewind_step", "alpha"])
    assert list(agg.columns) == ["mean", "std", "count"]
    assert agg.loc[(0, 0.5), "mean"] == pytest.approx(0.17)  # 0.10 + mean(0.05, 0.07, 0.09)
    assert agg.loc[(0, 0.5), "std"] == pytest.approx(0.02)
    assert agg.loc[(0, 0.5), "count"] == 3
    assert agg.loc[(10, 0.0), "std"] == pytest.approx(0.0)

    levels = analysis.filter(analysis.imp_levels(records), run_hash=H_AUTO)
    agg = analysis.aggregate(levels, ["kind", "level"], ["final_test_accuracy", "early_stop_step"])
    row = agg.set_index(["kind", "level"]).loc[("reinit", 2)]
    assert row["final_test_accuracy_mean"] == pytest.approx(0.82)
    assert row["final_test_accuracy_std"] == pytest.approx(math.sqrt(2) * 0.02)
    assert row["early_stop_step_mean"] == pytest.approx(65) and row["final_test_accuracy_count"] == 2
    # One value per group: the std is undefined (NaN), not zero.
    one = analysis.aggregate(levels[levels["replicate"] == 0], ["kind", "level"], "final_test_accuracy")
    assert one["std"].isna().all() and (one["count"] == 1).all()


# ----------------------------------------------------------------------------- figures
def _labelled(ax, prefix):
    return [line for line in ax.get_lines() if str(line.get_label()).startswith(prefix)]


def test_plot_interpolation_one_panel_per_split_one_line_per_rewind_step(records):
    curves = analysis.interpolation_curves(records, include_sparse=False)
    fig = analysis.plot_interpolation(curves)
    axes = fig.get_axes()
    assert len(axes) == 2
    assert [ax.get_ylabel() for ax in axes] == ["Test error (%)", "Train error (%)"]
    assert {ax.get_xlabel() for ax in axes} == {"Interpolation α"}
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == ["k = 0it", "k = 10it", "k = 50it"]
        assert len(ax.collections) == 3  # the ±std bands
    k0 = axes[0].get_lines()[0]
    assert k0.get_ydata().tolist() == pytest.approx([10.0, 17.0, 10.0])  # percent, mean over pairs
    # the registry's names, not a second table of display names
    assert "lenet_300_100 (width ×0.5) on mnist5k" in fig._suptitle.get_text()
    assert len(analysis.plot_interpolation(curves, splits=["train"]).get_axes()) == 1


def test_plot_instability_symlog_with_threshold_and_first_stable_step(records):
    fig = analysis.plot_instability(analysis.sweeps(records, include_sparse=False))
    (ax,) = fig.get_axes()
    assert ax.get_xscale() == "symlog"
    assert ax.get_xlim()[0] < 0 < ax.get_xlim()[1]  # step 0 is inside the axes, not on its edge
    assert ax.get_ylabel() == "Instability (%)" and ax.get_xlabel().startswith("Rewind iteration")
    assert sorted(c.get_label() for c in ax.containers) == ["Test error", "Train error"]
    test_line = next(c for c in ax.containers if c.get_label() == "Test error").lines[0]
    assert test_line.get_ydata().tolist() == pytest.approx([7.0, 1.5, 0.5])
    (threshold,) = _labelled(ax, "stability threshold")
    assert list(threshold.get_ydata()) == [2.0, 2.0]
    markers = {line.get_label(): line for line in _labelled(ax, "first stable step")}
    assert set(markers) == {"first stable step (test): 10it", "first stable step (train): 50it"}
    assert list(markers["first stable step (test): 10it"].get_xdata()) == [10, 10]
    assert markers["first stable step (test): 10it"].get_linestyle() == "--"


def test_batchnorm_note_follows_the_field_the_sweep_wrote(records):
    """Records without ``batchnorm`` (as the fixture's) get no note; a sweep that says its model has BatchNorm does."""
    for frame, plot in ((analysis.interpolation_curves, analysis.plot_interpolation),
                        (analysis.sweeps, analysis.plot_instability)):
        df = frame(records, include_sparse=False)
        assert df["batchnorm"].isna().all()
        assert "BatchNorm" not in plot(df)._suptitle.get_text()
    bn_root = records.parent / "bn"
    _sweep(bn_root, "c9c9c9c9c9c9", BARRIERS, first=10, batchnorm=True)
    _sweep(bn_root, "c8c8c8c8c8c8", BARRIERS, first=10, batchnorm=False)
    for frame, plot in ((analysis.interpolation_curves, analysis.plot_interpolation),
                        (analysis.sweeps, analysis.plot_instability)):
        df = frame(bn_root)
        with_bn = plot(analysis.filter(df, run_hash="c9c9c9c9c9c9"))._suptitle.get_text()
        assert "BatchNorm statistics: interpolate" in with_bn
        assert "BatchNorm" not in plot(analysis.filter(df, run_hash="c8c8c8c8c8c8"))._suptitle.get_text()


def test_plot_instability_says_when_no_step_is_stable(records):
    df = analysis.sweeps(records, include_sparse=False)
    df = df.assign(first_stable_step=float("nan"), split_first_stable_step=float("nan"))
    (ax,) = analysis.plot_instability(df, splits=["test"]).get_axes()
    assert not _labelled(ax, "first stable step")
    assert any("no stable step" in t.get_text() for t in ax.texts)


def test_plot_imp_log_x_decreasing_with_three_lines_and_error_bars(records):
    levels = analysis.filter(analysis.imp_levels(records), run_hash=H_AUTO)
    fig = analysis.plot_imp(levels)
    (ax,) = fig.get_axes()
    assert ax.get_xscale() == "log"
    left, right = ax.get_xlim()
    assert left > 100 and right < 64  # 100% on the left, sparser to the right
    assert ax.get_xlabel().startswith("Weights remaining (%")
    assert ax.get_ylabel().startswith("Test accuracy")
    labels = [c.get_label() for c in ax.containers]
    assert labels == ["IMP", "random reinitialization", "random pruning"]
    imp = ax.containers[0]
    assert imp.lines[0].get_xdata().tolist() == pytest.approx([100, 80, 64])
    assert imp.lines[0].get_ydata().tolist() == pytest.approx([91, 92, 91])
    assert imp.has_yerr
    # Baselines start at the dense network.
    assert ax.containers[1].lines[0].get_xdata().tolist() == pytest.approx([100, 80, 64])
    assert "first stable step (10it)" in fig._suptitle.get_text()


def test_plot_imp_early_stop_and_sparse_instability(records):
    levels = analysis.filter(analysis.imp_levels(records), run_hash=H_ZERO)
    (ax,) = analysis.plot_imp_early_stop(levels).get_axes()
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] > ax.get_xlim()[1]
    assert ax.get_ylabel().startswith("Early-stop iteration")
    assert len(ax.containers) == 3
    assert ax.containers[0].lines[0].get_ydata().tolist() == pytest.approx([45, 55, 65])
    (ax,) = analysis.plot_imp(levels, value="instability").get_axes()
    assert [c.get_label() for c in ax.containers] == ["IMP"]  # only IMP rows carry an instability
    assert _labelled(ax, "stability threshold")
    with pytest.raises(ConfigError, match="final_test_accuracy"):
        analysis.plot_imp(levels, value="accuracy")


def test_plot_rewind_comparison_one_line_per_rewind_target(records):
    levels = analysis.imp_levels(records)
    runs = {"rewind to 0": analysis.filter(levels, run_hash=H_ZERO),
            "rewind to first stable step": analysis.filter(levels, run_hash=H_AUTO)}
    (ax,) = analysis.plot_rewind_comparison(runs).get_axes()
    assert [c.get_label() for c in ax.containers] == list(runs)
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] > ax.get_xlim()[1]
    (ax,) = analysis.plot_rewind_comparison(runs, baselines=True).get_axes()
    assert len(ax.containers) == 6


def test_plot_hessian_two_panels_with_edge_of_stability(records):
    track = analysis.filter(analysis.hessian_tracks(records), run_hash=H_HSTEP)
    fig = analysis.plot_hessian(track, lr=0.1, momentum=0.9)
    ax_eig, ax_tr = fig.get_axes()
    assert ax_eig.get_xlabel() == "Training iteration" and ax_tr.get_xlabel() == "Training iteration"
    assert ax_eig.get_ylabel() == "Hessian eigenvalue" and ax_tr.get_ylabel().startswith("Hessian trace")
    assert [line.get_ydata().tolist() for line in _labelled(ax_eig, "λ_max")] == [[5.0, 15.0, 25.0]]
    assert len(_labelled(ax_eig, "λ_min")) == 1
    (eos,) = _labelled(ax_eig, "edge of stability")
    assert eos.get_ydata()[0] == pytest.approx((2 + 2 * 0.9) / 0.1)
    assert "(2+2β)/η" in eos.get_label()
    assert len(_labelled(ax_tr, "trace")) == 1 and len(ax_tr.collections) == 1  # ± standard error band
    assert "edge of stability" in [t.get_text()[:17] for t in fig.legends[0].get_texts()]
    (eos,) = _labelled(analysis.plot_hessian(track, lr=0.05).get_axes()[0], "edge of stability")
    assert eos.get_ydata()[0] == pytest.approx(40.0) and "2/η" in eos.get_label()
    assert not _labelled(analysis.plot_hessian(track).get_axes()[0], "edge of stability")
    assert figures.eos_threshold(0.1) == pytest.approx(20.0)
    assert {ax.get_yscale() for ax in fig.get_axes()} == {"linear"}  # 5 to 25: one decade


def test_plot_hessian_switches_to_symlog_when_sharpness_spans_decades(records):
    track = analysis.filter(analysis.hessian_tracks(records), run_hash=H_HSTEP)
    track = track.assign(lambda_1=[900.0, 0.3, 0.1])  # a blow-up at initialization, then collapse
    ax_eig, ax_tr = analysis.plot_hessian(track, lr=0.05, momentum=0.9).get_axes()
    assert ax_eig.get_yscale() == "symlog" and ax_tr.get_yscale() == "linear"
    assert analysis.plot_hessian(track, yscale="linear").get_axes()[0].get_yscale() == "linear"
    with pytest.raises(ConfigError, match="auto, linear, symlog"):
        analysis.plot_hessian(track, yscale="log")


def test_plot_hessian_along_the_path_without_lambda_min(records):
    track = analysis.filter(analysis.hessian_tracks(records), run_hash=H_HPATH)
    ax_eig, ax_tr = analysis.plot_hessian(track).get_axes()
    assert ax_eig.get_xlabel() == "Interpolation α"
    assert len(_labelled(ax_eig, "λ_max")) == 1 and not _labelled(ax_eig, "λ_min")
    assert len(ax_tr.collections) == 1  # the band is there but of zero width: no stderr recorded


def test_plot_density_log_y_one_line_per_step(records):
    fig = analysis.plot_density(analysis.hessian_densities(records))
    (ax,) = fig.get_axes()
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "Eigenvalue λ"
    assert [line.get_label() for line in ax.get_lines()] == ["step 0it", "step 100it"]
    # Underflowing tails are left out rather than drawn at a floor of the log axis.
    assert all(np.nanmin(line.get_ydata()) > 0 for line in ax.get_lines())
    assert any(np.isnan(line.get_ydata()).any() for line in ax.get_lines())
    axes = analysis.plot_density(analysis.hessian_densities(records), panels=True).get_axes()
    assert [ax.get_title() for ax in axes] == ["step 0it", "step 100it"]
    assert all(ax.get_yscale() == "log" and len(ax.get_lines()) == 1 for ax in axes)


def test_plot_density_gives_each_spectrum_a_panel_when_their_scales_differ(records):
    dens = analysis.hessian_densities(records)
    wide = dens.assign(x=np.where(dens["step"] == 0, dens["x"] * 100, dens["x"]))  # step 0 spans 100x more
    axes = analysis.plot_density(wide).get_axes()
    assert len(axes) == 2 and axes[0].get_xlim()[1] > 10 * axes[1].get_xlim()[1]


def test_plot_training_loss_and_error_panels(records):
    curves = analysis.filter(analysis.training_curves(records), run_hash=H_TRAIN)
    ax_loss, ax_err = analysis.plot_training(curves).get_axes()
    assert ax_loss.get_ylabel().startswith("Loss") and ax_err.get_ylabel() == "Error (%)"
    assert [line.get_label() for line in ax_err.get_lines()] == ["Train", "Test"]
    assert ax_err.get_lines()[0].get_ydata().tolist() == pytest.approx([90.0, 65.0, 40.0])
    both = analysis.plot_training(analysis.training_curves(records)).get_axes()[0]
    assert len(both.get_lines()) == 4  # two runs x two splits


def test_figure_functions_reject_empty_frames(records):
    with pytest.raises(ValueError, match="no rows"):
        analysis.plot_interpolation(analysis.interpolation_curves(records).iloc[:0])


def test_save_writes_png_and_pdf_and_refuses_unknown_formats(records, tmp_path):
    sweeps = analysis.sweeps(records, include_sparse=False)
    analysis.plot_instability(sweeps, save=tmp_path / "figs" / "sweep")
    assert (tmp_path / "figs" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "figs" / "sweep.pdf").read_bytes()[:5] == b"%PDF-"
    analysis.plot_instability(sweeps, save=tmp_path / "only" / "sweep", formats=("pdf",))
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["sweep.pdf"]
    with pytest.raises(ConfigError, match="png, pdf"):
        analysis.plot_instability(sweeps, save=tmp_path / "bad" / "sweep", formats=("png", "jpg"))
    assert not (tmp_path / "bad").exists()


def test_plot_all_draws_every_figure_the_records_allow(records, tmp_path):
    written = analysis.plot_all(records, tmp_path / "figs", formats=("png",))
    names = sorted(p.name for p in written)
    expected = [f"training_{H_TRAIN}", f"training_{H_CONV}", f"interpolation_{H_SWEEP}", f"instability_{H_SWEEP}",
                f"imp_{H_AUTO}", f"imp_early_stop_{H_AUTO}", f"imp_{H_ZERO}", f"imp_early_stop_{H_ZERO}",
                f"imp_instability_{H_ZERO}", f"rewind_comparison_{H_AUTO}_{H_ZERO}",
                f"matching_vs_instability_{H_AUTO}_{H_ZERO}", f"hessian_{H_HSTEP}",
                f"hessian_{H_HPATH}", f"density_{H_HSTEP}"]
    assert names == sorted(f"{n}.png" for n in expected)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in written)
    only = analysis.plot_all(records, tmp_path / "sweep", formats="png,pdf", kinds=["sweep"])
    assert sorted(p.name for p in only) == [f"instability_{H_SWEEP}.pdf", f"instability_{H_SWEEP}.png"]


def test_plot_all_walks_the_figure_table_and_reads_each_record_once(records, tmp_path, monkeypatch):
    from analysis import load

    assert figures.KINDS == (*figures.FIGURES, "all")
    for kind, entry in figures.FIGURES.items():
        assert set(entry.needs) <= set(figures.RECORDS), kind
        module = __import__(f"analysis.figures.{entry.family}", fromlist=[entry.draw])
        assert callable(getattr(module, entry.draw)), kind
    assert {loader for loader, _ in figures.RECORDS.values()} <= set(load.__all__)
    calls = []
    real = load.interpolation_curves

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "interpolation_curves", counted)
    written = analysis.plot_all(records, tmp_path / "figs", formats="png", kinds="curves,sweep")
    assert calls == [{"include_sparse": False}]  # interpolation curves read once, dense only
    # in the table's order: curves before sweep, whatever the order asked
    assert [p.name for p in written] == [f"interpolation_{H_SWEEP}.png", f"instability_{H_SWEEP}.png"]


def test_every_figure_name_resolves_from_its_family():
    from analysis.figures import curves, landscape, saving, strong, style, tickets, training

    family_names = set()
    for module in (curves, landscape, saving, strong, style, tickets, training):
        family_names |= set(module.__all__)
    assert family_names <= set(figures.__all__)
    for name in figures.__all__:
        assert getattr(figures, name) is not None, name
    assert {n for n in analysis.__all__ if n.startswith("plot_")} <= set(figures.__all__)
    for name in analysis.__all__:
        assert getattr(analysis, name) is not None, name
    with pytest.raises(AttributeError):
        figures.no_such_figure  # noqa: B018


def test_reading_records_imports_neither_torch_nor_matplotlib():
    """analysis reads records with the schema alone; the figure table (stability --help) needs no pandas."""
    code = ("import sys, analysis, analysis.load; from analysis.figures import KINDS; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules)); "
            "import analysis.figures.curves; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "False"]
    code = "import sys; from analysis.figures import FIGURES; print('pandas' in sys.modules, 'matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False False"


def test_config_sections_and_strong_methods_of_the_schema_are_the_configs():
    from stability import config
    from stability.methods import names_with

    assert schema.CONFIG_SECTIONS == tuple(config.SECTIONS)
    assert schema.STRONG_METHODS == tuple(names_with("trains_weights", False))


def test_strong_tickets_read_the_mask_density_from_the_summary(tmp_path):
    root = tmp_path / "results"
    strong = {**TRUNK, "training": {**TRUNK["training"], "method": "edgepopup"}, "strong": {"kept": 0.3}}
    for run_hash, summary in (("5a5a5a5a5a5a", {"method": "edgepopup", "mask_density": 0.31}),
                              ("5b5b5b5b5b5b", {})):  # a summary written before it carried the density
        path = _run(root, "train", run_hash, strong)
        write_json(path / "summary.json", {"final_test_accuracy": 0.8, "final_step": 100, **summary})
    path = _run(root, "train", "5c5c5c5c5c5c", TRUNK)
    write_json(path / "summary.json", {"final_test_accuracy": 0.9, "final_step": 100, "method": "standard"})
    frame = analysis.strong_tickets(root).set_index("run_hash")
    assert sorted(frame.index) == ["5a5a5a5a5a5a", "5b5b5b5b5b5b"]
    assert frame.loc["5a5a5a5a5a5a", "density"] == pytest.approx(0.31)
    assert math.isnan(frame.loc["5b5b5b5b5b5b", "density"])
    assert set(frame["kept"]) == {0.3} and set(frame["method"]) == {"edgepopup"}
    dense = analysis.strong_tickets(root, include_dense=True)
    assert dense.set_index("run_hash").loc["5c5c5c5c5c5c", "density"] == 1.0


# ----------------------------------------------------------------------------- the plot command
def _parse(argv):
    from stability.apps.plot import add_parser

    parser = argparse.ArgumentParser(prog="stability")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["plot", *argv])


def test_plot_command_writes_the_files_and_prints_their_paths(records, tmp_path, capsys):
    out = tmp_path / "figs"
    args = _parse([str(records), "--kind", "sweep,curves", "--out", str(out), "--format", "png,pdf"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / f"{n}_{H_SWEEP}.{f}") for n in ("interpolation", "instability")
                                     for f in ("png", "pdf"))
    assert all((out / p).is_file() for p in printed)
    # Default --out: RESULTS/figures.
    args = _parse([str(records / f"imp_{H_AUTO}"), "--kind", "imp", "--format", "png"])
    assert args.func(args) == 0
    assert (records / f"imp_{H_AUTO}" / "figures" / f"imp_{H_AUTO}.png").is_file()


@pytest.mark.parametrize("argv, option, allowed", [
    (["--kind", "curvez"], "--kind", "curves, sweep, imp, hessian, training, earlybird, neq, layers, curve, plane, baselines, all"),
    (["--format", "png,jpg"], "--format", "png, pdf"),
])
def test_plot_command_bad_kind_or_format_names_the_option_and_writes_nothing(records, tmp_path, argv, option,
                                                                              allowed):
    out = tmp_path / "figs"
    args = _parse([str(records), "--out", str(out), *argv])
    with pytest.raises(ConfigError) as err:
        args.func(args)
    assert option in str(err.value) and allowed in str(err.value)
    assert isinstance(err.value, StabilityError)  # the class the CLI turns into exit code 2
    assert not out.exists()


def test_plot_command_missing_results_path_is_bad_input(tmp_path):
    args = _parse([str(tmp_path / "nowhere"), "--out", str(tmp_path / "figs")])
    with pytest.raises(ConfigError, match="RESULTS"):
        args.func(args)
    assert not (tmp_path / "figs").exists()


def test_plot_command_through_the_stability_cli_exits_2_on_bad_input(records, tmp_path, capsys):
    from stability.apps.cli import main

    assert main(["plot", str(records), "--kind", "nope", "--out", str(tmp_path / "figs")]) == 2
    assert "--kind" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()
    assert main(["plot", str(records), "--kind", "sweep", "--out", str(tmp_path / "figs")]) == 0


# ----------------------------------------------------------------------------- real records
def test_records_written_by_the_suite_load_and_plot(results_root, tmp_path):
    from stability.stages.instability import instability_settings, instability_sweep

    cfg = tiny_config(results_root)
    result = instability_sweep(cfg, instability_settings(alphas=5))

    runs = analysis.runs(results_root)
    assert {"train", "instability"} <= set(runs["kind"])
    assert (runs["model.name"] == cfg.model.name).all()
    assert (runs["model.width"] == cfg.model.width).all()

    sweeps = analysis.sweeps(results_root)
    assert len(sweeps) == len(result.table)
    for row in result.table:
        got = sweeps[(sweeps["rewind_step"] == row["rewind_step"]) & (sweeps["split"] == row["split"])].iloc[0]
        assert got["instability_mean"] == pytest.approx(row["instability_mean"])
        assert bool(got["stable"]) == row["stable"]
    expected_first = float("nan") if result.first_stable_step is None else result.first_stable_step
    np.testing.assert_equal(sweeps["first_stable_step"].unique(), [expected_first])

    curves = analysis.interpolation_curves(results_root)
    assert len(curves) == len(result.curves) == len(result.rewind_steps) * 1 * 5  # one pair, test split, 5 α
    assert sorted(set(curves["alpha"])) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # The interpolation mean over the single pair is the curve itself.
    agg = analysis.aggregate(curves, ["rewind_step", "alpha"], "error")
    first = min(result.curves, key=lambda r: (r["rewind_step"], r["alpha"]))
    assert agg.iloc[0]["mean"] == pytest.approx(first["error"]) and agg.iloc[0]["count"] == 1

    training = analysis.training_curves(results_root)
    assert training["step"].max() == 30 and {"train_loss", "test_error"} <= set(training.columns)

    written = analysis.plot_all(results_root, tmp_path / "figs", formats=("png",))
    names = {p.name.split("_")[0] for p in written}
    assert names == {"training", "interpolation", "instability"}
    assert isinstance(analysis.plot_interpolation(curves), Figure)


def test_plot_matching_vs_instability_one_point_per_measured_level(records):
    levels = analysis.filter(analysis.imp_levels(records), run_hash=H_ZERO)
    fig = analysis.plot_matching_vs_instability({"rewind to 0": levels})
    ax = fig.get_axes()[0]
    (points,) = ax.collections
    imp = levels[(levels["kind"] == "imp") & (levels["level"] > 0)]
    dense = levels[(levels["kind"] == "imp") & (levels["level"] == 0)]["final_test_accuracy"].mean()
    xy = points.get_offsets()
    assert len(xy) == len(imp)
    assert sorted(xy[:, 0].tolist()) == pytest.approx(sorted((imp["instability"].astype(float) * 100).tolist()))
    assert sorted(xy[:, 1].tolist()) == pytest.approx(sorted(((imp["final_test_accuracy"] - dense) * 100).tolist()))
    assert _labelled(ax, "stability threshold") and _labelled(ax, "matching tolerance")
    with pytest.raises(ConfigError, match="no IMP level has a measured instability"):
        analysis.plot_matching_vs_instability({"auto": analysis.filter(analysis.imp_levels(records), run_hash=H_AUTO)})
