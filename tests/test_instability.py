from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import TINY_ARGS, tiny_config

from stability.apps.cli import main
from stability.engine import StackedModel
from stability.errors import ConfigError
from stability.maths.interpolation import CurveSettings, error_barrier, evaluate_path
from stability.maths.sweep import first_stable_step, sweep_table
from stability.stages.context import prepare
from stability.stages.instability import (
    instability_settings,
    instability_sweep,
)
from stability.stages.siblings import SiblingSettings, sibling_seeds, train_branch, train_siblings
from stability.stages.trunk import train_trunk
from stability.testing.reference import evaluate_path_naive, train_siblings_reference


def test_barrier_formula_by_hand():
    # max 0.30, ends 0.10 and 0.20: 0.30 - 0.15
    assert error_barrier([0.10, 0.30, 0.25, 0.20]) == pytest.approx(0.15)
    assert error_barrier([0.2, 0.1, 0.2]) == pytest.approx(0.0)  # a dip is no barrier


def test_sweep_table_mean_and_std_over_pairs_by_hand():
    curves = []
    for pair, mid in (("0-1", 0.3), ("0-2", 0.5), ("1-2", 0.1)):
        for alpha, err in ((0.0, 0.1), (0.5, mid), (1.0, 0.1)):
            curves.append({"rewind_step": 0, "split": "test", "pair": pair, "alpha": alpha, "error": err,
                           "loss": 2 * err})
    (row,) = sweep_table(curves, threshold=0.02)
    assert row["instability_mean"] == pytest.approx(0.2)  # barriers 0.2, 0.4, 0.0
    assert row["instability_std"] == pytest.approx(0.2)
    assert row["loss_barrier_mean"] == pytest.approx(0.4)
    assert row["pairs"] == 3 and row["stable"] is False


def test_first_stable_step_must_stay_stable():
    steps = [0, 10, 20, 30, 40]
    assert first_stable_step(steps, [0.3, 0.01, 0.05, 0.01, 0.005], 0.02) == 30
    assert first_stable_step(steps, [0.01] * 5, 0.02) == 0
    assert first_stable_step(steps, [0.3, 0.2, 0.1, 0.01, 0.03], 0.02) is None


def test_identical_noise_seeds_give_identical_siblings_and_zero_instability(results_root):
    cfg = tiny_config(results_root)
    ctx = prepare(cfg)
    train_trunk(cfg, ctx=ctx)
    sib = train_siblings(ctx, 5, noise_seeds=[(7, 8), (7, 8)])
    for v in sib.members.params.values():
        assert torch.equal(v[0], v[1])
    from stability.maths.interpolation import curve_rows

    rows = curve_rows(StackedModel(ctx.model), sib.members, ["test"], ctx.data, CurveSettings(), 5)
    (row,) = sweep_table(rows, 0.02)
    assert row["instability_mean"] == 0.0 and row["loss_barrier_mean"] == pytest.approx(0.0, abs=1e-6)


def test_different_noise_changes_siblings_and_seeds_are_recorded(results_root):
    order, aug = sibling_seeds(0, SiblingSettings(siblings=3, noise="data_order"))
    assert len(set(order)) == 3 and len(set(aug)) == 1
    order, aug = sibling_seeds(0, SiblingSettings(siblings=3, noise="augmentation"))
    assert len(set(order)) == 1 and len(set(aug)) == 3
    cfg = tiny_config(results_root)
    ctx = prepare(cfg)
    sib = train_siblings(ctx, 5, SiblingSettings(siblings=2))
    assert any(not torch.equal(v[0], v[1]) for v in sib.members.params.values())
    manifest = json.loads((sib.run_dir / "manifest.json").read_text())
    assert manifest["hashed_settings"]["order_seeds"] == sib.order_seeds


@pytest.mark.parametrize("preset, optimizer", [("lenet300_mnist5k", "adam"), ("conv4_mnist5k", "sgd")])
def test_batched_siblings_match_the_one_at_a_time_reference(results_root, preset, optimizer):
    cfg = tiny_config(results_root, preset=preset, training__steps="12it")
    ctx = prepare(cfg)
    sib = train_siblings(ctx, 5, SiblingSettings(siblings=3))
    ref = train_siblings_reference(ctx, 5, sib.order_seeds, sib.aug_seeds)
    for i, state in enumerate(ref):
        for k, v in state.items():
            torch.testing.assert_close(sib.members.params.get(k, sib.members.buffers.get(k))[i], v,
                                       rtol=1e-4, atol=1e-5)


def test_batched_siblings_with_batchnorm_keep_their_own_statistics(results_root):
    cfg = tiny_config(results_root, preset="resnet8_mnist5k", model__width="0.25", training__steps="8it",
                      training__rewind_points="2it")
    ctx = prepare(cfg)
    sib = train_siblings(ctx, 2, SiblingSettings(siblings=2))
    ref = train_siblings_reference(ctx, 2, sib.order_seeds, sib.aug_seeds)
    for i, state in enumerate(ref):
        for k, v in state.items():
            got = sib.members.params.get(k, sib.members.buffers.get(k))[i]
            torch.testing.assert_close(got, v, rtol=1e-4, atol=1e-5)
    rm = next(k for k in sib.members.buffers if k.endswith("running_mean"))
    assert not torch.equal(sib.members.buffers[rm][0], sib.members.buffers[rm][1])


def test_curve_endpoints_equal_each_siblings_own_error(results_root):
    cfg = tiny_config(results_root)
    ctx = prepare(cfg)
    sib = train_siblings(ctx, 5)
    sm = StackedModel(ctx.model)
    x, y = ctx.data.split("test")
    own_loss, own_err = sm.evaluate(sib.members.params, sib.members.buffers, x, y)
    a, b = sib.members.member_state_dict(0), sib.members.member_state_dict(1)
    errs, losses = evaluate_path(sm, a, b, CurveSettings().grid(), x, y, CurveSettings())
    assert len(errs) == 30
    assert errs[0] == own_err[0].item() and errs[-1] == own_err[1].item()
    assert losses[0] == pytest.approx(own_loss[0].item(), rel=1e-6)


@pytest.mark.parametrize("bn", ["interpolate", "reset"])
def test_batched_alpha_grid_matches_naive_loop_with_batchnorm(results_root, bn):
    cfg = tiny_config(results_root, preset="resnet8_mnist5k", model__width="0.25", training__steps="8it",
                      training__rewind_points="2it")
    ctx = prepare(cfg)
    sib = train_siblings(ctx, 2)
    sm = StackedModel(ctx.model)
    x, y = ctx.data.split("test")
    x, y = x[:300], y[:300]
    settings = CurveSettings(alphas=7, bn=bn, bn_batches=3, bn_batch_size=64, max_members=4)
    a, b = sib.members.member_state_dict(0), sib.members.member_state_dict(1)
    errs, losses = evaluate_path(sm, a, b, settings.grid(), x, y, settings, ctx.data.x_train)
    n_errs, n_losses = evaluate_path_naive(ctx.new_model(), a, b, settings.grid(), x, y, settings, ctx.data.x_train)
    assert errs == pytest.approx(n_errs, abs=1 / 300 + 1e-9)  # at most one borderline example may flip
    assert losses == pytest.approx(n_losses, rel=1e-4)
    if bn == "reset":
        inter = evaluate_path(sm, a, b, settings.grid(), x, y, CurveSettings(alphas=7, bn="interpolate"))[1]
        assert inter != pytest.approx(losses, rel=1e-4)  # the modes really differ


def test_masks_survive_sibling_training_and_interpolation(results_root):
    cfg = tiny_config(results_root, optimizer__name="sgd", optimizer__momentum="0.9",
                      optimizer__weight_decay="1e-3", optimizer__lr="0.05")
    ctx = prepare(cfg)
    g = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(p.shape, generator=g) > 0.5).float() for n, p in ctx.model.named_parameters()
             if n.endswith("weight")}
    sib = train_siblings(ctx, 5, masks=masks)
    for name, m in masks.items():
        assert torch.all(sib.members.params[name][:, m == 0] == 0)
        assert torch.any(sib.members.params[name][:, m == 1] != 0)
    from stability.maths.interpolation import interpolate_stacks

    a, b = sib.members.member_state_dict(0), sib.members.member_state_dict(1)
    mid = interpolate_stacks(a, b, torch.linspace(0, 1, 5, dtype=torch.float64))
    for name, m in masks.items():
        assert torch.all(mid[name][:, m == 0] == 0)


def test_siblings_resume_after_a_kill(tmp_path):
    cfg_a = tiny_config(tmp_path / "a")
    ctx_a = prepare(cfg_a)
    whole = train_siblings(ctx_a, 5)
    # The same siblings, "killed" at step 17: only the rolling state exists, then a rerun.
    cfg_b = tiny_config(tmp_path / "b")
    ctx_b = prepare(cfg_b)
    train_trunk(cfg_b, ctx=ctx_b)
    from stability.stages.checkpoints import checkpoint_path, load_members
    from stability.stages.siblings import start_members
    from stability.stages.trunk import trunk_dir
    from stability.store.files import RunDir

    start = start_members(ctx_b, load_members(checkpoint_path(trunk_dir(cfg_b), 5), ctx_b), 2,
                          whole.order_seeds, whole.aug_seeds, "fresh")
    scratch = RunDir(tmp_path / "scratch", "x", "y")
    scratch.path.mkdir(parents=True)
    train_branch(ctx_b, scratch, start, 17)
    target = tmp_path / "b" / whole.run_dir.name
    (target / "state").mkdir(parents=True)
    os.replace(scratch / "final.safetensors", target / "state" / "latest.safetensors")
    resumed = train_siblings(ctx_b, 5)
    assert resumed.run_dir == target and not resumed.reused
    for k, v in whole.members.params.items():
        assert torch.equal(v, resumed.members.params[k])


def test_sweep_writes_records_and_reuses_siblings(results_root):
    cfg = tiny_config(results_root)
    settings = instability_settings(rewind_points=["0it", "5it", "10it"], splits=["test", "train"], alphas=5)
    result = instability_sweep(cfg, settings)
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"curves.csv", "sweep.csv", "instability.json", "manifest.json"} <= names
    summary = json.loads((result.run_dir / "instability.json").read_text())
    assert summary["rewind_points"] == [0, 5, 10] and summary["threshold"] == 0.02
    assert summary["bn_mode"] == "interpolate"
    assert set(summary["first_stable_step_by_split"]) == {"test", "train"}
    assert len(result.curves) == 3 * 1 * 2 * 5
    finals = sorted(results_root.glob("siblings_*/final.safetensors"))
    records = sorted(p for p in result.run_dir.iterdir() if p.suffix in (".csv", ".json"))
    stamps = [p.stat().st_mtime_ns for p in finals + records]
    again = instability_sweep(cfg, settings)
    assert again.reused and not result.reused and again.summary == summary
    # no sibling trained again, and the finished sweep's records are reused as they were written
    assert len(finals) == 3 and [p.stat().st_mtime_ns for p in finals + records] == stamps
    assert again.table == result.table
    assert again.curves == result.curves  # read back from curves.csv, bit for bit


def test_sweep_rerun_reads_curves_back_and_resumes_after_a_crash(results_root, monkeypatch):
    from stability.stages import instability

    cfg = tiny_config(results_root)
    settings = instability_settings(rewind_points=["0it", "5it", "10it"], alphas=5)
    measured = []
    real = instability.curve_rows

    def counting(sm, members, splits, data, curve_settings, k):
        measured.append(k)
        if k == 10 and crash:
            raise KeyboardInterrupt  # killed while measuring the last rewind point
        return real(sm, members, splits, data, curve_settings, k)

    monkeypatch.setattr(instability, "curve_rows", counting)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        instability_sweep(cfg, settings)
    assert measured == [0, 5, 10]
    crash = False
    resumed = instability_sweep(cfg, settings)
    assert measured == [0, 5, 10, 10]  # only the unfinished point is measured again
    assert [r["rewind_step"] for r in resumed.table] == [0, 5, 10]
    again = instability_sweep(cfg, settings)
    assert measured == [0, 5, 10, 10]  # a finished sweep measures nothing
    assert again.curves == resumed.curves
    # the threshold is not part of the run: a new one re-judges the stored curves
    strict = instability_sweep(cfg, instability_settings(rewind_points=["0it", "5it", "10it"], alphas=5,
                                                         threshold=1e-9))
    assert strict.run_dir == again.run_dir and measured == [0, 5, 10, 10]
    assert strict.first_stable_step is None or all(r["instability_mean"] < 1e-9 for r in strict.table
                                                   if r["rewind_step"] >= strict.first_stable_step)


def test_sweep_makes_missing_trunk_checkpoints(results_root):
    cfg = tiny_config(results_root)
    train_trunk(cfg)
    result = instability_sweep(cfg, instability_settings(rewind_points=["7it"], alphas=3))
    assert result.rewind_steps == [7]


def test_cli_instability_end_to_end(results_root, capsys):
    code = main(["instability", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--rewind", "0it,5it",
                 "--siblings", "2", "--alphas", "5", "--out", str(results_root), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "first stable step (test):" in out and "0it" in out
    code = main(["instability", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--rewind", "0it,5it",
                 "--siblings", "2", "--alphas", "5", "--out", str(results_root), "--quiet", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["rewind_points"] == [0, 5] and "first_stable_step" in data


@pytest.mark.parametrize("flags, match", [
    (["--siblings", "1"], "instability.siblings"),
    (["--rewind", "0it,30it"], "at or past the final step"),
    (["--rewind", "0it,5x"], "malformed step"),
    (["--alphas", "1"], "instability.alphas"),
    (["--threshold", "1.5"], "instability.threshold"),
    (["--threshold", "0"], "instability.threshold"),
    (["--bn", "recompute"], "interpolate, reset"),
    (["--splits", "dev"], "instability.splits"),
    (["--noise", "dropout"], "instability.noise"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(results_root, capsys, flags, match):
    code = main(["instability", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), *flags])
    assert code == 2
    assert match in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_alpha_grid_without_both_ends_is_rejected():
    with pytest.raises(ConfigError, match="include both ends"):
        instability_settings(alpha_grid=(0.0, 0.5, 0.9))
