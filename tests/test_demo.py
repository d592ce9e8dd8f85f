"""The demo end to end on shrunken presets: every stage runs and summary.md lists what it should."""
from __future__ import annotations

import re

import pytest

from stability.apps.demo import DemoSettings, main, run_demo

SMALL = DemoSettings(siblings=2, lenet_rewind=("independent", "0it", "5it"), conv_rewind=("0it", "5it"), imp_levels=2,
                     hessian_samples=200, trace_probes=3, plane_grid=5, curve_steps="20it", curve_points=5)
SHRINK = {"model.width": "0.25", "training.steps": "20it", "training.batch_size": "32",
          "training.eval_every": "10it", "runtime.threads": "2"}


@pytest.mark.slow
def test_demo_leaves_summary_figures_and_records(tmp_path):
    out = tmp_path / "demo"
    info = run_demo(out, SMALL, quiet=True, overrides=SHRINK)
    summary = (out / "summary.md").read_text()

    # both sweeps, with the first stable step of each, as computed
    for name in ("lenet300_mnist5k", "lenet5_mnist5k"):
        assert f"### {name}" in summary
        sweep = info["sweeps"][name]
        assert sweep.rewind_steps == ([-1, 0, 5] if name == "lenet300_mnist5k" else [0, 5])
        fss = sweep.first_stable_step
        assert (f"First stable step: test {fss}it" if fss is not None else "First stable step: test none") in summary
    # barriers modulo permutation: the same networks, naive and aligned three ways, in one table per network
    assert "## Barriers modulo permutation" in summary
    for name in ("lenet300_mnist5k", "lenet5_mnist5k"):
        by_align = info["alignments"][name]
        assert list(by_align) == ["none", "weights", "activations", "weights+repair"]
        assert by_align["weights"].table[0]["rewind_step"] == -1  # the independently trained networks first
        row = re.search(r"\| independent \| [^|]+ \| ([0-9.]+) \|", summary.split(f"### {name}")[-1])
        assert row and float(row.group(1)) == pytest.approx(by_align["weights"].table[0]["instability_mean"], abs=1e-4)
    # planes of the conv net at step 0 and at its stable point; curves at independent and 0 (LeNet-300-100) and 0
    assert "## Planes and curves" in summary
    landscape = info["landscape"]
    assert 0 in landscape["planes"] and len(landscape["planes"]) == 2
    assert all(len([r for r in p.rows if r["split"] == "test"]) == 25 for p in landscape["planes"].values())
    assert [r["rewind_step"] for r in landscape["curves"]["lenet300_mnist5k"].table] == [-1, 0]
    assert [r["rewind_step"] for r in landscape["curves"]["lenet5_mnist5k"].table] == [0]
    for result in landscape["curves"].values():
        for r in result.table:
            assert f"{r['curve_barrier']:.4f} | {r['line_loss_barrier']:.4f}" in summary
    # IMP on the conv net: rewind 0 and rewind auto, whose step is the sweep's first stable step (or its last point)
    assert "## IMP on lenet5_mnist5k" in summary
    auto = info["imps"]["auto"]
    expected = info["sweeps"]["lenet5_mnist5k"].first_stable_step
    assert auto.rewind_step == (expected if expected is not None else 5)
    assert info["imps"]["0"].rewind_step == 0
    for result in info["imps"].values():
        kinds = {(row["level"], row["kind"]) for row in result.levels}
        assert {(1, "imp"), (1, "reinit"), (1, "random"), (2, "imp")} <= kinds
    # the Hessian track has a row per checkpoint, the path a row per alpha
    assert [row["alpha"] for row in info["path"].rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(info["track"].rows) >= 2
    # every figure listed exists, and every kind of figure is there
    listed = re.findall(r"- `(figures/[^`]+)`", summary)
    assert listed and all((out / f).is_file() for f in listed)
    stems = {f.split("/")[-1].split("_")[0] for f in listed}
    assert {"instability", "interpolation", "imp", "hessian", "training", "rewind", "matching", "plane", "curve"} <= stems
    # every IMP level's sparse network measured for stability, and the verdict on the stabilized LTH
    assert all(row["instability"] != "" for result in info["imps"].values() for row in result.levels
               if row["kind"] == "imp")
    assert "## Does the stabilized lottery ticket hypothesis show here?" in summary
    assert "results/lth_search/README.md" in summary
    # one line of the committed warmup control, read from its table
    assert "Their warmup control at CPU scale" in summary and "results/warmup_control/README.md" in summary
    assert re.search(r"Total time \d+ s", summary)

    # a rerun reuses every record: nothing is trained again, the same numbers come back
    again = run_demo(out, SMALL, quiet=True, overrides=SHRINK)
    assert again["sweeps"]["lenet5_mnist5k"].table == info["sweeps"]["lenet5_mnist5k"].table
    assert again["imps"]["auto"].levels == auto.levels


def test_demo_cli_rejects_unknown_flags(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "d"), "--fast"])
    assert exc.value.code == 2
    assert not (tmp_path / "d").exists()
