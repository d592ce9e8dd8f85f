"""The stages' shared parts (``stability.stages.base``): one run lifecycle, one naming rule, one tensor digest."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, make_dataclass

import pytest
import torch

from stability.config import SECTIONS, settings_hash
from stability.config.nested import flat_paths
from stability.errors import RecordError, StabilityError, TrainingDiverged
from stability.hessian import HessianSettings
from stability.presets import get_preset
from stability.stages.base import LEGACY_NAMED, mask_digest, run_once, settings_key
from stability.stages.connect import ConnectSettings
from stability.stages.imp import ImpSettings
from stability.stages.instability import InstabilitySettings, instability_settings
from stability.stages.siblings import SiblingSettings
from stability.store.files import RunDir, read_json, short_digest, tensors_digest


# ---------------------------------------------------------------- run_once
class Calls:
    """A stage whose load, start and compute record that they were called."""

    def __init__(self, loaded=None, load_error=None, diverge=False):
        self.calls: list[str] = []
        self.loaded, self.load_error, self.diverge = loaded, load_error, diverge

    def load(self, run):
        self.calls.append("load")
        if self.load_error is not None:
            raise self.load_error
        return self.loaded

    def start(self, run):
        self.calls.append("start")
        run.start({"x": 1}, {"x": 1})
        return "started"

    def compute(self, run, started):
        self.calls.append(f"compute({started})")
        assert run.status() == "running"  # the running manifest is written before anything is computed
        if self.diverge:
            raise TrainingDiverged("training diverged: loss is nan", step=7, member=1, tensor="loss")
        return "computed"

    def __call__(self, run, **kw):
        return run_once(run, load=self.load, start=self.start, compute=self.compute, **kw)


def test_a_new_run_is_started_computed_and_marked_complete(tmp_path):
    run = RunDir(tmp_path, "x", "000000000001")
    stage = Calls()
    assert stage(run, timed=True) == "computed"
    assert stage.calls == ["start", "compute(started)"]  # nothing to load yet
    manifest = read_json(run.manifest_path)
    assert manifest["status"] == "complete" and isinstance(manifest["seconds"], float)
    untimed = RunDir(tmp_path, "x", "000000000002")
    Calls()(untimed)
    assert "seconds" not in read_json(untimed.manifest_path)


def test_a_finished_run_is_loaded_not_computed(tmp_path):
    run = RunDir(tmp_path, "x", "000000000001")
    Calls()(run)
    again = Calls(loaded="from disk")
    assert again(run) == "from disk" and again.calls == ["load"]


@pytest.mark.parametrize("damage", [None, RecordError("record 'r.csv' is truncated or corrupt")],
                         ids=["load-gives-none", "load-raises"])
def test_a_finished_run_with_damaged_records_is_computed_again_with_a_warning(tmp_path, capsys, damage):
    run = RunDir(tmp_path, "x", "000000000001")
    Calls()(run)
    capsys.readouterr()
    again = Calls(loaded=None, load_error=damage)
    assert again(run) == "computed" and again.calls == ["load", "start", "compute(started)"]
    err = capsys.readouterr().err
    assert f"finished run {run.path.name}" in err and "computing it again" in err
    assert (str(damage) if damage else "missing or damaged") in err
    assert run.status() == "complete"


def test_a_diverged_compute_marks_the_run_and_every_rerun_raises_without_computing(tmp_path):
    run = RunDir(tmp_path, "x", "000000000001")
    with pytest.raises(TrainingDiverged):
        Calls(diverge=True)(run)
    manifest = read_json(run.manifest_path)
    assert manifest["status"] == "diverged" and manifest["divergence"]["step"] == 7
    rerun = Calls()
    with pytest.raises(TrainingDiverged) as caught:
        rerun(run)
    assert rerun.calls == [] and caught.value.step == 7 and caught.value.tensor == "loss"


def test_reuse_is_checked_for_the_code_that_made_the_run_before_loading(tmp_path):
    run = RunDir(tmp_path, "x", "000000000001")
    Calls()(run)
    manifest = read_json(run.manifest_path)
    manifest["versions"]["stability"] = "0.0.1"
    run.manifest_path.write_text(json.dumps(manifest))
    refused = Calls(loaded="from disk")
    with pytest.raises(StabilityError, match="accept_other_versions"):
        refused(run, accept_other_versions=False)
    assert refused.calls == []
    assert Calls(loaded="from disk")(run) == "from disk"


# ---------------------------------------------------------------- settings_key
def test_settings_key_is_the_rule_of_config_hashed_dict():
    """Fields at their defaults (and UNHASHED ones) drop out: a Config's sections give its hashed_dict."""
    for cfg in (get_preset("lenet300_mnist5k"), get_preset("resnet20_cifar10"),
                get_preset("lenet300_mnist5k").with_overrides({"training.rewind_points": ["5it"],
                                                               "runtime.threads": "3", "model.hidden": [50, 20]})):
        sections = {name: settings_key(getattr(cfg, name)) for name in SECTIONS}
        assert json.dumps({k: v for k, v in sections.items() if v}, sort_keys=True) == \
            json.dumps(cfg.hashed_dict(), sort_keys=True)


def test_a_field_added_later_at_its_default_renames_nothing():
    """Why the legacy lists name fields and not 'every field': a new field, at its default, must not rename runs."""
    for base, legacy in ((InstabilitySettings, "instability"), (HessianSettings, "hessian"),
                         (SiblingSettings, "hessian.siblings"), (ConnectSettings, "connect"), (ImpSettings, "imp")):
        grown = make_dataclass(f"Grown{base.__name__}", [("later", int, field(default=0))], bases=(base,), frozen=True)
        assert settings_key(grown(), legacy=legacy) == settings_key(base(), legacy=legacy)
        assert settings_key(grown(later=3), legacy=legacy) == {**settings_key(base(), legacy=legacy), "later": 3}


def test_legacy_fields_are_named_at_every_value_and_the_others_only_when_changed():
    key = settings_key(InstabilitySettings(), legacy="instability")
    assert set(key) == set(LEGACY_NAMED["instability"])  # alignment fields at their defaults drop out
    key = settings_key(instability_settings(align="weights", alpha_grid=[0.0, 1.0]), drop=("threshold",),
                       legacy="instability")
    assert key["align"] == "weights" and "threshold" not in key and "repair" not in key
    assert settings_key(instability_settings(alpha_grid=[]), legacy=None) == {}  # a TOML [] is the default ()


def test_the_legacy_table_names_only_real_fields():
    owners = {"siblings": SiblingSettings, "instability": InstabilitySettings, "imp": ImpSettings,
              "hessian": HessianSettings, "hessian.siblings": SiblingSettings, "connect": ConnectSettings,
              "connect.model": SECTIONS["model"]}
    from stability.stages.earlybird import EarlybirdSettings

    owners["earlybird"] = EarlybirdSettings
    assert set(owners) == set(LEGACY_NAMED)
    for legacy, cls in owners.items():
        assert set(LEGACY_NAMED[legacy]) <= set(flat_paths(cls)), legacy
    with pytest.raises(TypeError, match="no field 'treshold'"):
        settings_key(InstabilitySettings(), drop=("treshold",), legacy="instability")


@dataclass(frozen=True)
class _Toy:
    a: int = 1
    b: tuple[int, ...] = ()


def test_settings_key_drops_defaults_and_names_changes():
    assert settings_key(_Toy()) == {}
    assert settings_key(_Toy(a=2, b=(1,))) == {"a": 2, "b": (1,)}
    assert settings_hash(settings_key(_Toy(b=[1]))) == settings_hash(settings_key(_Toy(b=(1,))))


# ---------------------------------------------------------------- digests
def test_one_short_tensor_digest_and_the_legacy_mask_digest():
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    assert short_digest(tensors) == tensors_digest(tensors)[:16] and short_digest(None) is None
    assert short_digest({"w": tensors["w"].reshape(3, 2), "b": tensors["b"]}) != short_digest(tensors)  # shape counts
    masks = {"w": (torch.arange(6) % 2).float().reshape(2, 3)}
    # the legacy mask digest hashes names and uint8 bytes only (pinned: sibling sets and sparse sweeps use it)
    assert mask_digest(masks) == mask_digest({"w": masks["w"].bool().reshape(6)}) == "3d1c0ef6b1d0df05"
    assert mask_digest(None) is None and mask_digest({}) is None


# ---------------------------------------------------------------- the trunk and IMP as stages
def test_the_trunk_and_imp_are_stages_whose_needs_a_planner_walks(tmp_path):
    from stability.stages.base import Need, stage_dir
    from stability.stages.context import prepare
    from stability.stages.imp import IMP_STAGE, imp_dir, imp_settings
    from stability.stages.instability import instability_settings
    from stability.stages.trunk import TRUNK_STAGE, trunk_dir

    cfg = get_preset("lenet300_mnist5k").with_overrides({"runtime.results_root": str(tmp_path),
                                                         "training.steps": "40it", "training.rewind_points": ["5it"]})
    ctx = prepare(cfg)
    assert stage_dir(TRUNK_STAGE, ctx, None).path == trunk_dir(cfg).path and TRUNK_STAGE.needs(ctx, None) == []
    sweep = instability_settings(rewind_points=["5it"])
    fixed, auto = imp_settings(rewind="10it"), imp_settings(rewind="auto")
    assert IMP_STAGE.needs(ctx, fixed, sweep=sweep) == [Need("train", cfg, None, {"extra_checkpoints": [10]})]
    # the rewind step of ``auto`` is known only once the sweep is done: the sweep is needed, no checkpoint
    assert IMP_STAGE.needs(ctx, auto, sweep=sweep) == [Need("train", cfg, None, {"extra_checkpoints": []}),
                                                       Need("instability", cfg, sweep)]
    for settings in (fixed, auto):
        assert stage_dir(IMP_STAGE, ctx, settings, sweep=sweep).path == imp_dir(cfg, settings, sweep).path
    assert not any(tmp_path.iterdir())  # naming and needs write nothing
