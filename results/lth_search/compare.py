"""Compare IMP runs (levels.csv) of one setting: per level, mean +- std (ddof=1) over replicates of the
final test accuracy for each run's IMP ticket and its baselines, and whether the IMP mean is matching
(>= dense mean - tolerance, tolerance = std of the dense accuracies over replicates, as in
stability.metrics.matching_tolerance).

usage: python compare.py LABEL=path/levels.csv [LABEL=path/levels.csv ...]
"""
import sys

import numpy as np
import pandas as pd

runs = [a.split("=", 1) for a in sys.argv[1:]]
frames = {label: pd.read_csv(path) for label, path in runs}
first = next(iter(frames.values()))
dense = first[(first.level == 0) & (first.kind == "imp")]["final_test_accuracy"]
d_mean, tol = dense.mean(), dense.std(ddof=1)
print(f"dense: {100*d_mean:.2f} +- {100*tol:.2f} (n={len(dense)}); matching threshold {100*(d_mean-tol):.2f}")
for label, f in frames.items():
    dd = f[(f.level == 0) & (f.kind == "imp")]["final_test_accuracy"]
    bad = f[f.status != "ok"] if "status" in f else f.iloc[:0]
    print(f"  {label}: dense {100*dd.mean():.2f}; rewind_step {sorted(set(f.rewind_step))}; flagged rows {len(bad)}")
cols = []
for label, f in frames.items():
    for kind in sorted(set(f.kind)):
        cols.append((label, kind))
print()
hdr = "| level | density | " + " | ".join(f"{l} {k}" for l, k in cols) + " |"
print(hdr)
print("|" + "---|" * (2 + len(cols)))
levels = sorted(set(first.level))
for lv in levels:
    cells = []
    dens = None
    for label, kind in cols:
        f = frames[label]
        s = f[(f.level == lv) & (f.kind == kind)]
        if s.empty:
            cells.append("")
            continue
        dens = s.density.mean()
        a = s[s.status == "ok"]["final_test_accuracy"] if "status" in s else s["final_test_accuracy"]
        m, sd = a.mean(), (a.std(ddof=1) if len(a) > 1 else float("nan"))
        flag = ""
        if kind == "imp" and lv > 0:
            flag = " M" if m >= d_mean - tol - 1e-12 else " **not**"
        cells.append(f"{100*m:.2f} ± {100*sd:.2f}{flag}" + (f" (n={len(a)})" if len(a) != len(s) or len(a) < 3 else ""))
    print(f"| {lv} | {100*dens:.2f}% | " + " | ".join(cells) + " |")
