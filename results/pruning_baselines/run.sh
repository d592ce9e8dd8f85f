#!/usr/bin/env bash
# Pruning baselines on mnist5k, 5 levels at prune_fraction 0.6 (densities 40%, 16%, 6.4%, 2.6%, 1.0%), rewind to
# step 0, SGD with a step schedule so that LR rewinding and fine-tuning differ.
#   MODEL=lenet (default): LeNet-300-100, preset lenet300_mnist5k (layerwise, output layer at rate 0.1), 600 it
#   MODEL=conv4:           Conv-4 at width 1/4, preset conv4_mnist5k (global), 400 it
#   REPLICATES (default 3 for lenet, 2 for conv4): init seeds init_seed + r; LEVELS, FRACTION; OUT (results root).
# With options, only that run (e.g. to run two at a time once the first run has trained the dense trunks).
# Every run's `random` baseline is its own mask shuffled within each layer at every level (Frankle et al. 2021's
# non-compounding layer shuffle); `--mask-shuffle layer` is the shuffle kept in IMP's lineage (compounding).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-lenet}
case "$MODEL" in
  lenet) PRESET=lenet300_mnist5k; LR=0.05; MILESTONES=300it,450it; REPLICATES=${REPLICATES:-3} ;;
  conv4) PRESET=conv4_mnist5k; LR=0.01; MILESTONES=200it,300it; REPLICATES=${REPLICATES:-2} ;;
  *) echo "MODEL must be lenet or conv4, got $MODEL" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/pb_$MODEL}
COMMON=(--preset "$PRESET" --set runtime.threads=1 --set optimizer.name=sgd --set optimizer.lr="$LR"
        --set optimizer.momentum=0.9 --set schedule.kind=step --set schedule.milestones="$MILESTONES"
        --levels "${LEVELS:-5}" --prune-fraction "${FRACTION:-0.6}" --rewind 0 --replicates "$REPLICATES"
        --out "$OUT" --quiet)
run() { local t0=$SECONDS; .venv/bin/python -m stability imp "${COMMON[@]}" "$@" > /dev/null; echo "$* : $((SECONDS - t0)) s"; }
if [ $# -gt 0 ]; then run "$@"; exit; fi   # one run: run.sh --strategy grasp --baselines random
run --baselines random                      # IMP, weight rewinding (trains the dense trunks too)
run --retrain lr_rewind
run --retrain finetune
run --strategy snip --baselines random
run --strategy grasp --baselines random
run --strategy synflow --baselines random
run --mask-shuffle layer                    # the shuffle kept in the lineage, for comparison
run --strategy random                       # uniform random pruning at each level's density
