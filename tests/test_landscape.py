from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY_ARGS, tiny_config

from stability.apps.cli import main
from stability.hessian import HessianOperator, select_subset
from stability.stages.checkpoints import load_weights
from stability.stages.context import prepare
from stability.stages.landscape import (
    config_from_run,
    hessian_path,
    hessian_settings,
    hessian_track,
)
from stability.stages.trunk import train_trunk
from stability.store.files import read_csv


def test_track_writes_one_row_per_checkpoint_and_matches_a_direct_probe(results_root):
    cfg = tiny_config(results_root)
    settings = hessian_settings(top_k=2, smallest=True, trace_probes=5, density=True, density_steps=20, samples=200)
    track = hessian_track(cfg, settings)
    rows = read_csv(track.run_dir / "hessian.csv")
    assert [r["step"] for r in rows] == [0, 5, 10, 30]
    assert all(r["lambda_1"] >= r["lambda_2"] > r["lambda_min"] for r in rows)
    density = read_csv(track.run_dir / "density.csv")
    assert {r["step"] for r in density} == {0, 5, 10, 30}
    summary = json.loads((track.run_dir / "hessian.json").read_text())
    assert summary["edge_of_stability"] is None  # Adam: no 2/lr line
    # Independent check: the dense Hessian of the same loss on the same subset at step 30.
    ctx = prepare(cfg)
    model = ctx.new_model()
    model.load_state_dict(load_weights(track.run_dir.parent / f"train_{cfg.run_hash()}", 30))
    xs, ys = select_subset(ctx.data.x_train, ctx.data.y_train, 200, 0)
    # A 2-layer slice is too big for a dense Hessian, so compare λ1 with power iteration on the operator.
    op = HessianOperator(model, xs, ys)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    for _ in range(300):
        v = op.matvec(v)
        v = v / v.norm()
    lam = float(torch.dot(v, op.matvec(v)))
    assert rows[-1]["lambda_1"] == pytest.approx(lam, rel=1e-3)


def test_track_every_k_replays_missing_checkpoints_and_resumes(results_root):
    cfg = tiny_config(results_root)
    settings = hessian_settings(top_k=1, samples=100)
    track = hessian_track(cfg, settings, at=(), every="15it")
    assert [r["step"] for r in track.rows] == [0, 15, 30]
    # A crash after the first point: the rerun computes only the missing ones.
    rows = read_csv(track.run_dir / "hessian.csv")
    from stability.store.files import write_csv

    write_csv(track.run_dir / "hessian.csv", rows[:1])
    again = hessian_track(cfg, settings, at=(), every="15it")
    assert [r["step"] for r in again.rows] == [0, 15, 30]
    assert again.rows[1]["lambda_1"] == pytest.approx(rows[1]["lambda_1"], rel=1e-6)
    # finished: reused as it was written, nothing probed or rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in track.run_dir.iterdir()}
    third = hessian_track(cfg, settings, at=(), every="15it")
    assert [r["lambda_1"] for r in third.rows] == [r["lambda_1"] for r in read_csv(track.run_dir / "hessian.csv")]
    assert {p.name: p.stat().st_mtime_ns for p in track.run_dir.iterdir()} == stamps


def test_path_probe_with_batchnorm(results_root):
    cfg = tiny_config(results_root, preset="resnet8_mnist5k", model__width="0.25", training__steps="6it",
                      training__rewind_points="2it")
    track = hessian_path(cfg, hessian_settings(top_k=1, samples=64), 2, alphas=[0.0, 0.5, 1.0], bn_batches=2)
    assert [r["alpha"] for r in track.rows] == [0.0, 0.5, 1.0]
    assert all(r["lambda_1"] > 0 for r in track.rows)


def test_masked_probe_has_no_component_on_pruned_coordinates(results_root):
    cfg = tiny_config(results_root)
    ctx = prepare(cfg)
    model = ctx.new_model()
    masks = {n: (torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.7).float()
             for n, p in model.named_parameters() if n.endswith("weight")}
    x, y = ctx.data.x_train[:50], ctx.data.y_train[:50]
    op = HessianOperator(model, x, y, masks=masks)
    assert op.dim == sum(int(m.sum()) for m in masks.values()) + sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith("weight"))
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    components = op.to_full(op.matvec(v))
    for name, m in masks.items():
        assert torch.all(components[name][m == 0] == 0)  # no component on pruned coordinates
        assert torch.count_nonzero(components[name][m == 1]) > 0  # (zero where an input pixel is always 0)
    # and on the survivors it is the survivor block of the full Hessian of the masked network
    masked_model = ctx.new_model()
    masked_model.load_state_dict({k: v * masks[k] if k in masks else v for k, v in model.state_dict().items()})
    full = HessianOperator(masked_model, x, y)
    embedded = op.to_full(v)
    reference = full.to_full(full.matvec(torch.cat([embedded[n].flatten() for n in full.names])))
    for name, m in masks.items():
        assert torch.allclose(components[name][m == 1], reference[name][m == 1], rtol=1e-4, atol=1e-6)


def test_cli_hessian_on_a_run_directory(results_root, capsys):
    cfg = tiny_config(results_root)
    result = train_trunk(cfg)
    assert config_from_run(result.run_dir).run_hash() == cfg.run_hash()
    code = main(["hessian", str(result.run_dir), "--top", "2", "--trace", "--trace-probes", "3", "--samples", "100",
                 "--at", "0it,30it"])
    out = capsys.readouterr().out
    assert code == 0 and "lambda_2" in out and "30it" in out


def test_cli_hessian_pyhessian_engine_agrees_with_native(results_root, capsys):
    args = ["hessian", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), "--at", "30it",
            "--samples", "100", "--json", "--quiet"]
    assert main(args) == 0
    native = json.loads(capsys.readouterr().out)["rows"][0]["lambda_1"]
    assert main(args + ["--engine", "pyhessian"]) == 0
    reference = json.loads(capsys.readouterr().out)["rows"][0]["lambda_1"]
    assert native == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize("flags, match", [
    (["--top", "100000"], "hessian.top_k"),
    (["--samples", "0"], "hessian.samples"),
    (["--engine", "jax"], "native | pyhessian"),
    (["--at", "31it"], "past the final step"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(results_root, capsys, flags, match):
    code = main(["hessian", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), *flags])
    assert code == 2
    assert match in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_truncated_checkpoint_is_reported_and_replayed_never_used(results_root, capsys):
    cfg = tiny_config(results_root)
    result = train_trunk(cfg)
    path = result.run_dir / "checkpoints" / "step_5.safetensors"
    intact = load_weights(result.run_dir, 5)
    path.write_bytes(path.read_bytes()[:-50])
    code = main(["hessian", str(result.run_dir), "--at", "5it", "--samples", "50", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    assert str(path) in captured.err and "truncated" in captured.err  # reported with its path
    assert (path.parent / "step_5.safetensors.corrupt").is_file()  # moved aside, never used
    replayed = load_weights(result.run_dir, 5)
    assert all(torch.equal(intact[k], replayed[k]) for k in intact)  # exact replay
    rows = json.loads(captured.out)["rows"]
    assert [r["step"] for r in rows] == [5] and math.isfinite(rows[0]["lambda_1"])
