"""NEq (training.method = neq): phi, dphi and velocity by hand, frozen neurons held exactly and thawed,
FLOPs saved on hand-counted models, bit-identical resume after kills, settings and their errors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_config
from test_faults import _kill_and_resume
from torch import nn

from stability.apps.cli import main
from stability.config import Config
from stability.engine import StackedModel, TrainSpec, train_members
from stability.maths.flops import backward_macs, layer_costs, weight_gradient_saved
from stability.methods import neq as neq_module
from stability.methods.neq import NeqTracker, choose_frozen, neq_layers, neuron_cosine, velocity
from stability.stages.checkpoints import initial_members, load_weights
from stability.stages.context import prepare
from stability.stages.trunk import train_trunk
from stability.store.files import read_csv, read_json


# ---------------------------------------------------------------- the maths, by hand
def test_phi_is_the_cosine_of_each_neurons_outputs_with_the_reference_codes_zero_convention():
    previous = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [2.0, 0.0, 0.0]])
    current = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    phi = neuron_cosine(current, previous)
    # 1/sqrt(2); both zero: 1 (did not move); zero once: 0; opposite: -1
    assert phi.dtype == torch.float64
    assert phi.tolist() == pytest.approx([1 / math.sqrt(2), 1.0, 0.0, -1.0], abs=1e-15)


def test_dphi_and_velocity_by_hand_for_both_rules():
    # phi over three evaluations 0.9, 0.95, 0.95; phi before the first counts as 1 (the code's delta buffer 0)
    phis = [0.9, 0.95, 0.95]
    # dphi = -0.1, 0.05, 0.0
    # reference (EIDOSLAB/NEq's code): v = dphi - dphi_prev + mu v_prev: -0.1, 0.05+0.1-0.05 = 0.1, 0-0.05+0.05 = 0
    # paper: v = dphi - mu v_prev: -0.1, 0.05+0.05 = 0.1, 0-0.05 = -0.05
    expected = {"reference": [-0.1, 0.1, 0.0], "paper": [-0.1, 0.1, -0.05]}
    for rule, want in expected.items():
        phi_prev, dphi_prev, v = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), \
            torch.zeros(1, dtype=torch.float64)
        got_dphi, got_v = [], []
        for p in phis:
            dphi = torch.tensor([p], dtype=torch.float64) - phi_prev
            v = velocity(dphi, dphi_prev, v, 0.5, rule)
            phi_prev, dphi_prev = torch.tensor([p], dtype=torch.float64), dphi
            got_dphi.append(float(dphi))
            got_v.append(float(v))
        assert got_dphi == pytest.approx([-0.1, 0.05, 0.0], abs=1e-15)
        assert got_v == pytest.approx(want, abs=1e-15), rule


def test_reference_velocity_is_the_reference_codes_hook_arithmetic():
    """A transcription of EIDOSLAB/NEq's Hook (get_delta_of_delta, get_velocity, update_velocity,
    update_delta_buffer) over a random phi sequence gives the same velocities."""
    g = torch.Generator().manual_seed(0)
    phis = 1 - torch.rand(12, 5, generator=g, dtype=torch.float64) * 0.2
    for mu in (0.0, 0.5, 0.9):
        hook_velocity, delta_buffer = 0.0, 0.0  # the Hook's state; it works on delta = 1 - phi
        phi_prev = torch.ones(5, dtype=torch.float64)
        dphi_prev = v = torch.zeros(5, dtype=torch.float64)
        for phi in phis:
            delta = 1 - phi
            delta_of_delta = delta_buffer - delta
            hook_velocity = hook_velocity + delta_of_delta  # get_velocity: what the mask is computed from
            used = hook_velocity.clone()
            hook_velocity = hook_velocity * mu - (delta_buffer - delta)  # update_velocity
            delta_buffer = delta  # update_delta_buffer
            dphi = phi - phi_prev
            v = velocity(dphi, dphi_prev, v, mu, "reference")
            phi_prev, dphi_prev = phi, dphi
            torch.testing.assert_close(v, used, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- freezing in the engine
def _scripted(outputs):
    """A stand-in for neq.layer_outputs that hands out prepared outputs, one set per evaluation."""
    calls = iter(outputs)
    return lambda *args, **kwargs: next(calls)


def test_a_frozen_neuron_is_held_bit_for_bit_under_momentum_and_weight_decay_and_thaws_when_it_moves(
        results_root, monkeypatch, one_torch_thread):
    cfg = tiny_config(results_root, training__method="neq", neq__every="5it", optimizer__name="sgd",
                      optimizer__lr="0.05", optimizer__momentum="0.9", optimizer__weight_decay="0.01")
    ctx = prepare(cfg)
    members = initial_members(ctx)
    tracker = NeqTracker(ctx, 0)
    tracker.restore(members)
    assert tracker.layers == ["fc.0", "fc.1"]  # every prunable layer but the output layer fc.2
    units = {name: tracker.layer_cost[name].out_units for name in tracker.layers}
    g = torch.Generator().manual_seed(1)
    base = {name: torch.randn(1, u, 8, generator=g) for name, u in units.items()}
    moved = {name: base[name] + 3 * torch.randn(1, u, 8, generator=g) for name, u in units.items()}
    at5 = {name: moved[name].clone() for name in units}
    at5["fc.0"][0, 3] = base["fc.0"][0, 3]  # neuron 3 did not move: phi = 1, dphi = 0, velocity 0 -> frozen
    at10 = {name: base[name].clone() for name in units}
    at10["fc.0"][0, 3] = -base["fc.0"][0, 3]  # ... then turns around: phi = -1, dphi = -2 -> thaws
    monkeypatch.setattr(neq_module, "layer_outputs", _scripted([base, at5, at10]))

    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    masks_seen: dict[int, dict] = {}

    def after_step(m, loss):
        seen[m.step] = (m.params["fc.0.weight"][0, 3].clone(), m.params["fc.0.bias"][0, 3].clone(),
                        m.params["fc.0.weight"][0, 4].clone())

    velocities = {}

    def update(m):
        new = tracker(m)
        if new is not None:
            masks_seen[m.step] = new
            velocities[m.step] = tracker.v["fc.0"][0].clone()
        return new

    spec = TrainSpec(ctx.data, cfg, ctx.ipe, masks=tracker.masks(), freeze=True, update_masks=update,
                     after_step=after_step)
    train_members(StackedModel(ctx.model), members, spec, 15)
    assert sorted(masks_seen) == [0, 5, 10]
    assert masks_seen[0] == {} and masks_seen[10] == {}
    frozen_masks = masks_seen[5]
    assert set(frozen_masks) == {"fc.0.weight", "fc.0.bias"}  # the weight row and the bias of the neuron
    assert frozen_masks["fc.0.weight"].shape == (1, units["fc.0"], 1)
    assert frozen_masks["fc.0.bias"][0].nonzero().flatten().tolist() == [i for i in range(units["fc.0"]) if i != 3]
    # at step 5 the velocity is the first measured dphi = phi - 1: 0 for neuron 3, far from 0 for the others;
    # at step 10 neuron 3's is dphi - dphi_prev + mu v_prev = (-1 - 1) - 0 + 0 = -2
    assert abs(float(velocities[5][3])) < 1e-12 and bool((velocities[5][torch.arange(units["fc.0"]) != 3].abs() > 0.1).all())
    assert float(velocities[10][3]) == pytest.approx(-2.0, abs=1e-12)
    w5, b5, other5 = seen[5]
    for s in range(6, 11):  # the updates 5->6 ... 9->10 skip neuron 3: bit-identical weight row and bias
        assert torch.equal(seen[s][0], w5) and torch.equal(seen[s][1], b5), s
    assert not torch.equal(seen[10][2], other5)  # its neighbour trained meanwhile
    assert not torch.equal(seen[11][0], seen[10][0]) and not torch.equal(seen[11][1], seen[10][1])  # thawed
    assert not torch.equal(seen[5][0], seen[4][0])  # and it trained before


def test_velocities_at_hand_made_outputs_and_the_baselines_counts(results_root, monkeypatch):
    cfg = tiny_config(results_root, training__method="neq", neq__every="5it")
    ctx = prepare(cfg)
    members = initial_members(ctx)
    tracker = NeqTracker(ctx, 0)
    tracker.restore(members)
    u = tracker.layer_cost["fc.0"].out_units
    first = {name: torch.ones(1, tracker.layer_cost[name].out_units, 2) for name in tracker.layers}
    second = {name: v.clone() for name, v in first.items()}
    second["fc.0"][0, 0] = torch.tensor([1.0, 0.0])  # phi = 1/sqrt(2)
    monkeypatch.setattr(neq_module, "layer_outputs", _scripted([first, second]))
    tracker(members)
    members.step = 5
    tracker(members)
    assert float(tracker.phi["fc.0"][0, 0]) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert float(tracker.v["fc.0"][0, 0]) == pytest.approx(1 / math.sqrt(2) - 1, abs=1e-15)
    assert tracker.frozen["fc.0"][0].tolist() == [False] + [True] * (u - 1)  # unchanged outputs: velocity 0
    g = torch.Generator().manual_seed(0)
    at_eq = torch.zeros(2, 40, dtype=torch.bool)
    at_eq[0, :7] = True
    at_eq[1, 3:30] = True
    matched = choose_frozen(at_eq, "matched", 0.0, g)
    assert matched.sum(1).tolist() == [7, 27]
    random = choose_frozen(at_eq, "random", 0.25, g)
    assert random.sum(1).tolist() == [10, 10]
    assert torch.equal(choose_frozen(at_eq, "none", 0.0, g), at_eq)


# ---------------------------------------------------------------- FLOPs, hand-counted
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(4, 3), nn.Linear(3, 2)])

    def forward(self, x):
        return self.fc[1](torch.relu(self.fc[0](x.flatten(1))))


class _OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _tracker_for(model, input_shape):
    cfg = Config().with_overrides({"training.method": "neq"})
    data = SimpleNamespace(split=lambda name: (torch.zeros(5, *input_shape), torch.zeros(5, dtype=torch.long)),
                           input_shape=input_shape)
    return NeqTracker(SimpleNamespace(cfg=cfg, model=model, data=data, ipe=10), 0)


def test_backward_flops_saved_on_a_hand_counted_mlp_and_one_conv_net():
    # MLP 4-3-2: fc.0 weight 12 MACs (forward = weight gradient; no input gradient: first layer),
    # fc.1 (output) 6 + 6; backward per example 12 + 12 = 24. Freezing 1 of fc.0's 3 neurons saves fan_in 4.
    mlp = _MLP()
    costs = layer_costs(mlp, (4,))
    assert [(c.weight, c.forward, c.weight_gradient, c.input_gradient) for c in costs] == \
        [("fc.0.weight", 12, 12, 0), ("fc.1.weight", 6, 6, 6)]
    assert backward_macs(costs) == 24
    assert neq_layers(mlp) == ["fc.0"]
    assert weight_gradient_saved(costs, {"fc.0.weight": torch.tensor([1.0, 0.0, 1.0])}) == 4
    tracker = _tracker_for(mlp, (4,))
    tracker.restore(SimpleNamespace(extra={}, n=1, step=0, params={n: p.unsqueeze(0) for n, p in mlp.named_parameters()}))
    tracker.frozen["fc.0"][0, 1] = True
    rows = tracker.rows(7, {"fc.0": tracker.frozen["fc.0"]}, measured=False)
    layer, total = rows
    assert (layer["layer"], layer["neurons"], layer["frozen"], layer["backward_macs"], layer["macs_saved"]) == \
        ("fc.0", 3, 1, 12, 4)
    assert (total["layer"], total["neurons"], total["backward_macs"], total["macs_saved"]) == ("all", 3, 24, 4)
    assert total["saved_fraction"] == 4 / 24 and total["frozen_fraction"] == 1 / 3

    # One conv 2->4 channels, 3x3 kernel, on 2x5x5: 3x3 = 9 output positions, weight 4*2*9 = 72:
    # weight gradient 72*9 = 648 (first layer: no input gradient); fc 36->3: 108 + 108. Backward 864.
    # A frozen channel saves fan_in 2*9 = 18 weights x 9 positions = 162.
    net = _OneConv()
    costs = layer_costs(net, (2, 5, 5))
    assert [(c.weight, c.positions, c.weight_gradient, c.input_gradient) for c in costs] == \
        [("conv.weight", 9, 648, 0), ("fc.weight", 1, 108, 108)]
    assert backward_macs(costs) == 864
    tracker = _tracker_for(net, (2, 5, 5))
    tracker.restore(SimpleNamespace(extra={}, n=1, step=0, params={n: p.unsqueeze(0) for n, p in net.named_parameters()}))
    tracker.frozen["conv"][0, 2] = True
    masks = tracker.masks()
    assert masks["conv.weight"].shape == (1, 4, 1, 1, 1) and masks["conv.bias"].tolist() == [[1.0, 1.0, 0.0, 1.0]]
    layer, total = tracker.rows(0, {"conv": tracker.frozen["conv"]}, measured=False)
    assert (layer["macs_saved"], layer["backward_macs"], total["macs_saved"], total["backward_macs"]) == (162, 648, 162, 864)
    assert total["saved_fraction"] == 162 / 864


# ---------------------------------------------------------------- runs: records, resume, settings
NEQ_TINY = {"training__method": "neq", "neq__every": "5it", "neq__eps": "0.05"}


def test_neq_run_records_frozen_neurons_and_flops_beside_accuracy(results_root, one_torch_thread):
    from analysis.figures import plot_neq
    from analysis.load import neq_records

    result = train_trunk(tiny_config(results_root, **NEQ_TINY))
    rows = read_csv(result.run_dir / "neq.csv")
    assert sorted({r["step"] for r in rows}) == [0, 5, 10, 15, 20, 25]
    assert {r["layer"] for r in rows} == {"fc.0", "fc.1", "all"}
    assert all(r["frozen"] == 0 for r in rows if r["step"] == 0)  # no outputs to compare yet
    frozen = [r["frozen_fraction"] for r in rows if r["layer"] == "all"]
    assert max(frozen) > 0
    summary = read_json(result.run_dir / "summary.json")["neq"]
    spans = [5] * 6  # six evaluations, each holding for 5 of the 30 steps
    assert summary["mean_frozen_fraction"] == pytest.approx(sum(f * n for f, n in zip(frozen, spans)) / 30)
    assert summary["evaluations"] == 6 and summary["layers"] == ["fc.0", "fc.1"]
    saved = [r["saved_fraction"] for r in rows if r["layer"] == "all"]
    assert summary["backward_flops_saved_fraction"] == pytest.approx(sum(f * n for f, n in zip(saved, spans)) / 30)
    assert 0 < summary["backward_flops_saved_fraction"] < 1
    plain = train_trunk(tiny_config(results_root))
    assert not (plain.run_dir / "neq.csv").exists() and "neq" not in read_json(plain.run_dir / "summary.json")
    df = neq_records(results_root)
    assert set(df["variant"]) == {"NEq", "plain"}
    totals = df[(df["layer"] == "all") & (df["variant"] == "NEq")]
    assert totals["test_error"].notna().sum() == 4  # metrics at 0, 10, 20 and the final step 30
    fig = plot_neq(df)
    assert len(fig.axes) == 3  # frozen neurons, backward FLOPs saved, test accuracy
    for ax in fig.axes:
        assert [line.get_label() for line in ax.lines] == ["plain", "NEq"]
    # each NEq evaluation's fraction holds until the next, and the last one to the final step
    ends = [0, 5, 10, 15, 20, 25, 30]
    for ax, values in ((fig.axes[0], frozen), (fig.axes[1], saved)):
        plain_line, neq_line = ax.lines
        assert list(neq_line.get_xdata()) == ends
        assert list(neq_line.get_ydata()) == pytest.approx([100 * v for v in [*values, values[-1]]])
        assert list(plain_line.get_ydata()) == [0.0] * len(plain_line.get_ydata())
    # test accuracy where metrics.csv has it: 0, 10, 20 and 30
    metrics = read_csv(result.run_dir / "metrics.csv")
    accuracy = fig.axes[2].lines[1]
    assert list(accuracy.get_xdata()) == [r["step"] for r in metrics] == [0, 10, 20, 30]
    assert list(accuracy.get_ydata()) == pytest.approx([100 * (1 - r["test_error"]) for r in metrics])


def test_neq_trunk_killed_at_file_boundaries_resumes_identically(tmp_path, monkeypatch, one_torch_thread):
    def run(root):
        result = train_trunk(tiny_config(root, **NEQ_TINY, neq__baseline="matched", training__steps="20it"))
        rows = read_csv(result.run_dir / "neq.csv")
        assert any(r["frozen"] for r in rows)  # the resumed path goes through frozen neurons
        return result

    n_writes, checked = _kill_and_resume(tmp_path, monkeypatch, run, "neq", stride=3)
    assert checked == 2 * len(range(1, n_writes + 1, 3))


def test_neq_settings_name_the_run_only_with_neq_and_bad_ones_exit_2_writing_nothing(tmp_path, capsys):
    base = Config()
    neq = base.with_overrides({"training.method": "neq"})
    assert neq.run_hash() != base.run_hash()
    assert neq.with_overrides({"neq.eps": "0.01"}).run_hash() != neq.run_hash()
    assert neq.with_overrides({"neq.eps": "0.001"}).run_hash() == neq.run_hash()  # the default stays out
    out = tmp_path / "out"
    cases = [
        (["training.method=neq", "neq.eps=-1"], "neq.eps"),
        (["training.method=neq", "neq.mu=1.5"], "neq.mu"),
        (["training.method=neq", "neq.baseline=shuffle"], "none, random, matched"),
        (["training.method=neq", "neq.velocity=fast"], "reference, paper"),
        (["training.method=neq", "neq.baseline=random"], "neq.random_fraction"),
        (["training.method=neq", "neq.random_fraction=0.3"], "neq.baseline = random"),
        (["training.method=neq", "neq.examples=0"], "neq.examples"),
        (["training.method=neq", "neq.every=0it"], "neq.every"),
        (["training.method=neq", "neq.every=600it"], "neq.every: NEq needs a second evaluation before the end"),
        (["neq.eps=0.01"], "training.method = neq"),
        (["training.method=neq", "dataset.val_size=0"], "dataset.val_size"),
    ]
    for sets, expected in cases:
        code = main(["train", "--preset", "lenet300_mnist5k", "--quiet", "--out", str(out),
                     *[f"--set={s}" for s in sets]])
        err = capsys.readouterr().err
        assert code == 2, (sets, err)
        assert expected in err, (sets, err)
        assert not out.exists() or not any(out.iterdir()), sets


def test_a_missing_neq_checkpoint_is_replayed_through_the_training_hooks_leaving_the_records_alone(
        results_root, one_torch_thread):
    neq = {**NEQ_TINY, "neq__baseline": "matched"}  # neurons frozen from step 5 on: the replay must hold them
    full = train_trunk(tiny_config(results_root / "full", **neq, training__rewind_points="5it,10it,17it"))
    cfg = tiny_config(results_root / "late", **neq)
    late = train_trunk(cfg)
    assert 17 not in late.checkpoints
    assert any(r["frozen"] for r in read_csv(late.run_dir / "neq.csv") if 0 < r["step"] < 17)
    records = (late.run_dir / "neq.csv").read_bytes()
    again = train_trunk(cfg, extra_checkpoints=[17])
    assert again.reused and 17 in again.checkpoints
    w_full, w_late = load_weights(full.run_dir, 17), load_weights(late.run_dir, 17)
    assert all(torch.equal(w_full[k], w_late[k]) for k in w_full)
    assert (late.run_dir / "neq.csv").read_bytes() == records
    assert again.summary["neq"] == read_json(late.run_dir / "summary.json")["neq"]


def test_a_reused_neq_trunk_with_damaged_records_trains_again_from_its_newest_state(results_root, capsys):
    cfg = tiny_config(results_root, **NEQ_TINY)
    first = train_trunk(cfg)
    summary = read_json(first.run_dir / "summary.json")
    (first.run_dir / "neq.csv").write_text("step,member\n1,")  # torn: the columns are missing
    again = train_trunk(cfg)
    assert "neq.csv is missing or damaged; training it again" in capsys.readouterr().err
    assert not again.reused and read_json(first.run_dir / "summary.json")["neq"] == summary["neq"]
