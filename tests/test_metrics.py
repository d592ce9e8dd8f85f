"""Sahu et al. ticket summaries and trajectory length, against hand-computed tables and closed forms."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from scipy.special import ellipe

from stability.maths.metrics import (
    accuracy_gain,
    best_sparse,
    lts_score,
    matching,
    matching_tolerance,
    sparsest_matching,
    success_rate,
    ticket_summary,
    trajectory_length,
    trajectory_length_gain,
)

DENSITY = {0: 1.0, 1: 0.8, 2: 0.64, 3: 0.512}
# Test accuracy per replicate and level (level 0 = dense), worked by hand below.
IMP = {
    0: [0.900, 0.905, 0.899, 0.880],
    1: [0.910, 0.912, 0.915, 0.890],
    2: [0.920, 0.895, 0.893, 0.870],
}
RANDOM = [0.890, 0.870, 0.850]  # levels 1..3, every replicate


def _table() -> pd.DataFrame:
    rows = []
    for rep, accs in IMP.items():
        rows += [
            {
                "replicate": rep,
                "level": lv,
                "kind": "imp",
                "density": DENSITY[lv],
                "test_accuracy": a,
            }
            for lv, a in enumerate(accs)
        ]
        rows += [
            {
                "replicate": rep,
                "level": lv,
                "kind": "random",
                "density": DENSITY[lv],
                "test_accuracy": a,
            }
            for lv, a in enumerate(RANDOM, start=1)
        ]
    return pd.DataFrame(rows)


def _run(rep: int) -> pd.DataFrame:
    t = _table()
    return t[(t["replicate"] == rep) & (t["kind"] == "imp")]


# ---------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------
def test_matching_tolerance():
    assert matching_tolerance([0.9]) == 0.002
    assert matching_tolerance([0.90, 0.91, 0.92]) == pytest.approx(0.01)  # std ddof=1
    with pytest.raises(ValueError):
        matching_tolerance([])


def test_matching_at_the_boundary():
    levels = pd.DataFrame({"level": [0, 1, 2, 3], "test_accuracy": [0.900, 0.898, 0.8979, 0.95]})
    # 0.898 is exactly dense − tolerance and must count despite float rounding in 0.9 − 0.002
    assert matching(levels, 0.900, 0.002).tolist() == [True, True, False, True]
    assert matching(levels, 0.900, 0.0).tolist() == [True, False, False, True]


def test_best_sparse_and_sparsest_matching_one_run():
    # Replicate 0 against the mean dense 0.910 with tolerance 0.01: threshold 0.900
    assert best_sparse(_run(0)) == {
        "replicate": 0,
        "level": 1,
        "kind": "imp",
        "density": 0.8,
        "test_accuracy": 0.905,
    }
    assert sparsest_matching(_run(0), 0.910, 0.01)["level"] == 1
    assert sparsest_matching(_run(1), 0.910, 0.01)["level"] == 2
    assert sparsest_matching(_run(2), 0.910, 0.01) is None
    assert best_sparse(_run(2))["level"] == 1  # best sparse exists even without a match
    # Non-contiguous matches: the sparsest matching level is 3 even though level 2 fails
    gappy = pd.DataFrame(
        {
            "level": [0, 1, 2, 3],
            "density": [1, 0.8, 0.64, 0.512],
            "test_accuracy": [0.9, 0.91, 0.85, 0.9],
        }
    )
    assert sparsest_matching(gappy, 0.9, 0.002)["level"] == 3


def test_best_sparse_ties_go_to_the_sparser():
    levels = pd.DataFrame(
        {
            "level": [0, 1, 2, 3],
            "density": [1, 0.8, 0.64, 0.512],
            "test_accuracy": [0.95, 0.93, 0.93, 0.92],
        }
    )
    assert best_sparse(levels)["level"] == 2
    assert best_sparse(levels[levels["level"] == 0]) is None


def test_one_run_functions_refuse_mixed_runs():
    with pytest.raises(ValueError, match="replicate"):
        best_sparse(_table()[_table()["kind"] == "imp"])
    with pytest.raises(ValueError, match="kind"):
        sparsest_matching(_table()[_table()["replicate"] == 0], 0.9, 0.01)


def test_scores():
    assert success_rate([True, False, False, True]) == 50.0
    assert success_rate([False]) == 0.0
    assert accuracy_gain(0.92, 0.90) == pytest.approx(2.2222222)
    assert accuracy_gain(0.88, 0.90) == pytest.approx(-2.2222222)
    assert lts_score(2.0, 50.0) == 100.0
    assert trajectory_length_gain(110.0, 100.0) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        accuracy_gain(0.9, 0.0)
    with pytest.raises(ValueError):
        success_rate([])


# ---------------------------------------------------------------------------
# ticket_summary against the hand-worked table
# ---------------------------------------------------------------------------
def test_ticket_summary_hand_computed():
    s = ticket_summary(_table())
    json.dumps(s)  # JSON-able as it stands
    # Dense: 0.900, 0.910, 0.920 -> mean 0.910, std (ddof=1) 0.010 -> matching threshold 0.900
    assert s["n_replicates"] == 3
    assert s["dense_accuracy"] == pytest.approx(0.910)
    assert s["tolerance"] == pytest.approx(0.010)
    rep0, rep1, rep2 = s["replicates"]
    assert [r["replicate"] for r in s["replicates"]] == [0, 1, 2]
    assert rep0["dense_accuracy"] == 0.900
    # rep 0: 0.905 yes, 0.899 no, 0.880 no
    assert rep0["matching_levels"] == [1] and rep0["winning"]
    assert rep0["best_sparse"] == pytest.approx(
        {"level": 1, "density": 0.8, "accuracy": 0.905, "a_gain": (0.905 - 0.910) / 0.910 * 100}
    )
    assert rep0["sparsest_matching"]["level"] == 1
    # rep 1: 0.912 yes, 0.915 yes, 0.890 no; best and sparsest matching both level 2, A_gain +0.549%
    assert rep1["matching_levels"] == [1, 2]
    assert rep1["best_sparse"]["level"] == 2 and rep1["sparsest_matching"]["level"] == 2
    assert rep1["best_sparse"]["a_gain"] == pytest.approx(0.5494505)
    # rep 2: nothing reaches 0.900
    assert (
        rep2["matching_levels"] == [] and not rep2["winning"] and rep2["sparsest_matching"] is None
    )
    assert rep2["best_sparse"]["level"] == 1
    # SR: 2 of 3 replicates found a winning ticket
    assert s["success_rate"] == pytest.approx(200 / 3)
    # Mean curve: L1 0.904, L2 0.902333, L3 0.880 -> matching [1, 2], best L1, sparsest matching L2
    agg = s["aggregate"]
    assert agg["matching_levels"] == [1, 2]
    gain_best = (0.904 - 0.910) / 0.910 * 100  # -0.6593
    gain_sparsest = (2.707 / 3 - 0.910) / 0.910 * 100  # -0.8425
    assert agg["best_sparse"] == pytest.approx(
        {
            "level": 1,
            "density": 0.8,
            "accuracy": 0.904,
            "a_gain": gain_best,
            "lts_score": gain_best * 200 / 3,
        }
    )
    assert agg["sparsest_matching"] == pytest.approx(
        {
            "level": 2,
            "density": 0.64,
            "accuracy": 2.707 / 3,
            "a_gain": gain_sparsest,
            "lts_score": gain_sparsest * 200 / 3,
        }
    )
    # Random pruning baseline: never matches; no SR for baselines
    rnd = s["baselines"]["random"]
    assert rnd["matching_levels"] == [] and rnd["sparsest_matching"] is None
    assert rnd["best_sparse"]["level"] == 1 and rnd["best_sparse"]["accuracy"] == pytest.approx(
        0.890
    )
    assert "lts_score" not in rnd["best_sparse"]


def test_ticket_summary_options():
    # Against each replicate's own dense accuracy (threshold = dense − 0.01): rep 0 at 0.890 now keeps
    # level 2 (0.899); rep 2 at 0.910 still finds nothing.
    s = ticket_summary(_table(), dense_reference="replicate")
    assert [r["matching_levels"] for r in s["replicates"]] == [[1, 2], [1, 2], []]
    assert s["replicates"][0]["best_sparse"]["a_gain"] == pytest.approx(
        (0.905 - 0.900) / 0.900 * 100
    )
    assert s["success_rate"] == pytest.approx(200 / 3)
    # A given tolerance replaces the std; with 0.0 only rep 1 wins
    s = ticket_summary(_table(), tolerance=0.0)
    assert s["tolerance"] == 0.0 and s["success_rate"] == pytest.approx(100 / 3)
    # One replicate: the 0.2-point tolerance
    s = ticket_summary(_table()[_table()["replicate"] == 1])
    assert s["tolerance"] == 0.002 and s["success_rate"] == 100.0


def test_ticket_summary_bad_tables():
    t = _table()
    with pytest.raises(ValueError, match="density"):
        ticket_summary(t.drop(columns="density"))
    with pytest.raises(ValueError, match="level 0"):
        ticket_summary(t[~((t["replicate"] == 2) & (t["level"] == 0))])
    with pytest.raises(ValueError, match="more than one row"):
        ticket_summary(pd.concat([t, t.iloc[:1]]))
    with pytest.raises(ValueError, match="imp"):
        ticket_summary(t[t["kind"] == "random"])


# ---------------------------------------------------------------------------
# Trajectory length
# ---------------------------------------------------------------------------
def _orthonormal_pair(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(
        torch.randn(dim, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q[:, 0], q[:, 1]


def test_trajectory_length_circle():
    x1, x2 = _orthonormal_pair(6, 0)
    r = 2.5
    length = trajectory_length(lambda x: x, r * x1, r * x2, n_points=1000, batch_size=64)
    assert length == pytest.approx(2 * math.pi * r, rel=1e-3)
    # The polyline is closed: three points make an equilateral triangle, perimeter 3·√3·r
    assert trajectory_length(lambda x: x, r * x1, r * x2, n_points=3) == pytest.approx(
        3 * math.sqrt(3) * r
    )


def test_trajectory_length_linear_map_is_an_ellipse():
    x1, x2 = _orthonormal_pair(5, 1)
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # f(x(t)) = cos t·Wx1 + sin t·Wx2: an ellipse whose semi-axes are the singular values of [Wx1 Wx2]
    a, b = torch.linalg.svdvals(torch.stack([w @ x1, w @ x2], dim=1)).tolist()
    perimeter = 4 * a * ellipe(1 - (b / a) ** 2)
    length = trajectory_length(lambda x: x @ w.T, x1, x2, n_points=1000, batch_size=333)
    assert length == pytest.approx(perimeter, rel=1e-3)
    # Same with a float32 nn.Linear on image-shaped inputs
    lin = torch.nn.Linear(5, 4, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    f32 = trajectory_length(
        lambda x: lin(x.reshape(x.shape[0], -1)), x1.float().reshape(1, 5), x2.float().reshape(1, 5)
    )
    assert f32 == pytest.approx(perimeter, rel=1e-3)


def test_trajectory_length_bad_input():
    with pytest.raises(ValueError):
        trajectory_length(lambda x: x, torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError):
        trajectory_length(lambda x: x, torch.ones(3), torch.ones(3), n_points=2)
