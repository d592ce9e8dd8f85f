from __future__ import annotations

import pytest

from stability.config import Config, from_dict, validate
from stability.errors import ConfigError
from stability.presets import PRESETS, get_preset, load_toml
from stability.stages.context import prepare


def test_pinned_hashes_never_change_by_accident():
    # If one of these changes, existing result directories stop being found.
    assert Config().run_hash() == "44136fa355b3"
    assert get_preset("lenet300_mnist5k").run_hash() == PINNED["lenet300_mnist5k"]
    assert get_preset("conv4_mnist5k").run_hash() == PINNED["conv4_mnist5k"]


PINNED = {"lenet300_mnist5k": "dffb6baa533a", "conv4_mnist5k": "e6b626812c55"}


def test_unrelated_settings_leave_the_hash_alone():
    base = get_preset("lenet300_mnist5k")
    same = base.with_overrides({
        "runtime.device": "cpu", "runtime.threads": "1", "runtime.results_root": "/elsewhere",
        "runtime.quiet": "true", "dataset.data_root": "/data", "training.checkpoint_every": "7it",
        "training.rewind_points": "0it,3it",
    })
    assert same.run_hash() == base.run_hash()


def test_result_changing_settings_change_the_hash():
    base = get_preset("lenet300_mnist5k")
    for key, value in [("optimizer.lr", "0.01"), ("training.noise_seed", "1"), ("training.init_seed", "2"),
                       ("model.width", "0.5"), ("training.steps", "601it"), ("dataset.split_seed", "3")]:
        assert base.with_overrides({key: value}).run_hash() != base.run_hash(), key


def test_defaults_stay_out_of_the_hash():
    # Setting a field to its default value is the same run as leaving it out.
    assert Config().with_overrides({"optimizer.momentum": "0.0"}).run_hash() == Config().run_hash()


def test_set_values_are_typed():
    cfg = Config().with_overrides({"optimizer.lr": "0.5", "optimizer.nesterov": "true", "model.hidden": "[10, 20]",
                                   "training.rewind_points": "0it,10it", "training.batch_size": "32"})
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.nesterov is True
    assert cfg.model.hidden == (10, 20)
    assert Config().with_overrides({"model.hidden": "512,512"}).model.hidden == (512, 512)  # as --rewind is written
    with pytest.raises(ConfigError, match="model.hidden: expected a list of positive integers"):
        Config().with_overrides({"model.hidden": "512,wide"})
    assert cfg.training.rewind_points == ("0it", "10it")
    assert cfg.training.batch_size == 32


@pytest.mark.parametrize("key, value, match", [
    ("optimizer.lr", "fast", "optimizer.lr"),
    ("optimizer.colour", "1", "unknown key 'colour'"),
    ("nosection.lr", "1", "unknown section"),
    ("lr", "1", "section.key"),
    ("training.batch_size", "1.5", "training.batch_size"),
])
def test_bad_overrides_name_the_setting(key, value, match):
    with pytest.raises(ConfigError, match=match):
        Config().with_overrides({key: value})


@pytest.mark.parametrize("key, value, match", [
    ("optimizer.lr", "-0.1", "optimizer.lr"),
    ("optimizer.lr", "0", "optimizer.lr"),
    ("optimizer.name", "'rmsprop'", "sgd, adam"),
    ("dataset.name", "'imagenet'", "mnist5k"),
    ("model.name", "'transformer'", "lenet_300_100"),
    ("model.init", "'orthogonal'", "kaiming_normal"),
    ("schedule.kind", "'linear'", "constant, step, cosine"),
    ("training.method", "edge-popup", "unknown method 'edge-popup'; choose one of standard, edgepopup, supermask"),
    ("training.steps", "'ten'", "training.steps"),
    ("training.rewind_points", "'0it,5x'", "training.rewind_points"),
])
def test_validation_names_setting_and_allowed_values(key, value, match, tmp_path):
    # settings are checked by validate; model, dataset and init names by their registries when looked
    # up: prepare does both before anything is written
    cfg = Config().with_overrides({key: value, "runtime.results_root": str(tmp_path / "runs")})
    with pytest.raises(ConfigError, match=match):
        prepare(cfg)
    assert not (tmp_path / "runs").exists()


def test_every_preset_is_valid():
    for name in PRESETS:
        validate(get_preset(name))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="lenet300_mnist5k"):
        get_preset("nope")


def test_toml_round_trip_with_preset_and_extra_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "lenet300_mnist5k"\n[optimizer]\nlr = 0.01\n[imp]\nlevels = 3\n')
    cfg, extra = load_toml(path)
    assert cfg.optimizer.lr == 0.01 and cfg.model.name == "lenet_300_100"
    # the preset's stage tables come along (as with --preset), the file's keys on top of them
    assert extra == {"imp": {"strategy": "layerwise", "prune_fraction": 0.2, "rate_overrides": {"output": 0.1},
                             "levels": 3}}


def test_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optimizer]\nlr = 0.1\nname = sgd\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_toml(path)


def test_from_dict_rejects_unknown_section():
    with pytest.raises(ConfigError, match="unknown section"):
        from_dict({"optimiser": {"lr": 1}})
