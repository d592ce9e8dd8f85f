"""Alignment in sweeps and ``stability connect``: recorded per setting, siblings reused, independent networks."""
from __future__ import annotations

import json

import pytest
from helpers import TINY_ARGS, tiny_config

from stability.apps.cli import main
from stability.errors import ConfigError
from stability.maths.interpolation import CurveSettings, evaluate_aligned_path, evaluate_path
from stability.stages.connect import connect, connect_settings
from stability.stages.instability import (
    InstabilitySettings,
    instability_settings,
    instability_sweep,
    sweep_key,
)
from stability.steps import INDEPENDENT_STEP
from stability.store.schema import CONNECT_SUMMARY, CURVES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(root):
    return tiny_config(root, training__steps="60it", model__width="0.25")


def test_plain_sweeps_keep_their_names_and_alignment_names_a_new_sweep(results_root):
    cfg = _cfg(results_root)
    plain = sweep_key(cfg, InstabilitySettings(), [5])
    assert not {"align", "repair", "align_examples", "align_seed"} & set(plain)  # old results keep their hashes
    for changed in ({"align": "weights"}, {"repair": True}, {"align": "activations", "align_examples": 200}):
        key = sweep_key(cfg, instability_settings(**changed), [5])
        assert key != plain and all(key[k] == v for k, v in changed.items())


def test_independent_networks_and_alignments_share_one_set_of_trained_networks(results_root):
    cfg = _cfg(results_root)
    barriers, dirs = {}, set()
    for align in ("none", "weights", "activations"):
        result = instability_sweep(cfg, instability_settings(rewind_points=["independent", "5it"], alphas=5,
                                                             align=align))
        rows = {r["rewind_step"]: r for r in result.table}
        barriers[align] = rows[INDEPENDENT_STEP]["instability_mean"]
        assert result.first_stable_step != INDEPENDENT_STEP  # the independent point is never a rewind step
        assert result.summary["alignment"] == align
        assert result.summary["independent"]["test"]["instability_mean"] == barriers[align]
        dirs.add(result.run_dir)
        # the endpoints are the networks themselves: aligning b permutes it without changing its error
        ends = [r for r in result.curves if r["rewind_step"] == INDEPENDENT_STEP and r["alpha"] in (0.0, 1.0)]
        barriers[align, "ends"] = sorted(r["error"] for r in ends)
    assert len(dirs) == 3  # one record per alignment setting
    assert barriers["none", "ends"] == barriers["weights", "ends"] == barriers["activations", "ends"]
    # two trunks (init seeds 0 and 1) and one sibling set: trained once, measured three ways
    assert len(list(results_root.glob("train_*"))) == 2
    assert len(list(results_root.glob("siblings_*"))) == 1
    # independently trained LeNet-300-100s at width 1/4 after 60 it: naive 0.377, weights 0.304,
    # activations 0.129 measured (5 alphas, test split)
    assert barriers["none"] > 0.25
    assert barriers["weights"] < barriers["none"] - 0.03
    assert barriers["activations"] < 0.6 * barriers["none"]
    # one figure of the curves naive vs aligned, one of instability vs rewind step per alignment
    from analysis import interpolation_curves, plot_alignment_curves
    from analysis.figures import plot_all

    written = {p.name for p in plot_all(results_root, results_root.parent / "figures", formats="png",
                                        kinds=["curves", "sweep"])}
    assert {"interpolation_alignment_0.png", "instability_alignment_0.png"} <= written
    fig = plot_alignment_curves(interpolation_curves(results_root))
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == [f"naive (barrier {100 * barriers['none']:.1f}%)",
                      f"weight matching (barrier {100 * barriers['weights']:.1f}%)",
                      f"activation matching (barrier {100 * barriers['activations']:.1f}%)"]
    with pytest.raises(ConfigError, match="rewind_step: 7it was not measured"):
        plot_alignment_curves(interpolation_curves(results_root), rewind_step=7)


def test_repair_keeps_the_endpoints_and_lowers_the_aligned_midpoint(results_root):
    from stability.engine import StackedModel
    from stability.stages.context import prepare
    from stability.stages.instability import independent_members

    cfg = _cfg(results_root)
    ctx = prepare(cfg)
    members, _ = independent_members(cfg, ctx, 2)
    a, b = members.member_state_dict(0), members.member_state_dict(1)
    sm = StackedModel(ctx.model)
    x, y = ctx.data.split("test")
    alphas = [0.0, 0.5, 1.0]
    naive = evaluate_path(sm, a, b, alphas, x, y, CurveSettings(alphas=3))
    aligned = evaluate_aligned_path(sm, a, b, alphas, x, y, CurveSettings(alphas=3, align="weights"), ctx.data.x_train)
    repaired = evaluate_aligned_path(sm, a, b, alphas, x, y, CurveSettings(alphas=3, align="weights", repair=True),
                                     ctx.data.x_train)
    for i in (0, 2):  # the endpoints: alignment keeps b's function, and REPAIR leaves a network's own statistics
        assert aligned[0][i] == naive[0][i]
        assert repaired[0][i] == pytest.approx(naive[0][i], abs=1e-3)
    # measured (width 1/4, 60 it): midpoint error 0.538 naive, 0.465 aligned, 0.401 aligned + REPAIR;
    # loss 1.663, 1.289, 1.063
    assert aligned[0][1] < naive[0][1] - 0.03
    assert repaired[1][1] < 0.9 * aligned[1][1] and repaired[0][1] < aligned[0][1]


def test_connect_two_trunks_gives_the_sweeps_independent_barrier_and_refuses_bad_input(results_root, capsys):
    cfg = _cfg(results_root)
    result = instability_sweep(cfg, instability_settings(rewind_points=["independent"], alphas=5, align="weights"))
    trunks = sorted(results_root.glob("train_*"), key=lambda p: json.loads((p / "manifest.json").read_text())
                    ["config"]["training"]["init_seed"])
    got = connect(trunks[0], trunks[1], connect_settings(align="weights", alphas=5))
    assert got.barriers["test"] == pytest.approx(result.table[0]["instability_mean"], abs=1e-12)
    assert (got.run_dir / CURVES).is_file() and (got.run_dir / CONNECT_SUMMARY).is_file()
    # a finished connect run is reused as it was written; a damaged record is measured again, with a warning
    stamps = {p.name: p.stat().st_mtime_ns for p in got.run_dir.iterdir()}
    again = connect(trunks[0], trunks[1], connect_settings(align="weights", alphas=5))
    assert (again.run_dir, again.barriers, again.curves) == (got.run_dir, got.barriers, got.curves)
    assert {p.name: p.stat().st_mtime_ns for p in got.run_dir.iterdir()} == stamps
    (got.run_dir / CONNECT_SUMMARY).write_text("{")
    capsys.readouterr()
    repaired = connect(trunks[0], trunks[1], connect_settings(align="weights", alphas=5))
    assert CONNECT_SUMMARY in capsys.readouterr().err and repaired.barriers == got.barriers
    assert main(["connect", str(trunks[0]), str(trunks[1]), "--align", "activations", "--alphas", "5"]) == 0
    assert "error barrier" in capsys.readouterr().out
    before = sorted(p.name for p in results_root.iterdir())
    for argv, message in (
        ([str(results_root / "nope"), str(trunks[1])], "is not a directory"),
        ([str(trunks[0]), str(trunks[1]), "--align", "sideways"], "connect.align: unknown method 'sideways'"),
        ([str(trunks[0]), str(results_root)], "neither a train_<hash>"),
    ):
        assert main(["connect", *argv]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in results_root.iterdir()) == before  # nothing written


def test_connect_refuses_networks_of_different_architectures_and_aligning_different_masks(results_root, capsys):
    from stability.stages.imp import imp_settings, run_imp
    from stability.stages.trunk import train_trunk

    cfg = _cfg(results_root)
    wide = train_trunk(cfg.with_overrides({"model.width": "0.5"}))
    narrow = train_trunk(cfg)
    with pytest.raises(ConfigError, match=r"differ in \[model\]"):
        connect(wide.run_dir, narrow.run_dir)
    imp = run_imp(cfg, imp_settings(levels=1, replicates=2, rewind="5it"))
    level = [imp.run_dir / f"replicate_{r}" / "level_1" for r in (0, 1)]
    with pytest.raises(ConfigError, match="different masks"):
        connect(level[0], level[1], connect_settings(align="weights", alphas=3))
    plain = connect(level[0], level[1], connect_settings(alphas=3))  # without alignment: measured as they are
    assert plain.summary["sparse"] is True
    forced = connect(level[0], level[1], connect_settings(align="weights", alphas=3, allow_different_masks=True))
    assert forced.summary["alignment"] == "weights"


def test_alignment_settings_are_checked_before_any_work(results_root, capsys):
    for extra, message in ((["--align", "sorted"], "instability.align: unknown method 'sorted'"),
                           (["--align-examples", "0"], "instability.align_examples"),
                           (["--rewind", "independent,5it", "--align", "weights", "--set", "model.name=torchvision/squeezenet1_1"],
                            "permutation alignment does not support")):
        args = ["instability", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), *extra]
        if "--rewind" not in extra:
            args += ["--rewind", "5it"]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert not any(results_root.iterdir())


def test_a_grid_sweeps_independent_networks_with_their_own_trunk_units(tmp_path):
    from stability.grid.plan import load_grid, make_plan
    from stability.grid.run import run_grid
    from stability.grid.status import grid_frame
    from stability.stages.trunk import trunk_dir

    path = tmp_path / "g.toml"
    path.write_text('preset = "lenet300_mnist5k"\nstages = ["instability"]\n[set]\n"training.steps" = "40it"\n'
                    '"model.width" = 0.25\n"training.batch_size" = 32\n[axes]\n"training.init_seed" = [0, 1]\n'
                    '[instability]\nrewind_points = ["independent", "5it"]\nalphas = 3\nsiblings = 3\n'
                    'align = "weights"\n')
    grid = load_grid(path, {"runtime.results_root": str(tmp_path / "r")})
    plan = make_plan(grid)
    trains = [u for u in plan.units if u.kind == "train"]
    # point 0 trains seeds 0, 1, 2 and point 1 seeds 1, 2, 3 (its own trunk is seed 1 with noise 0):
    # (init, noise) = (0,0) (1,1) (2,2) | (1,0) (2,1) (3,2): six distinct trunks, each a unit of its own
    assert len(trains) == 6 and len({u.id for u in trains}) == 6
    sweep_units = [u for u in plan.units if u.kind == "instability"]
    assert all(sum(1 for d in u.deps if d.startswith("train_")) == 3 for u in sweep_units)
    result = run_grid(grid)
    assert not result.failed
    frame = grid_frame(plan)
    assert list(frame["instability@independent"].notna()) == [True, True]
    base = grid.base.with_overrides({"runtime.results_root": str(tmp_path / "r")})
    own = trunk_dir(base).path.name
    assert own in {u.id for u in trains}


def test_imp_rewinding_to_auto_never_rewinds_to_the_independent_point(results_root):
    from stability.stages.imp import imp_settings, run_imp

    cfg = _cfg(results_root)
    sweep = instability_settings(rewind_points=["independent"], alphas=3)
    with pytest.raises(ConfigError, match="'auto' needs rewind points to sweep"):
        run_imp(cfg, imp_settings(levels=1, rewind="auto"), sweep)
    assert not list(results_root.glob("imp_*"))
    result = run_imp(cfg, imp_settings(levels=1, rewind="auto"),
                     instability_settings(rewind_points=["independent", "5it", "10it"], alphas=3, threshold=1e-9))
    assert result.rewind_step == 10  # never stable at a threshold of 1e-9: the last swept step, not -1


def test_imp_and_sweep_names_from_before_alignment_are_kept():
    """Hashes computed at commit 16239be, before alignment settings existed: the same settings keep them."""
    from stability.config import settings_hash
    from stability.presets import get_preset
    from stability.stages.imp import imp_key, imp_settings

    cfg = get_preset("lenet5_mnist5k")
    sweep = instability_settings(rewind_points=["0it", "5it"], siblings=3)
    got = [settings_hash(imp_key(cfg, imp, sweep)) for imp in
           (imp_settings(rewind="auto"), imp_settings(rewind="0", instability=True), imp_settings(rewind="0"))]
    assert got == ["d0aa28316cca", "2f3682d7bb46", "615ec317adf3"]
    assert settings_hash(sweep_key(cfg, instability_settings(siblings=3), [0, 5])) == "bdd17ac4e9d4"
    # a subset size or seed without alignment or REPAIR computes nothing different: the same name
    assert sweep_key(cfg, instability_settings(align_examples=50, align_seed=3), [0]) == \
        sweep_key(cfg, InstabilitySettings(), [0])


def test_a_trunk_that_is_one_points_own_and_anothers_independent_network_is_one_unit(tmp_path):
    from stability.grid.plan import load_grid, make_plan
    from stability.grid.status import grid_frame

    path = tmp_path / "g.toml"
    path.write_text('preset = "lenet300_mnist5k"\nstages = ["instability"]\n[set]\n"training.steps" = "40it"\n'
                    '[axes]\n"training.init_seed" = [0, 1]\n"training.noise_seed" = [0, 1]\n'
                    '[instability]\nrewind_points = ["independent", "5it"]\n')
    plan = make_plan(load_grid(path, {"runtime.results_root": str(tmp_path / "r")}))
    trains = [u for u in plan.units if u.kind == "train"]
    own = [u for u in trains if "independent_of" not in u.args]
    assert len(own) == 4  # every point keeps its own trunk unit, with its rewind checkpoint
    assert all(5 in u.args["extra_checkpoints"] for u in own)
    frame = grid_frame(plan)
    assert len(frame) == 4 and list(frame["train_status"]) == ["missing"] * 4


def test_connect_treats_dropout_as_training_noise_not_architecture(results_root):
    from stability.stages.trunk import train_trunk

    cfg = _cfg(results_root)
    plain = train_trunk(cfg)
    dropped = train_trunk(cfg.with_overrides({"model.dropout": "0.5"}))
    result = connect(plain.run_dir, dropped.run_dir, connect_settings(alphas=3, align="weights"))
    assert result.barriers["test"] == result.barriers["test"]  # measured, not refused


def test_the_stages_needs_are_the_units_a_grid_plans(tmp_path):
    """Walking ``needs()`` from a sweep (with independent networks) and a Hessian track finds exactly the runs the
    grid planner lists for the point, and each planned unit depends only on runs its stage needs."""
    from stability.config import from_dict
    from stability.grid.plan import load_grid, make_plan
    from stability.hessian import hessian_settings
    from stability.stages.base import stage_dir
    from stability.stages.context import prepare
    from stability.stages.instability import SWEEP_STAGE
    from stability.stages.landscape import TRACK_STAGE
    from stability.stages.siblings import SIBLINGS_STAGE
    from stability.stages.trunk import trunk_dir

    path = tmp_path / "g.toml"
    path.write_text('preset = "lenet300_mnist5k"\nstages = ["instability", "hessian"]\n[set]\n'
                    '"training.steps" = "40it"\n"model.width" = 0.25\n[instability]\n'
                    'rewind_points = ["independent", "5it", "10it"]\nsiblings = 3\n[hessian]\ntop_k = 1\n'
                    'at = ["5it", "40it"]\n')
    plan = make_plan(load_grid(path, {"runtime.results_root": str(tmp_path / "r")}))
    own = next(u for u in plan.units if u.kind == "train" and "independent_of" not in u.args)
    ctx = prepare(from_dict(own.config))
    stages = {"siblings": SIBLINGS_STAGE}

    def walk(stage, ctx, settings, **args) -> dict[str, set[str]]:
        """run id -> the ids of the runs it needs, for a run and everything under it."""
        me = stage_dir(stage, ctx, settings, **args).path.name
        graph = {me: set()}
        for need in stage.needs(ctx, settings, **args):
            if need.kind == "train":
                graph[me].add(trunk_dir(need.cfg).path.name)
                graph.setdefault(trunk_dir(need.cfg).path.name, set())
                continue
            sub = walk(stages[need.kind], prepare(need.cfg), need.settings, **need.args)
            graph[me].add(stage_dir(stages[need.kind], prepare(need.cfg), need.settings, **need.args).path.name)
            graph.update(sub)
        return graph

    graph = {**walk(SWEEP_STAGE, ctx, instability_settings(rewind_points=["independent", "5it", "10it"], siblings=3)),
             **walk(TRACK_STAGE, ctx, hessian_settings(top_k=1), at=["5it", "40it"])}
    assert set(graph) == {u.id for u in plan.units}
    for unit in plan.units:
        assert set(unit.deps) <= graph[unit.id], unit.id


def test_composed_settings_read_flat_names_and_write_them_back_flat():
    """Sweep and connect settings hold their siblings' and curve settings; tables, errors, keys and records name
    every setting flat, as before the settings were composed."""
    from stability.config.nested import flat_settings
    from stability.stages.siblings import SiblingSettings

    settings = instability_settings({"siblings": 3, "alphas": "11", "align": "weights"}, noise="data_order")
    assert settings.siblings == SiblingSettings(siblings=3, noise="data_order")  # `siblings` is the count
    assert (settings.curve.alphas, settings.curve.align, settings.curve.aligned) == (11, "weights", True)
    assert list(flat_settings(settings)) == [
        "rewind_points", "siblings", "noise", "optimizer_state", "sibling_seed", "alphas", "alpha_grid", "bn",
        "bn_batches", "splits", "threshold", "chance_margin", "align", "repair", "align_examples", "align_seed"]
    assert instability_settings(flat_settings(settings)) == settings  # what a grid unit ships reads back
    assert list(flat_settings(connect_settings()))[:8] == ["align", "repair", "alphas", "splits", "bn",
                                                            "align_examples", "align_seed", "allow_different_masks"]
    assert connect_settings(align="weights", alphas=5).curve == CurveSettings(alphas=5, align="weights")
    # each error names the setting as the user wrote it, in the table it was read from
    for make, section in ((instability_settings, "instability"), (connect_settings, "connect")):
        with pytest.raises(ConfigError, match=rf"^{section}\.alphas: need at least 2"):
            make(alphas=1)
        with pytest.raises(ConfigError, match=rf"^{section}\.align: unknown method 'twist'"):
            make(align="twist")
        with pytest.raises(ConfigError, match=rf"^{section}\.bn_seed: unknown setting"):
            make(bn_seed=1)  # fixed by the package: no table sets it
    with pytest.raises(ConfigError, match=r"^instability\.siblings: need at least 2"):
        instability_settings(siblings=1)
