#!/usr/bin/env bash
# Small-scale pruning baselines on LeNet-300-100 / mnist5k: 1 replicate, 5 levels at prune_fraction 0.6
# (densities 40%, 16%, 6.4%, 2.6%, 1.0%), SGD with a step schedule so that LR rewinding and fine-tuning differ.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pruning_baselines_root}
COMMON=(--preset lenet300_mnist5k --set runtime.threads=1 --set optimizer.name=sgd --set optimizer.lr=0.05
        --set optimizer.momentum=0.9 --set schedule.kind=step --set schedule.milestones=300it,450it
        --levels 5 --prune-fraction 0.6 --rewind 0 --out "$OUT" --quiet)
run() { local t0=$SECONDS; .venv/bin/python -m stability imp "${COMMON[@]}" "$@" > /dev/null; echo "$* : $((SECONDS - t0)) s"; }
run --baselines random
run --retrain lr_rewind
run --retrain finetune
run --strategy snip
run --strategy grasp
run --strategy synflow
run --mask-shuffle layer
run --strategy snip --mask-shuffle layer
run --strategy synflow --mask-shuffle layer
