"""State-dict files from elsewhere: read without running code, prefixes stripped, another architecture refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from stability.errors import ConfigError
from stability.store.files import save_tensors
from stability.store.statefiles import match_state, read_state_file


class Custom:
    """A class whose instance can only be unpickled by running code."""

    def __init__(self):
        self.weight = torch.ones(2)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_files_round_trip(tmp_path, suffix):
    ref = _net().state_dict()
    torch.save(ref, tmp_path / f"w{suffix}")
    state = match_state(read_state_file(tmp_path / f"w{suffix}"), ref, "model")
    assert _same(state, ref)


def test_safetensors_plain_and_written_by_the_suite(tmp_path):
    ref = _net().state_dict()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "plain.safetensors"), {"format": "pt"})
    save_tensors(tmp_path / "suite.safetensors", ref, {"step": 3})
    for name in ("plain.safetensors", "suite.safetensors"):
        assert _same(match_state(read_state_file(tmp_path / name), ref, name), ref)


def test_damaged_suite_safetensors_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_tensors(path, _net().state_dict())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor: the header still parses, the digest does not match
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="digest"):
        read_state_file(path)


def test_lightning_checkpoint_and_data_parallel_prefixes_are_stripped(tmp_path):
    ref = _net().state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref.items()}, "epoch": 3, "global_step": 7,
                "hyper_parameters": {"lr": 0.1}}, tmp_path / "l.ckpt")
    torch.save({f"module.{k}": v for k, v in ref.items()}, tmp_path / "dp.pt")
    torch.save({"model_state_dict": {f"module.model.{k}": v for k, v in ref.items()}, "optimizer_state_dict": {}},
               tmp_path / "nested.pt")
    for name in ("l.ckpt", "dp.pt", "nested.pt"):
        assert _same(match_state(read_state_file(tmp_path / name), ref, name), ref)


def test_a_template_whose_own_keys_start_with_model_keeps_them():
    template = nn.Module()
    template.model = nn.Linear(2, 2)
    ref = template.state_dict()
    assert _same(match_state(dict(ref), ref, "x"), ref)
    assert _same(match_state({f"module.{k}": v for k, v in ref.items()}, ref, "x"), ref)


def test_dtypes_follow_the_template_and_counters_stay_integers():
    ref = _net().state_dict()
    given = {k: (v.half() if v.is_floating_point() else v.int()) for k, v in ref.items()}
    given["extra_note"] = "not a tensor"  # non-tensor extras are ignored
    state = match_state(given, ref, "model")
    assert all(state[k].dtype == ref[k].dtype for k in ref)
    assert state["2.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("payload", ["instance", "module", "lambda"])
def test_a_file_that_would_run_code_is_refused(tmp_path, payload):
    path = tmp_path / "w.pt"
    obj = {"instance": {"w": Custom()}, "module": _net(), "lambda": {"f": len, "w": torch.ones(1)}}[payload]
    torch.save(obj, path)
    with pytest.raises(ConfigError, match=r"was not loaded: reading it would run code.*weights_only=True.*"
                                          r"torch\.save\(model\.state_dict\(\), path\)"):
        read_state_file(path)


def test_another_architecture_missing_extra_and_shapes_are_refused_by_key(tmp_path):
    ref = _net().state_dict()
    other = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).state_dict()
    with pytest.raises(ConfigError, match=r"model_b \(b.pt\): missing key '2.weight' \(and 6 more\) for this "
                                          r"architecture; the file has '1.weight'"):
        match_state(other, ref, "model_b (b.pt)")
    less = {k: v for k, v in ref.items() if k != "4.bias"}
    with pytest.raises(ConfigError, match=r"x: missing key '4.bias' for this architecture"):
        match_state(less, ref, "x")
    with pytest.raises(ConfigError, match=r"x: unexpected key 'head.weight' for this architecture"):
        match_state({**ref, "head.weight": torch.zeros(1)}, ref, "x")
    wide = {**ref, "4.weight": torch.zeros(3, 5)}
    with pytest.raises(ConfigError, match=r"x: key '4.weight' has shape \(3, 5\), this architecture expects \(3, 4\)"):
        match_state(wide, ref, "x")


def test_missing_unknown_and_non_state_files_are_refused_naming_them(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.pt'?: no such file \(expected a state dict"):
        read_state_file(tmp_path / "nope.pt")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"unknown state-dict file type '.h5'; choose one of .pt, .pth"):
        read_state_file(tmp_path / "w.h5")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "o.pt")
    with pytest.raises(ConfigError, match=r"o.pt'?: not a dict of tensors \(found a dict with keys 'epoch', "):
        read_state_file(tmp_path / "o.pt")
    (tmp_path / "t.pt").write_text("hello")
    with pytest.raises(ConfigError, match=r"t.pt'? is (truncated, damaged or )?not a torch file"):
        read_state_file(tmp_path / "t.pt")
    (tmp_path / "t.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(ConfigError, match="truncated or not a safetensors file"):
        read_state_file(tmp_path / "t.safetensors")
