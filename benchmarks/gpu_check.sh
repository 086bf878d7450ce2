#!/usr/bin/env bash
# One prepared check of fmask on a GPU (about 5 minutes on one H200): stages A-E of benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT]        # OUT defaults to $OUT, else ./gpu_check_out
#
# A environment, B CPU-vs-GPU correctness (TF32 off) and --deterministic reruns, C paper-scale `fmask fisher`
# against the backward-pass floor, D paper-scale Fisher-greedy selection in float32 and float64, E one real CLI
# round on ResNet-18 (--compile last) and the trainer against a DataLoader loop. Writes OUT/gpu_check.log and, as
# each stage finishes, OUT/stage_<X>.json (a stage that fails or runs past its time limit still gets one, with
# "status": "failed"), so a run cut off midway still reports what it did. --dry-run runs the same stages on the
# CPU with tiny sizes (under 2 minutes). Exit status: 0 when every stage ran and met its targets, 1 otherwise.
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=()
out="${OUT:-}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=(--dry-run) ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) echo "unknown option $arg" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
out="${out:-gpu_check_out}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"

# Seconds each stage may take on the GPU (the dry run is far below them).
declare -A limit=([A]=60 [B]=120 [C]=180 [D]=180 [E]=420)
status=0
for stage in A B C D E; do
    rm -f "$out/stage_$stage.json"
    echo "== stage $stage ($(date -u +%H:%M:%S) UTC)" | tee -a "$log"
    started=$(date +%s)
    timeout --kill-after=10 "${limit[$stage]}" "$python" -m benchmarks.gpu_check "$stage" --out "$out" \
        "${dry_run[@]}" 2>&1 | tee -a "$log"
    code=${PIPESTATUS[0]}
    seconds=$(( $(date +%s) - started ))
    if [ "$code" -ne 0 ] || [ ! -f "$out/stage_$stage.json" ]; then
        reason="exit code $code"
        [ "$code" -eq 124 ] || [ "$code" -eq 137 ] && reason="ran past its ${limit[$stage]} s limit"
        printf '{"stage": "%s", "status": "failed", "reason": "%s", "seconds": %s}\n' \
            "$stage" "$reason" "$seconds" > "$out/stage_$stage.json"
        echo "== stage $stage FAILED: $reason" | tee -a "$log"
        status=1
    elif ! grep -q '"passed": true' "$out/stage_$stage.json"; then
        echo "== stage $stage ran, below its targets (see $out/stage_$stage.json)" | tee -a "$log"
        status=1
    else
        echo "== stage $stage ok (${seconds} s)" | tee -a "$log"
    fi
done
echo "== done: $out/stage_{A,B,C,D,E}.json, log $log" | tee -a "$log"
exit $status
