"""``make demo``: the suite's main job on the embedded data, end to end.

Instability sweeps of ``lenet300_mnist5k`` and ``lenet5_mnist5k`` (a small conv net; 5,000 packaged
MNIST digits), loss planes through the LeNet-5 trunk and two siblings (unstable at step 0, stable at the first
stable step) and Bezier curves between siblings and between independent networks, a Hessian track over the LeNet trunk and along one interpolation
path, IMP of LeNet-5 rewinding to step 0 and to its first stable step with both baselines,
every figure, and ``summary.md``. About 8 minutes on 2 quiet CPU cores; ``--full``
runs the larger settings kept in ``results/reference/``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..presets import get_preset
from ..stages.imp import ImpResult, imp_settings, run_imp
from ..stages.instability import (
    SweepResult,
    checkpoint_points,
    instability_settings,
    instability_sweep,
)
from ..stages.landscape import hessian_path, hessian_settings, hessian_track
from ..stages.trunk import train_trunk
from ..steps import INDEPENDENT, INDEPENDENT_STEP, point_name
from .demo_landscape import landscape_jobs, landscape_lines


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo's jobs: the default takes about 8 minutes on 2 quiet CPU cores."""

    siblings: int = 3
    lenet_rewind: tuple[str, ...] = ("independent", "0it", "5it", "10it", "25it", "50it", "100it", "200it")
    conv_rewind: tuple[str, ...] = ("independent", "0it", "5it", "10it", "25it", "50it", "100it", "200it")
    alignments: tuple[str, ...] = ("weights", "activations", "weights+repair")
    imp_instability: bool = True
    splits: tuple[str, ...] = ("test", "train")
    imp_levels: int = 10
    imp_replicates: int = 1
    hessian_samples: int = 1000
    trace_probes: int = 20
    plane_grid: int = 21  # points per axis of the LeNet-5 loss planes
    curve_steps: str = "1000it"  # fitting iterations of each Bezier curve
    curve_points: int = 21  # t points where each curve and its line are measured


FULL = DemoSettings(siblings=4, lenet_rewind=("independent", "0it", "5it", "10it", "25it", "50it", "100it", "200it",
                                              "400it"),
                    conv_rewind=("independent", "0it", "2it", "5it", "10it", "25it", "50it", "100it", "200it",
                                 "400it"),
                    imp_levels=15, imp_replicates=2, hessian_samples=2000, trace_probes=50)


class Stage:
    """Prints what runs and how long it took."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str):
        self.n += 1
        print(f"[{self.n}/{self.total}] {text} ...", flush=True)
        return _Timer(self.t0)


class _Timer:
    def __init__(self, t0: float):
        self.t0 = t0

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        now = time.perf_counter()
        if exc[0] is None:
            print(f"      done in {now - self.start:.1f} s (total {now - self.t0:.0f} s)", flush=True)


def run_demo(out: Path, settings: DemoSettings, *, quiet: bool = False,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every job of the demo under ``out`` and return what summary.md reports.

    ``overrides`` (``{"training.steps": "60it"}``, ...) apply to both presets: a smaller demo.
    A rerun reuses every finished record under ``out/runs`` and resumes an interrupted one.
    """
    root = out / "runs"
    common = {**(overrides or {}), "runtime.results_root": str(root), "runtime.quiet": str(quiet).lower()}
    # the trunk keeps checkpoints at the swept steps; "independent" is a sweep point, not a checkpoint
    lenet = get_preset("lenet300_mnist5k").with_overrides(
        {**common, "training.rewind_points": checkpoint_points(settings.lenet_rewind)})
    conv = get_preset("lenet5_mnist5k").with_overrides(
        {**common, "training.rewind_points": checkpoint_points(settings.conv_rewind)})
    stage = Stage(14 if settings.plane_grid else 10)
    t0 = time.perf_counter()
    with stage("lenet300_mnist5k: trunk with rewind checkpoints"):
        trunk = train_trunk(lenet)
    sweeps: dict[str, SweepResult] = {}
    sweep_settings = {}
    for name, cfg, points in (("lenet300_mnist5k", lenet, settings.lenet_rewind),
                              ("lenet5_mnist5k", conv, settings.conv_rewind)):
        sweep_settings[name] = instability_settings(rewind_points=list(points), siblings=settings.siblings,
                                                    splits=list(settings.splits))
        with stage(f"{name}: instability sweep over {', '.join(points)} ({settings.siblings} siblings each)"):
            sweeps[name] = instability_sweep(cfg, sweep_settings[name])
    alignments = _alignment_sweeps(sweeps, sweep_settings, {"lenet300_mnist5k": lenet, "lenet5_mnist5k": conv},
                                   settings.alignments, stage)
    configs = {"lenet300_mnist5k": lenet, "lenet5_mnist5k": conv}
    landscape = (landscape_jobs(configs, sweeps, sweep_settings, settings.plane_grid, settings.curve_steps,
                                settings.curve_points, stage) if settings.plane_grid else {})
    hs = hessian_settings(top_k=3, smallest=True, trace_probes=settings.trace_probes, density=True,
                          samples=settings.hessian_samples)
    with stage("lenet300_mnist5k: Hessian over training (λ1..3, λmin, trace, density)"):
        track = hessian_track(lenet, hs)
    with stage("lenet300_mnist5k: Hessian along the interpolation path at rewind 0it"):
        path = hessian_path(lenet, hessian_settings(top_k=1, trace_probes=settings.trace_probes,
                                                    samples=settings.hessian_samples), 0,
                            alphas=[0.0, 0.25, 0.5, 0.75, 1.0])
    imps: dict[str, ImpResult] = {}
    for rewind in ("0", "auto"):
        # rewind auto reads the first stable step off the sweep above (same settings: reused, not rerun).
        with stage(f"lenet5_mnist5k: IMP, {settings.imp_levels} levels, rewind {rewind}, baselines reinit+random"
                   + (", instability of every sparse network" if settings.imp_instability else "")):
            # instability = true: every level's sparse network is measured for stability at its rewind point
            # (Frankle et al. 2020, Figure 5: matching <=> stable)
            imps[rewind] = run_imp(conv, imp_settings(
                {"strategy": "global", "prune_fraction": 0.2}, levels=settings.imp_levels,
                rewind=rewind, baselines=["reinit", "random"], replicates=settings.imp_replicates,
                instability=settings.imp_instability),
                sweep_settings["lenet5_mnist5k"])
    with stage("figures"):
        figures = _figures(root, out / "figures")
    seconds = time.perf_counter() - t0
    info = {"trunk": trunk, "sweeps": sweeps, "track": track, "path": path, "imps": imps, "figures": figures,
            "seconds": seconds, "settings": settings, "alignments": alignments, "landscape": landscape}
    (out / "summary.md").write_text(summary_markdown(out, info))
    return info


def _alignment_sweeps(sweeps: dict[str, SweepResult], sweep_settings: dict[str, Any], configs: dict[str, Any],
                      alignments: tuple[str, ...], stage: Stage) -> dict[str, dict[str, SweepResult]]:
    """The naive sweeps' networks again at k = independent, 0 and the first stable step, aligned each way.

    The siblings and the independently trained networks are the naive sweep's (reused, not retrained).
    """
    out: dict[str, dict[str, SweepResult]] = {}
    for name, naive in sweeps.items():
        base = sweep_settings[name]
        points = [INDEPENDENT, "0it"]
        if naive.first_stable_step not in (None, 0):
            points.append(f"{naive.first_stable_step}it")
        out[name] = {"none": naive}
        with stage(f"{name}: barriers modulo permutation at {', '.join(points)} "
                   f"({', '.join(alignments)})"):
            for alignment in alignments:
                align, _, repair = alignment.partition("+")
                settings = replace(base, rewind_points=tuple(points), splits=("test",),  # summary.md: test barrier
                                   curve=replace(base.curve, align=align, repair=bool(repair)))
                out[name][alignment] = instability_sweep(configs[name], settings)
    return out


def _figures(root: Path, out: Path) -> list[Path]:
    """Every figure of the records under ``root`` (the rewind comparison of the two IMP runs included)."""
    from analysis import figures

    # plot_all draws every record, the comparison of the two IMP runs' rewind points included.
    return [Path(p) for p in figures.plot_all(root, out, formats=("png", "pdf"))]


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = ""
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key, "")
            cells.append(format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) and fmt else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def summary_markdown(out: Path, info: dict[str, Any]) -> str:
    """summary.md: first stable steps, IMP tables and the figure files."""
    s: DemoSettings = info["settings"]
    lines = ["# stability demo", "",
             (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}. "
             f"Total time {info['seconds']:.0f} s."), ""]
    lines += ["## Instability (error barrier between siblings) and the first stable step", ""]
    for name, sweep in info["sweeps"].items():
        fss = {k: (f"{v}it" if v is not None else "none") for k, v in sweep.first_stable_step_by_split.items()}
        lines += [f"### {name}", "",
                  f"{s.siblings} siblings per rewind point, 30 α, BatchNorm mode {sweep.summary['bn_mode']}, "
                  f"threshold {sweep.threshold:.0%}. First stable step: "
                  + ", ".join(f"{k} {v}" for k, v in fss.items()) + f". Records: `{_rel(sweep.run_dir, out)}`", "",
                  _table([{**r, "rewind_step": INDEPENDENT if r["rewind_step"] == INDEPENDENT_STEP else r["rewind_step"]}
                          for r in sweep.table], [("rewind_step", "rewind step (it)", "d"), ("split", "split", ""),
                                       ("instability_mean", "instability", ".4f"), ("instability_std", "± std", ".4f"),
                                       ("loss_barrier_mean", "loss barrier", ".4f"), ("stable", "stable", "")]), ""]
    lines += ["## Barriers modulo permutation (test error barrier, mean over pairs)", "",
              ("Network b of each pair aligned to network a before interpolating: weight matching (Git Re-Basin), "
               "activation matching on 1,000 fixed training examples, and weight matching followed by REPAIR at "
               "every α. `independent` = networks trained from different seeds (init and noise), the same "
               "settings otherwise. The siblings are the sweep's above, measured again, not retrained."), ""]
    for name, by_align in info.get("alignments", {}).items():
        rows = []
        aligned = [result for alignment, result in by_align.items() if alignment != "none"] or [by_align["none"]]
        aligned_points = sorted({r["rewind_step"] for r in aligned[0].table})
        for k in aligned_points:
            row = {"point": point_name(k)}
            for alignment, result in by_align.items():
                hit = [r for r in result.table if r["rewind_step"] == k and r["split"] == "test"]
                row[alignment] = hit[0]["instability_mean"] if hit else float("nan")
            rows.append(row)
        lines += [f"### {name}", "",
                  _table(rows, [("point", "point", ""), ("none", "naive", ".4f"), ("weights", "weights", ".4f"),
                                ("activations", "activations", ".4f"), ("weights+repair", "weights + REPAIR", ".4f")]),
                  ""]
    if info.get("landscape"):
        lines += landscape_lines(info["landscape"], lambda p: _rel(p, out))
    track = info["track"]
    lines += ["## Hessian of the training loss (lenet300_mnist5k trunk, 1,000 training examples)", "",
              _table(track.rows, [("step", "step (it)", "d"), ("lambda_1", "λ1", ".3f"), ("lambda_2", "λ2", ".3f"),
                                  ("lambda_3", "λ3", ".3f"), ("lambda_min", "λmin", ".3f"), ("trace", "trace", ".1f"),
                                  ("trace_stderr", "± se", ".1f")]), "",
              "Along the path between two siblings of rewind step 0:", "",
              _table(info["path"].rows, [("alpha", "α", ".2f"), ("lambda_1", "λ1", ".3f"), ("trace", "trace", ".1f")]),
              ""]
    lines += ["## IMP on lenet5_mnist5k (global magnitude pruning, 20% of the remaining weights per level)", ""]
    for key, result in info["imps"].items():
        tickets = result.summary["tickets"]
        agg = tickets["aggregate"]
        how = "rewind to step 0" if key == "0" else f"rewind to the first stable step ({result.rewind_step}it)"
        lines += [f"### {how}", "",
                  _table(result.levels, [("replicate", "rep", "d"), ("level", "level", "d"), ("kind", "kind", ""),
                                         ("density", "density", ".4f"),
                                         ("final_test_accuracy", "final test acc", ".4f"),
                                         ("early_stop_test_accuracy", "early-stop test acc", ".4f"),
                                         ("early_stop_step", "early-stop it", "d"),
                                         ("instability", "instability at rewind", ".4f")]), ""]
        for k, label in (("best_sparse", "Best Sparse"), ("sparsest_matching", "Sparsest Matching")):
            p = agg.get(k)
            lines.append(f"- {label}: " + ("none" if p is None else
                         f"level {p['level']}, density {p['density']:.4f}, accuracy {p['accuracy']:.4f}, "
                         f"A_gain {p['a_gain']:+.2f}%, LTS {p['lts_score']:.1f}"))
        lines += [(f"- dense accuracy {tickets['dense_accuracy']:.4f}, matching tolerance {tickets['tolerance']:.4f}, "
                  f"success rate {tickets['success_rate']:.0f}%"), f"- records: `{_rel(result.run_dir, out)}`", ""]
    conv_sweep = info["sweeps"].get("lenet5_mnist5k")
    threshold = conv_sweep.threshold if conv_sweep is not None else 0.02
    lines += stabilized_lth_lines(info["imps"], threshold) if {"0", "auto"} <= set(info["imps"]) else []
    lines += ["## Figures", ""] + [f"- `{_rel(p, out)}`" for p in info["figures"]] + [""]
    return "\n".join(lines)


def stabilized_lth_lines(imps: dict[str, ImpResult], threshold: float = 0.02) -> list[str]:
    """What the two IMP runs say about the stabilized lottery ticket hypothesis, read off their records.

    The hypothesis predicts levels where the ticket rewound to the first stable step is matching and the
    one rewound to step 0 is not; the claim needs the gap to exceed the spread over replicates.
    """
    zero, auto = imps["0"], imps["auto"]

    def by_level(result: ImpResult) -> dict[int, tuple[float, float]]:
        """Level -> mean and spread (std over replicates; NaN with one) of the tickets' test accuracy."""
        out = {}
        for level in sorted({r["level"] for r in result.levels}):
            accs = [r["final_test_accuracy"] for r in result.levels if r["level"] == level and r["kind"] == "imp"
                    and r.get("status", "ok") == "ok"]
            if accs:
                out[level] = (statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else math.nan)
        return out

    z, a = by_level(zero), by_level(auto)
    tz, ta = zero.summary["tickets"], auto.summary["tickets"]
    mz, ma = set(tz["aggregate"]["matching_levels"]), set(ta["aggregate"]["matching_levels"])
    separating = sorted(level for level in ma - mz if level in z and level in a)
    beyond = [level for level in separating
              if a[level][0] - z[level][0] > z[level][1] + a[level][1]]  # False when a spread is NaN
    lines = ["## Does the stabilized lottery ticket hypothesis show here?", "",
             (f"Rewinding to step 0: matching at levels {sorted(mz) or 'none'}; rewinding to the first stable step "
             f"({auto.rewind_step}it): matching at levels {sorted(ma) or 'none'}."), ""]
    if beyond:
        lines.append(f"Yes: at levels {beyond} the ticket rewound to the first stable step is matching and the one "
                     "rewound to 0 is not, by more than the spread over replicates.")
    elif separating:
        lines.append(f"Not shown: at levels {separating} only the stable-rewind ticket is matching, but with "
                     f"{zero.summary['tickets']['n_replicates']} replicate(s) the gap is not beyond the spread over "
                     "replicates, so it is not evidence for the hypothesis.")
    elif auto.rewind_step == 0:
        lines.append("Not tested: the first stable step is 0, so both runs rewind to step 0.")
    else:
        lines.append(f"No: rewinding to step 0 finds tickets as good as rewinding to the first stable step "
                     f"({auto.rewind_step}it) at every level both runs measured. At this scale the two rewinds are "
                     "not separated.")
    lines += _sparse_stability_lines(zero, auto, threshold=threshold)
    lines += ["", ("A search for a CPU-scale setting that separates them (Conv-4 at two learning rates, LeNet-5, an "
              "MLP on MNIST-1D; 3 replicates, down to 1.15% density) found none: `results/lth_search/README.md`. "
              "Frankle et al. (2020) see the separation on ResNet-20 and VGG-16 on CIFAR-10; the presets "
              "`*_frankle2020` (their Table 1 settings, with their published figures) and "
              "`examples/grids/frankle2020_*.toml` run it on a GPU or a cluster. The figure "
              "`matching_vs_instability_*` plots each level's accuracy against the instability of its sparse "
              "network (their Figure 5)."), ""]
    warmup = _warmup_line()
    return lines + ([warmup, ""] if warmup else [])


WARMUP_TABLE = Path(__file__).resolve().parents[2] / "results" / "warmup_control" / "summary_k0.csv"


def _warmup_line() -> str | None:
    """One line of the committed warmup control (``results/warmup_control``), read from its table (None: absent)."""
    import csv

    if not WARMUP_TABLE.is_file():
        return None
    rows = list(csv.DictReader(WARMUP_TABLE.open()))
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    return (f"Their warmup control at CPU scale (Conv-4 on mnist5k, SGD 0.03, {first['replicates']} replicates, "
            f"committed in `results/warmup_control/README.md`): instability at step 0 is "
            f"{float(first['instability_mean_pct']):.1f} +- {float(first['instability_std_pct']):.1f}% with "
            f"{first['warmup_it']} warmup iterations and {float(last['instability_mean_pct']):.1f} +- "
            f"{float(last['instability_std_pct']):.1f}% with {last['warmup_it']}.")


def _sparse_stability_lines(*results: ImpResult, threshold: float = 0.02) -> list[str]:
    """How stable the dense and the sparse networks are at their rewind point (IMP's instability option)."""
    lines = []
    for result in results:
        rows = [r for r in result.levels if r["kind"] == "imp" and r.get("status", "ok") == "ok"
                and r.get("instability") not in ("", None)]
        dense = [float(r["instability"]) for r in rows if r["level"] == 0]
        sparse = [float(r["instability"]) for r in rows if r["level"] > 0]
        if not dense or not sparse:
            continue
        lines += ["", (f"Rewinding to {result.rewind_step}it: the dense network's instability there is "
                       f"{sum(dense) / len(dense):.4f} (mean over replicates); the sparse networks rewound there have "
                       f"instability {min(sparse):.4f} to {max(sparse):.4f} ({sum(v < threshold for v in sparse)} of "
                       f"{len(sparse)} below the {threshold:.0%} threshold).")]
    if lines:
        lines += ["", ("Frankle et al. (2020, Figure 5) link matching to the stability of the *sparse* network at its "
                       "rewind point, not the dense one's: a sparse network that is stable where the dense one is "
                       "not explains a matching ticket found by rewinding to 0.")]
    return lines


def _rel(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print where its results are."""
    parser = argparse.ArgumentParser(prog="python -m stability.apps.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    parser.add_argument("--full", action="store_true", help="the larger settings of results/reference/")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from ..engine import configure_threads

    configure_threads(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = run_demo(out, FULL if args.full else DemoSettings(), quiet=args.quiet)
    print()
    for name, sweep in info["sweeps"].items():
        print(f"{name}: first stable step {sweep.first_stable_step}it (test)"
              if sweep.first_stable_step is not None else f"{name}: not stable at any swept step (test)")
    print(f"summary: {out / 'summary.md'}  figures: {out / 'figures'}")
    print(f"demo finished in {info['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
