"""``make demo``: the suite's main job on the embedded data, end to end.

Instability sweeps of ``lenet300_mnist5k`` and ``lenet5_mnist5k`` (a small conv net; 5,000 packaged
MNIST digits), a Hessian track over the LeNet trunk and along one interpolation
path, IMP of LeNet-5 rewinding to step 0 and to its first stable step with both baselines,
every figure, and ``summary.md``. About 6 minutes on 2 quiet CPU cores; ``--full``
runs the larger settings kept in ``results/reference/``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .imp import ImpResult, imp_settings, run_imp
from .instability import SweepResult, instability_settings, instability_sweep
from .landscape import hessian_path, hessian_settings, hessian_track
from .presets import get_preset
from .trunk import train_trunk


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo's jobs: the default takes about 6 minutes on 2 quiet CPU cores."""

    siblings: int = 3
    lenet_rewind: tuple[str, ...] = ("0it", "5it", "10it", "25it", "50it", "100it", "200it")
    conv_rewind: tuple[str, ...] = ("0it", "5it", "10it", "25it", "50it", "100it", "200it")
    splits: tuple[str, ...] = ("test", "train")
    imp_levels: int = 10
    imp_replicates: int = 1
    hessian_samples: int = 1000
    trace_probes: int = 20


FULL = DemoSettings(siblings=4, lenet_rewind=("0it", "5it", "10it", "25it", "50it", "100it", "200it", "400it"),
                    conv_rewind=("0it", "2it", "5it", "10it", "25it", "50it", "100it", "200it", "400it"),
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
    lenet = get_preset("lenet300_mnist5k").with_overrides(
        {**common, "training.rewind_points": list(settings.lenet_rewind)})
    conv = get_preset("lenet5_mnist5k").with_overrides(
        {**common, "training.rewind_points": list(settings.conv_rewind)})
    stage = Stage(8)
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
        with stage(f"lenet5_mnist5k: IMP, {settings.imp_levels} levels, rewind {rewind}, baselines reinit+random"):
            imps[rewind] = run_imp(conv, imp_settings(
                {"strategy": "global", "prune_fraction": 0.2}, levels=settings.imp_levels,
                rewind=rewind, baselines=["reinit", "random"], replicates=settings.imp_replicates),
                sweep_settings["lenet5_mnist5k"])
    with stage("figures"):
        figures = _figures(root, out / "figures")
    seconds = time.perf_counter() - t0
    info = {"trunk": trunk, "sweeps": sweeps, "track": track, "path": path, "imps": imps, "figures": figures,
            "seconds": seconds, "settings": settings}
    (out / "summary.md").write_text(summary_markdown(out, info))
    return info


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
                  _table(sweep.table, [("rewind_step", "rewind step (it)", "d"), ("split", "split", ""),
                                       ("instability_mean", "instability", ".4f"), ("instability_std", "± std", ".4f"),
                                       ("loss_barrier_mean", "loss barrier", ".4f"), ("stable", "stable", "")]), ""]
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
                                         ("early_stop_step", "early-stop it", "d")]), ""]
        for k, label in (("best_sparse", "Best Sparse"), ("sparsest_matching", "Sparsest Matching")):
            p = agg.get(k)
            lines.append(f"- {label}: " + ("none" if p is None else
                         f"level {p['level']}, density {p['density']:.4f}, accuracy {p['accuracy']:.4f}, "
                         f"A_gain {p['a_gain']:+.2f}%, LTS {p['lts_score']:.1f}"))
        lines += [(f"- dense accuracy {tickets['dense_accuracy']:.4f}, matching tolerance {tickets['tolerance']:.4f}, "
                  f"success rate {tickets['success_rate']:.0f}%"), f"- records: `{_rel(result.run_dir, out)}`", ""]
    lines += ["## Figures", ""] + [f"- `{_rel(p, out)}`" for p in info["figures"]] + [""]
    return "\n".join(lines)


def _rel(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print where its results are."""
    parser = argparse.ArgumentParser(prog="python -m stability.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    parser.add_argument("--full", action="store_true", help="the larger settings of results/reference/")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from .engine import configure_threads

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
