"""The README's tables from a results root of results/pruning_baselines/run.sh: final test accuracy (%), mean ± std
over replicates, one row per method (the baselines figure's labels), one column per level (mean density). A
replicate with a NaN accuracy or a status other than ok (diverged, or within the chance margin: untrained) is left
out of its cell's mean and counted in it ("chance 2/2": every replicate), and listed after the table.

    .venv/bin/python results/pruning_baselines/tables.py /tmp/pb_lenet
"""
from __future__ import annotations

import sys

import pandas as pd

from analysis.figures.baselines import labelled
from analysis.load import imp_levels


def tables(root: str) -> str:
    levels = imp_levels(root)
    levels["final_test_accuracy"] = pd.to_numeric(levels["final_test_accuracy"], errors="coerce")
    levels["density"] = pd.to_numeric(levels["density"], errors="coerce")
    dense = levels[pd.to_numeric(levels["level"], errors="coerce") == 0].drop_duplicates(["replicate"])
    sparse = labelled(levels)
    sparse["level"] = pd.to_numeric(sparse["level"])
    columns = sparse.groupby("level")["density"].mean()
    acc = 100 * dense["final_test_accuracy"]
    out = [f"dense: {acc.mean():.2f} ± {acc.std():.2f} ({len(dense)} replicates)", "",
           "| method | " + " | ".join(f"{100 * d:.1f}%" for d in columns) + " |",
           "|---|" + "---|" * len(columns)]
    for method, df in sorted(sparse.groupby("method"), key=lambda kv: kv[0]):
        cells = []
        for level in columns.index:
            here = df[df["level"] == level]
            ok = here["final_test_accuracy"].notna() & (here["status"].astype(str) == "ok")
            acc = 100 * here.loc[ok, "final_test_accuracy"]
            cell = (f"{acc.mean():.2f} ± {acc.std():.2f}" if len(acc) > 1 else f"{acc.mean():.2f}") if len(acc) else ""
            if (~ok).any():
                states = sorted(set(here.loc[~ok, "status"].astype(str).replace({"untrained": "chance"})))
                cell = f"{cell} ({'/'.join(states)} {int((~ok).sum())}/{len(here)})" if cell else \
                    f"{'/'.join(states)} {int((~ok).sum())}/{len(here)}"
            cells.append(cell)
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    bad = sparse[sparse["final_test_accuracy"].isna() | (sparse["status"].astype(str) != "ok")]
    out += ["", f"replicates per method: {sorted(set(sparse.groupby('method')['replicate'].nunique()))}",
            "rows not ok (NaN, diverged or at chance): " + ("none" if bad.empty else "")]
    out += [f"- {r.method} replicate {r.replicate} level {r.level}: {r.status}, accuracy {r.final_test_accuracy}"
            for r in bad.itertuples()]
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1]))
