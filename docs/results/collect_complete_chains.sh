#!/usr/bin/env bash
# Copies the finished chains of `fmask run` result trees (every query round trained) into a small tree of
# metrics.csv files that `fmask plot` reads, leaving checkpoints, masks, embeddings and pools behind.
#   bash docs/results/collect_complete_chains.sh RESULTS_DIR ROUNDS OUT_DIR
set -euo pipefail
src=$1 rounds=$2 dst=$3
rm -rf "$dst" && mkdir -p "$dst"
find "$src" -name metrics.csv -path '*/seed*/*/metrics.csv' | sort | while read -r metrics; do
    # round 0 plus one row per query round: a chain stopped early would bias its area under the curve
    if [ "$(tail -n +2 "$metrics" | wc -l)" -eq $((rounds + 1)) ]; then
        rel=${metrics#"$src"/}
        mkdir -p "$dst/$(dirname "$rel")" && cp "$metrics" "$dst/$rel"
    else
        echo "left out (unfinished): $metrics" >&2
    fi
done
for run in "$src"/*/; do  # the run's step timings, for the time-per-step figure
    name=$(basename "$run")
    if [ -d "$dst/$name" ] && [ -f "$run/timings.csv" ]; then cp "$run/timings.csv" "$dst/$name/"; fi
done
