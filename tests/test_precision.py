"""bf16 mixed precision, compiled steps and channels-last: results, names, resume, refusals, the device check.

Nothing here needs a GPU: bf16 autocast and torch.compile run on the CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARGS, tiny_config
from test_hashes import _tiny

from stability.apps.cli import main
from stability.config import validate
from stability.engine import StackedModel, TrainSpec, train_members
from stability.engine import precision as engine_precision
from stability.errors import ConfigError
from stability.stages.checkpoints import load_weights
from stability.stages.context import prepare
from stability.stages.trunk import initial_members, train_trunk
from stability.store import files as store
from stability.store.files import load_tensors, read_csv

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- names
def test_precision_names_the_run_compile_and_channels_last_do_not():
    fp32, bf16 = _tiny(), _tiny(runtime__precision="bf16")
    assert fp32.run_hash() == "593d6e57ec85"  # as pinned in test_hashes: fp32 stays unnamed
    # pinned: a bf16 run must be found again by this name
    assert bf16.run_hash() == "27a24f279b08"
    assert _tiny(runtime__precision="bf16", runtime__eval_precision="bf16").run_hash() == "9652aa3990fd"
    for extra in ({"runtime.compile": "true"}, {"runtime.channels_last": "on"}, {"runtime.channels_last": "off"}):
        assert fp32.with_overrides(extra).run_hash() == fp32.run_hash()
        assert bf16.with_overrides(extra).run_hash() == bf16.run_hash()


@pytest.mark.parametrize("key, value, match", [
    ("runtime.precision", "fp16", "runtime.precision: unknown precision 'fp16'; choose one of fp32, bf16"),
    ("runtime.precision", "half", "runtime.precision: unknown precision 'half'; choose one of fp32, bf16"),
    ("runtime.eval_precision", "fp16", "runtime.eval_precision: unknown precision 'fp16'; choose one of fp32, bf16"),
    ("runtime.channels_last", "yes", "runtime.channels_last: unknown layout 'yes'; choose one of auto, on, off"),
])
def test_unknown_precision_is_refused_exit_2_nothing_written(tmp_path, capsys, monkeypatch, key, value, match):
    with pytest.raises(ConfigError, match=match.split(";")[0]):
        validate(tiny_config(tmp_path / "api").with_overrides({key: value}))
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "lenet300_mnist5k", *TINY_ARGS, f"--set={key}={value}",
                 "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- training
def test_bf16_lenet300_trunk_matches_fp32_accuracy(tmp_path, one_torch_thread):
    acc = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path, runtime__precision=precision, model__width="1", training__steps="2ep",
                          training__eval_every="2ep")
        acc[precision] = train_trunk(cfg).summary["final_test_accuracy"]
    # measured: fp32 0.931, bf16 0.932 (5,000 training examples, 218 iterations)
    assert acc["fp32"] > 0.9
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.01, acc


@pytest.mark.parametrize("preset, optimizer", [("lenet300_mnist5k", "sgd"), ("lenet300_mnist5k", "adam"),
                                               ("conv4_mnist5k", "adam")])
def test_bf16_keeps_fp32_master_weights_and_optimizer_state(tmp_path, one_torch_thread, preset, optimizer):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path, preset, runtime__precision=precision, optimizer__name=optimizer,
                          optimizer__lr="0.01" if optimizer == "sgd" else "0.001", optimizer__momentum="0.9",
                          training__steps="12it")
        ctx = prepare(cfg)
        members = train_members(StackedModel(ctx.model), initial_members(ctx),
                                TrainSpec(ctx.data, cfg, ctx.ipe), 6)
        assert all(p.dtype == torch.float32 for p in members.params.values())
        state = [v for st in members.optimizer_state["state"].values() for k, v in st.items() if k != "step"]
        assert state and all(v.dtype == torch.float32 for v in state)
        runs[precision] = members.params
    # ... and bf16 really computed in bf16: the weights differ from fp32's, a little
    diff = max(float((runs["bf16"][k] - runs["fp32"][k]).abs().max()) for k in runs["fp32"])
    assert 0 < diff < 0.05


class Killed(BaseException):
    """Stands for SIGKILL (as in test_faults)."""


def test_killed_bf16_run_resumes_bit_identically(tmp_path, monkeypatch, one_torch_thread):
    ref = train_trunk(tiny_config(tmp_path / "ref", runtime__precision="bf16"))
    real = store.atomic_write_bytes
    for n in (4, 9):
        count = 0

        def killing(path, data, n=n):
            nonlocal count
            real(path, data)
            count += 1
            if count == n:
                raise Killed(str(path))

        cfg = tiny_config(tmp_path / f"killed{n}", runtime__precision="bf16")
        monkeypatch.setattr(store, "atomic_write_bytes", killing)
        with pytest.raises(Killed):
            train_trunk(cfg)
        monkeypatch.setattr(store, "atomic_write_bytes", real)
        res = train_trunk(cfg)
        for step in (5, 10, 30):
            a, b = load_weights(ref.run_dir, step), load_weights(res.run_dir, step)
            assert all(torch.equal(a[k], b[k]) for k in a), (n, step)
        assert read_csv(ref.run_dir / "metrics.csv") == read_csv(res.run_dir / "metrics.csv")


def test_eval_precision_bf16_is_close_and_fp32_default_is_exact(tmp_path, one_torch_thread):
    cfg = tiny_config(tmp_path, training__steps="12it")
    ctx = prepare(cfg)
    members = train_members(StackedModel(ctx.model), initial_members(ctx), TrainSpec(ctx.data, cfg, ctx.ipe), 10)
    x, y = ctx.data.split("test")
    plain = StackedModel(ctx.model).evaluate(members.params, members.buffers, x, y)
    fp32 = StackedModel(ctx.model).configure(cfg.runtime).evaluate(members.params, members.buffers, x, y)
    low = StackedModel(ctx.model).configure(cfg.with_overrides({"runtime.eval_precision": "bf16"}).runtime)
    bf16 = low.evaluate(members.params, members.buffers, x, y)
    assert torch.equal(plain[0], fp32[0]) and torch.equal(plain[1], fp32[1])
    assert not torch.equal(plain[0], bf16[0]) and torch.allclose(plain[0], bf16[0], rtol=0.02)


# ---------------------------------------------------------------- compile
def _losses(cfg, model=None, steps: int = 8):
    ctx = prepare(cfg)
    losses = []
    sm = StackedModel(model if model is not None else ctx.model)
    members = initial_members(ctx)
    train_members(sm, members, TrainSpec(ctx.data, cfg, ctx.ipe, after_step=lambda m, loss: losses.append(loss)),
                  steps)
    return losses, sm, members, ctx


@pytest.mark.slow
def test_compiled_step_gives_the_uncompiled_losses(tmp_path, one_torch_thread):
    # ~20 s on two shared cores: most of it torch.compile's first compilation
    cfg = tiny_config(tmp_path, training__steps="12it")
    eager, _, m_eager, ctx = _losses(cfg)
    compiled, sm, m_comp, _ = _losses(cfg.with_overrides({"runtime.compile": "true"}))
    assert sm.compile_seconds > 0 and all(c.failed is None for c in sm._compiled.values())
    assert torch.allclose(torch.tensor(eager), torch.tensor(compiled), rtol=1e-5, atol=1e-6)
    x, y = ctx.data.split("test")
    a = StackedModel(ctx.model).evaluate(m_eager.params, m_eager.buffers, x, y)
    b = sm.evaluate(m_comp.params, m_comp.buffers, x, y)
    assert torch.allclose(a[0], b[0], rtol=1e-4) and torch.allclose(a[1], b[1], atol=2e-3)


@pytest.mark.slow
def test_compiled_conv4_step_gives_the_uncompiled_losses(tmp_path, one_torch_thread):
    # Conv-4 (width 0.1, the member loop with channels-last off as auto picks it there): the compiled lockstep step
    # and stacked evaluation against the eager ones; most of the time is torch.compile's first compilation
    cfg = tiny_config(tmp_path, "conv4_mnist5k", training__steps="12it")
    eager, _, m_eager, ctx = _losses(cfg, steps=6)
    compiled, sm, m_comp, _ = _losses(cfg.with_overrides({"runtime.compile": "true"}), steps=6)
    assert sm.compile_seconds > 0 and all(c.failed is None for c in sm._compiled.values())
    assert torch.allclose(torch.tensor(eager), torch.tensor(compiled), rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(m_eager.params[k], m_comp.params[k], rtol=1e-4, atol=1e-6) for k in m_eager.params)
    x, y = ctx.data.split("test")
    a = StackedModel(ctx.model).evaluate(m_eager.params, m_eager.buffers, x, y)
    b = sm.evaluate(m_comp.params, m_comp.buffers, x, y)
    assert torch.allclose(a[0], b[0], rtol=1e-4) and torch.allclose(a[1], b[1], atol=2e-3)


def test_compile_falls_back_with_a_note_when_compilation_fails(tmp_path, capsys, monkeypatch, one_torch_thread):
    def failing_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot compile the model")

    monkeypatch.setattr(engine_precision, "BACKEND", failing_backend)
    cfg = tiny_config(tmp_path, training__steps="12it")
    eager, _, _, _ = _losses(cfg, steps=3)
    losses, sm, _, _ = _losses(cfg.with_overrides({"runtime.compile": "true"}), steps=3)
    err = capsys.readouterr().err
    assert "note: cannot compile the training step of FullyConnected" in err and "running it uncompiled" in err
    assert sm._compiled["the training step"].failed
    assert torch.allclose(torch.tensor(losses), torch.tensor(eager), rtol=1e-6)


# ---------------------------------------------------------------- channels-last
def test_channels_last_setting_changes_layout_not_results(tmp_path, one_torch_thread):
    cfg = tiny_config(tmp_path, "conv4_mnist5k", training__steps="12it")
    ctx = prepare(cfg)
    sm = StackedModel(ctx.model)
    assert sm.configure(cfg.with_overrides({"runtime.channels_last": "off"}).runtime).channels_last_train is False
    assert sm.configure(cfg.with_overrides({"runtime.channels_last": "on"}).runtime).channels_last_train is True
    on, _, _, _ = _losses(cfg.with_overrides({"runtime.channels_last": "on"}), steps=3)
    off, _, _, _ = _losses(cfg.with_overrides({"runtime.channels_last": "off"}), steps=3)
    assert torch.allclose(torch.tensor(on), torch.tensor(off), rtol=1e-5)


# ---------------------------------------------------------------- the device check
@pytest.mark.slow
def test_device_check_runs_on_the_cpu_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path / "report.json")], check=False, capture_output=True, text=True,
                          timeout=240,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("torch ", "bf16 supported", "ResNet-20", "instability sweep", "lambda_max"):
        assert line in proc.stdout, (line, proc.stdout)
    assert (tmp_path / "report.json").is_file()


# ---------------------------------------------------------------- what never autocasts, and curves in bf16
@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """Two LeNet-300-100s (width 0.3) trained from different seeds by a plain loop, as safetensors files (~1 s)."""
    from helpers import fresh_model, train_plain

    from stability.store.files import save_tensors

    folder = tmp_path_factory.mktemp("precision_files")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = prepare(tiny_config(folder / "unused", model__width="0.3"))
    x, y = ctx.data.x_train, ctx.data.y_train
    for seed in (1, 2):
        save_tensors(folder / f"{seed}.safetensors", train_plain(fresh_model(ctx, seed), x, y, seed, 150).state_dict())
    torch.set_num_threads(threads)
    return folder


def _file_cfg(root, precision: str, eval_precision: str):
    from stability.stages.external import file_config

    return file_config({"model.name": "lenet_300_100", "model.width": "0.3", "dataset.name": "mnist5k",
                        "runtime.results_root": str(root), "runtime.threads": "1", "runtime.quiet": "true",
                        "runtime.precision": precision, "runtime.eval_precision": eval_precision})


def test_hessian_alignment_and_repair_never_autocast(two_files, tmp_path, monkeypatch, one_torch_thread):
    """The same two files measured under a runtime that says fp32 and one that says bf16 (training and evaluation):
    λmax (``hessian_file``) and the weight-matching permutation and REPAIR's renormalized networks (inside
    ``connect_files``, align = weights, repair) are bit for bit the same; only the curve's evaluation, asked for in
    bf16, differs."""
    from stability.hessian import hessian_settings
    from stability.maths import interpolation
    from stability.stages.connect import connect_settings
    from stability.stages.external import connect_files, hessian_file

    seen: dict[str, list] = {"align": [], "repair": []}
    real_align, real_repair = interpolation.align_pair, interpolation.repaired_path

    def align_pair(*args, **kwargs):
        out = real_align(*args, **kwargs)
        seen["align"].append(out)
        return out

    def repaired_path(*args, **kwargs):
        out = real_repair(*args, **kwargs)
        seen["repair"].append(out)
        return out

    monkeypatch.setattr(interpolation, "align_pair", align_pair)
    monkeypatch.setattr(interpolation, "repaired_path", repaired_path)
    settings = connect_settings(align="weights", repair=True, alphas=5, align_examples=500)
    hessian, connected = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = _file_cfg(tmp_path / precision, precision, precision)  # separate roots: nothing is reused
        hessian[precision] = hessian_file(two_files / "1.safetensors", cfg,
                                          hessian_settings(top_k=1, samples=256)).rows[0]
        connected[precision] = connect_files(two_files / "1.safetensors", two_files / "2.safetensors", cfg, settings)
    assert hessian["fp32"]["lambda_1"] == hessian["bf16"]["lambda_1"] > 0  # exactly: no autocast
    (a32, a16), (r32, r16) = seen["align"], seen["repair"]
    assert a32.keys() == a16.keys() and all(torch.equal(a32[k], a16[k]) for k in a32)
    b, _ = load_tensors(two_files / "2.safetensors")
    assert not torch.equal(a32["fc.0.weight"], b["fc.0.weight"])  # weight matching did permute network 2's units
    for fp32_part, bf16_part in zip(r32, r16):
        assert all(torch.equal(fp32_part[k], bf16_part[k]) for k in fp32_part)
    # the curve of those same repaired networks, evaluated in bf16 as asked: close, not equal
    e32 = [r["error"] for r in connected["fp32"].curves]
    e16 = [r["error"] for r in connected["bf16"].curves]
    l32 = torch.tensor([r["loss"] for r in connected["fp32"].curves])
    l16 = torch.tensor([r["loss"] for r in connected["bf16"].curves])
    assert not torch.equal(l32, l16) and torch.allclose(l32, l16, rtol=0.02)
    assert max(abs(x - y) for x, y in zip(e32, e16)) <= 0.005
    assert connected["fp32"].run_dir.name != connected["bf16"].run_dir.name  # eval_precision names the record


def test_eval_precision_bf16_curves_are_close_to_fp32_and_computed_in_bf16(tmp_path, monkeypatch, one_torch_thread):
    """``runtime.eval_precision = bf16``: the sweep's interpolation curves, a fitted curve's and a supermask's
    accuracy are evaluated in bf16 autocast: close to fp32's, not equal; the networks themselves (trained in fp32)
    are the same bit for bit, and fp32 (the default) evaluates as an unconfigured model does."""
    from stability.maths.paths import evaluate_pairs
    from stability.stages.connect import Network
    from stability.stages.curve import curve_settings, fit_networks
    from stability.stages.imp.rows import untrained_accuracy
    from stability.stages.instability import instability_settings, instability_sweep
    from stability.stages.siblings import train_siblings

    settings = instability_settings(rewind_points=["5it"], siblings=2, alphas=5, splits=["test"])
    curves, members = {}, {}
    for ev in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path, model__width="0.3", runtime__eval_precision=ev)
        sweep = instability_sweep(cfg, settings)
        curves[ev] = sweep.curves
        members[ev] = train_siblings(prepare(cfg), 5, settings.siblings).members  # reused: the sweep's siblings
    m32, m16 = members["fp32"], members["bf16"]
    assert all(torch.equal(m32.params[k], m16.params[k]) for k in m32.params)  # training was fp32 in both
    l32 = torch.tensor([r["loss"] for r in curves["fp32"]])
    l16 = torch.tensor([r["loss"] for r in curves["bf16"]])
    assert not torch.equal(l32, l16) and torch.allclose(l32, l16, rtol=0.02)
    assert max(abs(a["error"] - b["error"]) for a, b in zip(curves["fp32"], curves["bf16"])) <= 0.01

    # fp32 configured: bit-identical to an unconfigured model (no autocast, no casts)
    cfg = tiny_config(tmp_path, model__width="0.3")
    ctx = prepare(cfg)
    ends = [m32.member_state_dict(i) for i in range(2)]
    pairs = [(0, 1, a) for a in (0.0, 0.3, 1.0)]
    test = ctx.data.split("test")
    plain = evaluate_pairs(StackedModel(ctx.model), ends, pairs, test)
    assert evaluate_pairs(StackedModel(ctx.model).configure_evaluation(cfg.runtime), ends, pairs, test) == plain
    low = StackedModel(ctx.model).configure_evaluation(cfg.with_overrides({"runtime.eval_precision": "bf16"}).runtime)
    bf16 = evaluate_pairs(low, ends, pairs, test)
    assert bf16 != plain and torch.allclose(torch.tensor(bf16[0]), torch.tensor(plain[0]), rtol=0.02)

    # the curve stage (a fitted Bezier curve between the two siblings): its fit is the same, its measure bf16
    fitted = {}
    for ev in ("fp32", "bf16"):
        ectx = prepare(cfg.with_overrides({"runtime.eval_precision": ev}))
        a, b = (Network(ectx.cfg, m32.member_state_dict(i), None, f"sibling_{i}") for i in (0, 1))
        fitted[ev] = fit_networks(ectx, curve_settings(steps=10, points=5, splits=["test"], bn="interpolate"), a, b)
    assert fitted["fp32"].run_dir.name != fitted["bf16"].run_dir.name
    assert all(torch.equal(fitted["fp32"].middle[k], fitted["bf16"].middle[k]) for k in fitted["fp32"].middle)
    c32 = torch.tensor([r["loss"] for r in fitted["fp32"].rows])
    c16 = torch.tensor([r["loss"] for r in fitted["bf16"].rows])
    assert not torch.equal(c32, c16) and torch.allclose(c32, c16, rtol=0.02)

    # IMP's supermask accuracy: evaluated under the run's eval precision
    dtypes = []
    real_evaluate = StackedModel.evaluate

    def evaluate(self, *args, **kwargs):
        dtypes.append(self.eval_dtype)
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(StackedModel, "evaluate", evaluate)
    acc = {ev: untrained_accuracy(prepare(cfg.with_overrides({"runtime.eval_precision": ev})), m32, None)
           for ev in ("fp32", "bf16")}
    assert dtypes == [None, torch.bfloat16] and abs(acc["fp32"] - acc["bf16"]) <= 0.01 and acc["fp32"] > 0.5


# ---------------------------------------------------------------- bf16 training: Conv-4 accuracy, LeNet-5 instability
@pytest.mark.slow
def test_bf16_conv4_trunk_matches_fp32_accuracy(tmp_path):
    """Conv-4 as its preset trains it (width 1/4, SGD 0.01 m0.9, batch 60), 300 iterations, init seeds 0, 1 and 2:
    the test accuracy averaged over the three seeds, bf16 against fp32.

    One seed alone is not a fair test at any affordable length: bf16 and fp32 runs from one init drift apart as
    two runs with different noise do, and their accuracies differed by -1.0, -0.4 and +0.7 points for seeds 0, 1
    and 2 here (600 iterations at batch 32: -0.6 and +1.2 for seeds 0 and 1). Measured, averaged over seeds 0-2:
    fp32 0.9607, bf16 0.9583 (-0.23 points; the margin to the 1-point bound is 0.77). ~20 s on two quiet cores
    (six runs of 300 iterations, both threads used; ~43 s when the cores are shared)."""
    acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for seed in (0, 1, 2):
        for precision in ("fp32", "bf16"):
            cfg = tiny_config(tmp_path, "conv4_mnist5k", runtime__precision=precision, model__width="0.25",
                              training__steps="300it", training__batch_size="60", training__init_seed=str(seed),
                              training__eval_every="300it", training__checkpoint_every="300it",
                              training__rewind_points="")
            acc[precision].append(train_trunk(cfg).summary["final_test_accuracy"])
    mean = {p: sum(v) / len(v) for p, v in acc.items()}
    assert mean["fp32"] > 0.95, acc
    assert abs(mean["bf16"] - mean["fp32"]) <= 0.01, acc


@pytest.mark.slow
def test_bf16_siblings_give_the_fp32_instability_of_the_demos_lenet5_sweep(tmp_path):
    """The demo's LeNet-5 sweep (``lenet5_mnist5k`` as ``stability demo`` runs it: 3 siblings per point, 30 α,
    BatchNorm mode interpolate), trained in fp32 and in bf16, at two of its rewind points: 0 (unstable) and 200
    (stable), on the test split; ~25 s on two quiet cores (the full sweep, 8 points on both splits, is minutes).

    Measured (test error barrier, mean over the 3 pairs; the full fp32 sweep equals results/demo's):
    rewind 0: fp32 0.0653 (± 0.0458 over pairs), bf16 0.0557 (± 0.0436): |Δ| 0.0096, margin 0.0004;
    rewind 200: fp32 0.0017, bf16 0.0057: |Δ| 0.0040, margin 0.0060 (rewind 5, not run here: 0.0067 vs 0.0053).
    At the unstable point the barrier varies by ±0.046 from pair to pair, so bf16's different rounding moves the
    3-pair mean by about as much as the bound: the tight margin there is the noise of the quantity. With 6 siblings
    instead of the demo's 3 (measured, not run here) rewind 0 gave fp32 0.0571 (± 0.0327), bf16 0.0394 (± 0.0278):
    |Δ| 0.0177, outside 0.01, so the bound holds for the demo's settings, not for any sibling count at an unstable
    point. What a researcher reads off the sweep does not change: both precisions put rewind 0 above the 0.02
    threshold and rewind 200 below it (also asserted)."""
    from stability.apps.demo import DemoSettings
    from stability.presets import get_preset
    from stability.stages.instability import instability_settings, instability_sweep

    demo = DemoSettings()
    points = ("0it", "200it")
    assert set(points) <= set(demo.conv_rewind)
    settings = instability_settings(rewind_points=list(points), siblings=demo.siblings, splits=["test"])
    got = {}
    for precision in ("fp32", "bf16"):
        cfg = get_preset("lenet5_mnist5k").with_overrides({
            "runtime.results_root": str(tmp_path), "runtime.quiet": "true", "runtime.threads": "2",
            "runtime.precision": precision, "training.rewind_points": ",".join(points)})
        got[precision] = {r["rewind_step"]: r["instability_mean"] for r in instability_sweep(cfg, settings).table}
    assert got["fp32"].keys() == got["bf16"].keys() and len(got["fp32"]) == len(points)
    for k, value in got["fp32"].items():
        assert abs(got["bf16"][k] - value) <= 0.01, (k, got)
    for precision in ("fp32", "bf16"):  # the same reading: unstable at 0, stable at 200
        assert got[precision][0] > settings.threshold > got[precision][200], (precision, got)
