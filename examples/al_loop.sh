#!/usr/bin/env bash
# A complete active-learning loop scripted over fmask's staged commands.
# Default: the paper's Setting 2 on the shared CIFAR-10 image folder, small CNN, CPU, two query rounds.
#   bash examples/al_loop.sh [EXP_DIR]
# Environment overrides: DATASET, SETTING, INITIAL, BATCH, ROUNDS, STRATEGY, MODEL, EPOCHS, DEVICE, SEED,
# SPARSITY (for STRATEGY=fishermask; default 0.05 for the small CNN, the paper's 0.002 for other models: a mask
# must hold at least twice the classifier layer's entries), TEST_PER_CLASS, FMASK (the command to run).
# Every step skips itself when its output exists with the same inputs, so rerunning resumes an interrupted loop.
set -euo pipefail

EXP=${1:-exp/al_loop}
HERE=$(cd "$(dirname "$0")" && pwd)
DATASET=${DATASET:-folder:$HERE/../../shared/datasets/cifar10}
SETTING=${SETTING:-setting2}
INITIAL=${INITIAL:-500}
BATCH=${BATCH:-500}
ROUNDS=${ROUNDS:-2}
STRATEGY=${STRATEGY:-entropy}
MODEL=${MODEL:-cnn}
EPOCHS=${EPOCHS:-30}
DEVICE=${DEVICE:-auto}
SEED=${SEED:-0}
if [ "$MODEL" = cnn ]; then SPARSITY=${SPARSITY:-0.05}; else SPARSITY=${SPARSITY:-0.002}; fi
TEST_PER_CLASS=${TEST_PER_CLASS:-}
FMASK=${FMASK:-fmask}

test_opt=()
[ -n "$TEST_PER_CLASS" ] && test_opt=(--test-per-class "$TEST_PER_CLASS")

$FMASK build-pool --dataset "$DATASET" --setting "$SETTING" --initial "$INITIAL" --seed "$SEED" \
    "${test_opt[@]}" --out "$EXP/pool"
$FMASK train --pool "$EXP/pool" --labeled "$EXP/pool/labeled.json" --model "$MODEL" --epochs "$EPOCHS" \
    --seed "$SEED" --device "$DEVICE" --out "$EXP/round0.pt"

labeled="$EXP/pool/labeled.json"
for ((r = 0; r < ROUNDS; r++)); do
    mask_opt=()
    if [ "$STRATEGY" = fishermask ]; then
        $FMASK fisher --ckpt "$EXP/round$r.pt" --sparsity "$SPARSITY" --device "$DEVICE" --out "$EXP/fisher$r.safetensors"
        mask_opt=(--mask "$EXP/fisher$r.safetensors")
    fi
    $FMASK query --ckpt "$EXP/round$r.pt" --strategy "$STRATEGY" --batch "$BATCH" --seed "$SEED" \
        --device "$DEVICE" "${mask_opt[@]}" --out "$EXP/query$r.json"
    $FMASK label --query "$EXP/query$r.json" --out "$EXP/labeled$((r + 1)).json"
    labeled="$EXP/labeled$((r + 1)).json"
    $FMASK train --pool "$EXP/pool" --labeled "$labeled" --model "$MODEL" --epochs "$EPOCHS" \
        --seed "$SEED" --device "$DEVICE" --out "$EXP/round$((r + 1)).pt"
done
$FMASK plot "$EXP"
