"""Tables and figure of the warmup control from the runs under runs/ (read with ``analysis``).

usage: python results/warmup_control/make_tables.py   (from the repository root; writes beside this file)
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

import analysis

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
THRESHOLD = 0.02


def warmup_iterations(value: str) -> int:
    return int(str(value).removesuffix("it"))


def sweep_table() -> pd.DataFrame:
    """One row per (warmup, init seed): instability and loss barrier at k = 0, the siblings' test accuracy."""
    sweeps = analysis.sweeps(RUNS, include_sparse=False)
    sweeps = sweeps[(sweeps["rewind_step"] == 0) & (sweeps["split"] == "test")]
    curves = analysis.interpolation_curves(RUNS, include_sparse=False)
    ends = curves[(curves["rewind_step"] == 0) & (curves["split"] == "test") & curves["alpha"].isin([0.0, 1.0])]
    end_acc = (1 - ends.groupby("run_hash")["error"].mean()).rename("sibling_test_accuracy")
    rows = sweeps.join(end_acc, on="run_hash")
    out = pd.DataFrame({
        "warmup_it": rows["schedule.warmup"].map(warmup_iterations),
        "init_seed": rows["training.init_seed"].astype(int),
        "instability_pct": rows["instability_mean"] * 100,
        "loss_barrier": rows["loss_barrier_mean"],
        "sibling_test_accuracy_pct": rows["sibling_test_accuracy"] * 100,
        "status": rows["status"],
    })
    return out.sort_values(["warmup_it", "init_seed"]).reset_index(drop=True)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1) and range over replicates per warmup length, and how many replicates are stable."""
    g = table.groupby("warmup_it")
    return pd.DataFrame({
        "replicates": g.size(),
        "instability_mean_pct": g["instability_pct"].mean(),
        "instability_std_pct": g["instability_pct"].std(),
        "instability_min_pct": g["instability_pct"].min(),
        "instability_max_pct": g["instability_pct"].max(),
        "stable_replicates": g["instability_pct"].apply(lambda s: int((s < THRESHOLD * 100).sum())),
        "loss_barrier_mean": g["loss_barrier"].mean(),
        "sibling_test_accuracy_mean_pct": g["sibling_test_accuracy_pct"].mean(),
    }).reset_index()


def imp_table() -> pd.DataFrame:
    """Per member and level: density and final test accuracy (mean, std over replicates) of IMP rewound to 0."""
    levels = analysis.imp_levels(RUNS)
    if levels.empty:
        return pd.DataFrame()
    levels = levels[levels["kind"] == "imp"].copy()
    levels["warmup_it"] = levels["schedule.warmup"].map(warmup_iterations)
    levels["acc"] = levels["final_test_accuracy"] * 100
    g = levels.groupby(["warmup_it", "level"])
    out = pd.DataFrame({"density_pct": g["density"].first() * 100, "replicates": g.size(),
                        "accuracy_mean_pct": g["acc"].mean(), "accuracy_std_pct": g["acc"].std(),
                        "accuracy_min_pct": g["acc"].min(), "accuracy_max_pct": g["acc"].max()}).reset_index()
    dense = out[out["level"] == 0].set_index("warmup_it")
    out["drop_from_dense_pct"] = out["warmup_it"].map(dense["accuracy_mean_pct"]) - out["accuracy_mean_pct"]
    out["matching"] = out["accuracy_mean_pct"] >= (out["warmup_it"].map(dense["accuracy_mean_pct"])
                                                   - out["warmup_it"].map(dense["accuracy_std_pct"]))
    return out


def markdown(df: pd.DataFrame) -> str:
    """A markdown table (floats to 2 decimals) without the tabulate package."""
    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def figure(table: pd.DataFrame, summary: pd.DataFrame) -> None:
    fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
    x = summary["warmup_it"].astype(float)
    ax.errorbar(x, summary["instability_mean_pct"], yerr=summary["instability_std_pct"], marker="o", color="C0",
                capsize=3, label="mean ± std over 3 inits")
    ax.scatter(table["warmup_it"], table["instability_pct"], color="C0", alpha=0.35, s=18, label="each init")
    ax.axhline(THRESHOLD * 100, color="0.35", linestyle=":", label="stability threshold (2%)")
    ax.set_xscale("symlog", linthresh=25, linscale=0.6)
    ax.set_xticks(sorted(table["warmup_it"].unique()))
    ax.set_xticklabels([f"{v:g}" for v in sorted(table["warmup_it"].unique())])
    ax.set_xlabel("linear warmup (iterations of 400)")
    ax.set_ylabel("instability at k = 0 (%, test error)")
    ax.set_title("Conv-4 (width 1/4), mnist5k, SGD 0.03 m0.9", fontsize=9)
    ax.legend(fontsize=7)
    for ext in ("png", "pdf"):
        fig.savefig(HERE / f"instability_vs_warmup.{ext}", dpi=150)
    plt.close(fig)


def main() -> None:
    table = sweep_table()
    summary = summarize(table)
    table.to_csv(HERE / "sweep_k0.csv", index=False, float_format="%.4f")
    summary.to_csv(HERE / "summary_k0.csv", index=False, float_format="%.4f")
    figure(table, summary)
    print(markdown(table))
    print()
    print(markdown(summary))
    imp = imp_table()
    if not imp.empty:
        imp.to_csv(HERE / "imp_rewind0.csv", index=False, float_format="%.4f")
        print()
        print(markdown(imp))


if __name__ == "__main__":
    main()
