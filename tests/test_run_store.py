"""The run store: names that reproduce their hashes, sparse sweeps named by their contents, the schema."""
from __future__ import annotations

from pathlib import Path

import torch
from helpers import tiny_config

from stability.config import settings_hash
from stability.stages.context import prepare
from stability.stages.imp import imp_settings, run_imp
from stability.stages.instability import instability_settings, instability_sweep
from stability.stages.landscape import hessian_settings, hessian_track
from stability.stages.trunk import trunk_checkpoint
from stability.store import schema
from stability.store.files import PointTable, read_csv, read_json


def test_every_manifest_records_the_settings_that_reproduce_its_hash(results_root):
    cfg = tiny_config(results_root)
    settings = instability_settings(rewind_points=["5it"], siblings=2, alphas=3)
    instability_sweep(cfg, settings)
    run_imp(cfg, imp_settings(levels=1, rewind="auto", instability=True), settings)
    hessian_track(cfg, hessian_settings(top_k=1, samples=50), at=["5it"])
    kinds = set()
    for manifest_path in results_root.glob("*/" + schema.MANIFEST):
        manifest = read_json(manifest_path)
        kinds.add(manifest["kind"])
        assert settings_hash(manifest["hashed_settings"]) == manifest["hash"], manifest_path
        assert manifest_path.parent.name == f"{manifest['kind']}_{manifest['hash']}"
    assert kinds == set(schema.RUN_KINDS)


def _sparse_sweep(cfg, ctx, masks, label):
    start = trunk_checkpoint(ctx, 5)
    settings = instability_settings(rewind_points=["5it"], siblings=2, alphas=3)
    return instability_sweep(cfg, settings, ctx=ctx, masks=masks, start_states={5: start}, label=label)


def test_two_different_masks_give_two_different_sweeps_even_with_one_label(results_root):
    cfg = tiny_config(results_root)
    ctx = prepare(cfg)
    names = [n for n, p in ctx.model.named_parameters() if n.endswith("weight")]
    g = torch.Generator().manual_seed(0)
    m1 = {n: (torch.rand(dict(ctx.model.named_parameters())[n].shape, generator=g) > 0.5).float() for n in names}
    m2 = {n: (torch.rand(m1[n].shape, generator=g) > 0.9).float() for n in names}
    first = _sparse_sweep(cfg, ctx, m1, "same-label")
    second = _sparse_sweep(cfg, ctx, m2, "same-label")
    assert first.run_dir != second.run_dir
    assert first.curves != second.curves  # measured for m2, not read back from m1's sweep
    again = _sparse_sweep(cfg, ctx, m1, "same-label")
    assert again.run_dir == first.run_dir and again.curves == first.curves


def test_point_table_reads_back_finished_points_and_writes_after_each(tmp_path):
    path = tmp_path / "points.csv"
    table = PointTable(path, "step", ["step", "value"])
    table.add([{"step": 0, "value": 1.5}])
    table.add([{"step": 10, "value": 2.5}])
    assert read_csv(path) == [{"step": 0, "value": 1.5}, {"step": 10, "value": 2.5}]
    again = PointTable(path, "step", ["step", "value"])
    assert again.done(10) == [{"step": 10, "value": 2.5}] and again.done(20) == []
    again.keep([10, 0])
    assert [r["step"] for r in again.rows] == [10, 0]
    path.write_text("step,value\n0,1.5\n10\n")  # a torn row
    damaged = PointTable(path, "step", ["step", "value"])
    assert damaged.rows == [] and Path(str(path) + ".corrupt").is_file()


def test_no_file_name_of_the_schema_is_spelled_elsewhere():
    root = Path(__file__).resolve().parents[1]
    names = [schema.METRICS, schema.SUMMARY, schema.CURVES, schema.SWEEP, schema.INSTABILITY_SUMMARY, schema.LEVELS,
             schema.IMP_SUMMARY, schema.LEVEL_RECORD, schema.HESSIAN_TABLE, schema.DENSITY_TABLE,
             schema.HESSIAN_SUMMARY, schema.MANIFEST, schema.FINAL_STATE]
    offenders = []
    for folder in ("stability", "analysis"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "schema.py":
                continue
            text = path.read_text()
            offenders += [f"{path.relative_to(root)}: {name}" for name in names if f'"{name}"' in text]
    assert offenders == []
