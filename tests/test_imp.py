from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_ARGS, tiny_config

from stability.apps.cli import main
from stability.maths.pruning import layer_densities
from stability.stages.checkpoints import load_weights
from stability.stages.context import prepare
from stability.stages.imp import imp_settings, run_imp
from stability.stages.trunk import trunk_dir
from stability.store.files import load_tensors, read_csv, read_json


def _masks(result, level, replicate=0):
    masks, _ = load_tensors(result.run_dir / "masks" / f"replicate_{replicate}_level_{level}.safetensors")
    return masks


def _final(result, level, member, replicate=0):
    t, _ = load_tensors(result.run_dir / f"replicate_{replicate}" / f"level_{level}" / "final.safetensors")
    return {k[6:]: v[member] for k, v in t.items() if k.startswith("param/")}


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imp")
    cfg = tiny_config(root, optimizer__name="sgd", optimizer__lr="0.05", optimizer__momentum="0.9",
                      optimizer__weight_decay="1e-3")
    settings = imp_settings(levels=2, rewind="5it", baselines=["reinit", "random"], strategy="layerwise",
                            rate_overrides={"output": 0.1})
    return cfg, settings, run_imp(cfg, settings)


def test_levels_table_and_density(imp_run):
    _cfg, _settings, result = imp_run
    rows = result.levels
    assert [(r["level"], r["kind"]) for r in rows] == [(0, "imp"), (1, "imp"), (1, "reinit"), (1, "random"),
                                                       (2, "imp"), (2, "reinit"), (2, "random")]
    on_disk = read_csv(result.run_dir / "levels.csv")
    assert len(on_disk) == 7 and on_disk[1]["kind"] == "imp"
    masks = _masks(result, 2)
    dens = layer_densities(masks)
    # Layerwise: hidden layers at 0.8^2, the output layer at half rate 0.9^2 (up to rounding of counts).
    assert dens["fc.0.weight"] == pytest.approx(0.64, abs=2e-3)
    assert dens["fc.2.weight"] == pytest.approx(0.81, abs=2e-2)
    summary = read_json(result.run_dir / "imp.json")
    assert summary["rewind_step"] == 5
    assert {"tickets", "tickets_early_stop", "trajectory_length"} <= set(summary)


def test_pruned_weights_stay_zero_with_momentum_and_weight_decay(imp_run):
    _, _, result = imp_run
    masks = _masks(result, 2)
    final = _final(result, 2, 0)
    for name, m in masks.items():
        assert torch.all(final[name][m == 0] == 0)
        assert torch.count_nonzero(final[name][m == 1]) == int(m.sum())


def test_the_driver_rewinds_survivors_exactly_to_the_rewind_checkpoint(tmp_path, monkeypatch):
    import stability.stages.imp.levels as imp_module

    seen = {}
    real_branch = imp_module.train_branch

    def spy(ctx, run, start, end_step, **kw):
        # the driver's own start state of each level (member 0 = the IMP network); the loop zeroes the
    # pruned coordinates before the first step
        seen[int(run.hash)] = ({k: v[0].clone() for k, v in start.params.items()}, start.step,
                               {k: v[0].clone() for k, v in kw["masks"].items()})
        return real_branch(ctx, run, start, end_step, **kw)

    monkeypatch.setattr(imp_module, "train_branch", spy)
    cfg = tiny_config(tmp_path, optimizer__name="sgd", optimizer__lr="0.05", optimizer__momentum="0.9")
    result = run_imp(cfg, imp_settings(levels=2, rewind="5it"))
    rewind = load_weights(trunk_dir(cfg), 5)
    final_dense = load_weights(trunk_dir(cfg), 30)
    assert sorted(seen) == [1, 2]
    for level, (start, step, masks) in seen.items():
        assert step == 5  # the rewind step, not 0 and not the end of the previous level
        assert torch.equal(masks["fc.0.weight"], _masks(result, level)["fc.0.weight"])
        for name, w in start.items():
            m = masks.get(name)
            if m is None:  # unpruned tensors (biases) are rewound too
                assert torch.equal(w, rewind[name])
                continue
            assert torch.equal(w[m == 1], rewind[name][m == 1])  # survivors: their rewind values exactly
            assert not torch.equal(w[m == 1], final_dense[name][m == 1])  # not the trained weights
    # the level's first metrics row is the accuracy of that rewound sparse network, evaluated here by hand
    start, _, masks = seen[2]
    ctx = prepare(cfg)
    model = ctx.new_model()
    model.load_state_dict({**rewind, **{k: v * masks[k] if k in masks else v for k, v in start.items()}})
    model.eval()
    with torch.no_grad():
        error = float((model(ctx.data.x_test).argmax(1) != ctx.data.y_test).double().mean())
    row = next(r for r in read_csv(result.run_dir / "replicate_0" / "level_2" / "metrics.csv") if r["member"] == 0)
    assert row["step"] == 5 and row["test_error"] == pytest.approx(error, abs=1e-12)


def test_reinit_shares_the_mask_but_not_the_weights_and_random_matches_layer_densities(imp_run):
    _, _, result = imp_run
    masks = _masks(result, 1)
    imp_w, reinit_w, random_w = (_final(result, 1, i) for i in range(3))
    for name, m in masks.items():
        assert torch.all(reinit_w[name][m == 0] == 0)  # same mask
        assert not torch.equal(reinit_w[name], imp_w[name])  # different weights
        alive_random = (random_w[name] != 0).float()
        assert int(alive_random.sum()) <= int(m.sum())
        assert not torch.equal(alive_random, m)
    rows = {r["kind"]: r for r in result.levels if r["level"] == 1}
    assert rows["random"]["density"] == pytest.approx(rows["imp"]["density"])


def test_rerun_reuses_the_finished_run(imp_run):
    cfg, settings, result = imp_run
    stamp = (result.run_dir / "imp.json").stat().st_mtime_ns
    again = run_imp(cfg, settings)
    assert again.levels == read_csv(result.run_dir / "levels.csv")
    assert (result.run_dir / "imp.json").stat().st_mtime_ns == stamp


def test_kill_at_level_boundary_and_mid_level_resumes_to_the_same_results(tmp_path, imp_run):
    cfg0, settings, reference = imp_run
    cfg = cfg0.with_overrides({"runtime.results_root": str(tmp_path)})
    first = run_imp(cfg, settings)
    # Level boundary: level 2 never happened. Mid-level: level 2 has only its rolling state at step 15.
    level2 = first.run_dir / "replicate_0" / "level_2"
    for name in ("record.json", "final.safetensors"):
        (level2 / name).unlink()
    (first.run_dir / "imp.json").unlink()
    manifest = read_json(first.run_dir / "manifest.json")
    manifest["status"] = "running"
    (first.run_dir / "manifest.json").write_text(json.dumps(manifest))
    resumed = run_imp(cfg, settings)
    assert resumed.levels == reference.levels

    latest = level2 / "state" / "latest.safetensors"
    assert latest.is_file()  # the rolling state from mid-level
    for name in ("record.json", "final.safetensors"):
        (level2 / name).unlink()
    (first.run_dir / "imp.json").unlink()
    (first.run_dir / "manifest.json").write_text(json.dumps(manifest))
    _, meta = load_tensors(latest)
    assert 5 < meta["step"] < 30
    again = run_imp(cfg, settings)
    assert again.levels == reference.levels



def test_a_finished_run_without_its_summary_is_rebuilt_from_its_levels(tmp_path, imp_run, capsys):
    cfg0, settings, reference = imp_run
    cfg = cfg0.with_overrides({"runtime.results_root": str(tmp_path)})
    first = run_imp(cfg, settings)
    (first.run_dir / "imp.json").unlink()
    capsys.readouterr()
    again = run_imp(cfg, settings)
    err = capsys.readouterr().err
    assert f"finished run {first.run_dir.name}" in err and "imp.json" in err
    assert "rebuilding its records from the stored levels" in err
    assert again.levels == reference.levels and read_json(first.run_dir / "imp.json")["rewind_step"] == 5
    assert read_json(first.run_dir / "manifest.json")["status"] == "complete"

def test_auto_rewind_uses_the_first_stable_step(results_root):
    from stability.stages.instability import instability_settings

    cfg = tiny_config(results_root)
    result = run_imp(cfg, imp_settings(levels=1, rewind="auto"), instability_settings(alphas=5))
    info = result.summary["rewind"]
    assert info["rewind"] == "auto" and info["swept"] == [5, 10]
    expected = info["first_stable_step"] if info["first_stable_step"] is not None else 10
    assert result.rewind_step == expected


def test_one_shot_prunes_the_dense_network_to_each_density(results_root):
    result = run_imp(tiny_config(results_root), imp_settings(levels=2, one_shot=True, rewind="0"))
    dens = [r["density"] for r in result.levels]
    assert dens == pytest.approx([1.0, 0.8, 0.64], abs=1e-3)


def test_cli_imp_end_to_end(results_root, capsys):
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--levels", "1", "--rewind", "0",
                 "--baselines", "random", "--out", str(results_root), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "best sparse" in out and "success rate" in out and "random" in out


@pytest.mark.parametrize("flags, match", [
    (["--prune-fraction", "1.0"], "imp.prune_fraction"),
    (["--prune-fraction", "0"], "imp.prune_fraction"),
    (["--levels", "0"], "imp.levels"),
    (["--rewind", "30it"], "at or past the final step"),
    (["--rewind", "auto", "--set", "training.rewind_points=[]"], "needs rewind points"),
    (["--strategy", "smallest"], "imp.strategy"),
    (["--baselines", "shuffle"], "imp.baselines"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(results_root, capsys, flags, match):
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), *flags])
    assert code == 2
    assert match in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_replicates_start_from_their_own_initialization(results_root):
    result = run_imp(tiny_config(results_root), imp_settings(levels=1, rewind="0", replicates=2))
    dense = [r for r in result.levels if r["level"] == 0]
    assert len(dense) == 2
    assert dense[0]["final_test_loss"] != dense[1]["final_test_loss"]
    from stability.stages.trunk import trunk_dir as _trunk_dir

    cfg1 = tiny_config(results_root, training__init_seed="1")
    w0 = load_weights(_trunk_dir(tiny_config(results_root)), 0)
    w1 = load_weights(_trunk_dir(cfg1), 0)
    from stability.stages.context import prepare as _prepare

    fresh = _prepare(cfg1).new_model().state_dict()
    assert all(torch.equal(w1[k], fresh[k]) for k in fresh)  # the seed-1 trunk holds seed-1 weights
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_imp_mask_criterion_is_recorded_names_its_own_run_and_changes_the_masks(results_root, capsys):
    from stability.stages.imp import imp_dir
    from stability.stages.instability import InstabilitySettings

    cfg = tiny_config(results_root)
    plain = run_imp(cfg, imp_settings(levels=1))
    moved = run_imp(cfg, imp_settings(levels=1, criterion="movement"))
    assert plain.run_dir != moved.run_dir
    assert imp_dir(cfg, imp_settings(levels=1, criterion="large_final"), InstabilitySettings()).path == plain.run_dir
    assert moved.summary["settings"]["criterion"] == "movement"
    a, _ = load_tensors(plain.run_dir / "masks" / "replicate_0_level_1.safetensors")
    b, _ = load_tensors(moved.run_dir / "masks" / "replicate_0_level_1.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert abs(sum(float(v.sum()) for v in a.values()) - sum(float(v.sum()) for v in b.values())) <= len(a)
    before = sorted(p.name for p in results_root.iterdir())
    assert main(["imp", "--preset", "lenet300_mnist5k", "--out", str(results_root), "--criterion", "largest"]) == 2
    assert "imp.criterion: unknown criterion 'largest'" in capsys.readouterr().err
    assert main(["imp", "--preset", "lenet300_mnist5k", "--out", str(results_root), "--strategy", "lamp",
                 "--criterion", "movement"]) == 2
    assert "applies to strategies global and layerwise" in capsys.readouterr().err
    assert sorted(p.name for p in results_root.iterdir()) == before


def test_imp_mask1_action_starts_the_ticket_from_its_values_and_names_its_own_run(results_root):
    from stability.stages.checkpoints import load_members
    from stability.stages.context import prepare as prepare_ctx

    cfg = tiny_config(results_root)
    plain = run_imp(cfg, imp_settings(levels=1))
    const = run_imp(cfg, imp_settings(levels=1, mask1="constant"))
    assert plain.run_dir != const.run_dir and const.summary["settings"]["mask1"] == "constant"
    # the trained tickets differ (they started from other values under the same mask and data order)
    ctx = prepare_ctx(cfg)
    a = load_members(plain.run_dir / "replicate_0" / "level_1" / "final.safetensors", ctx).member_state_dict(0)
    b = load_members(const.run_dir / "replicate_0" / "level_1" / "final.safetensors", ctx).member_state_dict(0)
    assert not torch.equal(a["fc.0.weight"], b["fc.0.weight"])
    with pytest.raises(Exception, match="imp.mask1: unknown action"):
        imp_settings(mask1="keep")


@pytest.mark.slow
def test_supermasks_of_large_final_same_sign_with_constant_weights_are_far_above_chance(results_root):
    """Zhou et al. (2019): a mask alone, on untrained ±σ weights, classifies MNIST (86% for their FC net)."""
    from stability.presets import get_preset

    cfg = get_preset("lenet300_mnist5k").with_overrides({"runtime.results_root": str(results_root),
                                                          "runtime.quiet": "true", "runtime.threads": "2"})
    result = run_imp(cfg, imp_settings(levels=1, prune_fraction=0.5, criterion="large_final_same_sign",
                                       mask1="constant", supermask=True))
    (point,) = result.summary["supermask"]
    assert point["level"] == 1 and point["density"] == pytest.approx(0.5, abs=0.01)
    # measured 0.848 untrained at 50% of the weights; chance is about 0.11 (the largest class)
    assert point["supermask_test_accuracy"] > 0.6
    assert "supermask" not in run_imp(cfg, imp_settings(levels=1, prune_fraction=0.5)).summary
