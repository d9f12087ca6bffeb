#!/usr/bin/env bash
# One GPU check, about 7 minutes on one GPU (at most 10): on a machine with CUDA it runs
#   1. the CUDA masking identity tests (tests/test_masking.py -k cuda) and the CUDA packed
#      attention tests (tests/test_packing.py -k cuda: every packed path against the padded step,
#      loss and gradients),
#   2. bf16 training of LOGO and DNABERT at 512 tokens, padded, and packed under each attention
#      path (SDPA over rows with the block-diagonal mask, torch's varlen_attn, flash-attn's
#      kernel: a path the machine lacks is a skipped row), and DNABERT packed with torch.compile: real tokens/s,
#      TFLOP/s, MFU against the GPU's dense bf16 peak (benchmarks/gpu_train.py train),
#   3. the loader benchmark with pinned memory and copies to the GPU (benchmarks/bench_loader.py),
#   4. a 300-step LOGO cm_gems run that must switch and export (benchmarks/gpu_train.py cm-gems),
# then prints one markdown table and writes it to the file given as $1, else to $OUT/gpu_check.md
# when $OUT is set. Without CUDA it prints "no CUDA: skipped" and exits 0.
#
#   bash benchmarks/gpu_check.sh [TABLE.md]
#
# Environment: PYTHON (default python), GPU_CHECK_TINY=1 runs every step at tiny sizes on
# whatever device there is, CPU included (what tests/test_gpu_check.py does), GPU_CHECK_DATA a
# dataset directory (default: the bundled E. coli genome's, built if missing).
# The training steps use DeepSpeed's fused Adam, compiled at the first CUDA run (about a minute)
# unless deepspeed was installed with it prebuilt; without nvcc they fall back to torch's AdamW
# and say so in the table.
# Exit status: 0 when every check passed (or no CUDA), 1 when one failed (the table says which).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TINY=${GPU_CHECK_TINY:-0}
DATA=${GPU_CHECK_DATA:-data/ecoli_k12_mg1655}
TABLE=${1:-${OUT:+$OUT/gpu_check.md}}

if [ "$TINY" != 1 ]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
            2>/dev/null; then
        echo "no CUDA: skipped (benchmarks/gpu_check.sh needs a CUDA GPU and torch built for it)"
        exit 0
    fi
fi

RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT
FAILED=0

if [ "$TINY" = 1 ]; then
    LEN=64; TRAIN=(--steps 3 --warmup 1 --workers 1)
    LOGO_BS=2; DNABERT_BS=2; MODELS=(logo); LOADER=(--batches 20 --baseline-batches 5 --runs 1)
    CM_GEMS=(--steps 8 --eval-interval 2 --micro-batch-size 2 --warmup 1 --workers 1)
    LIMIT=300
else
    LEN=512; TRAIN=(--steps 40 --warmup 10 --workers 2)
    LOGO_BS=64; DNABERT_BS=32; MODELS=(logo dnabert); LOADER=(--device cuda --runs 3)
    CM_GEMS=(--steps 300 --eval-interval 50 --micro-batch-size 64 --workers 2)
    LIMIT=180
fi

ROW() { "$PY" benchmarks/gpu_train.py "$@"; }

# step NAME SECONDS COMMAND...: run one check; a failure (or time-out) adds a FAILED row, and the
# checks after it still run.
step() {
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        FAILED=1
        local why="exit $rc"
        [ $rc -eq 124 ] && why="timed out after $seconds s"
        ROW row --check "$name" --status FAILED --note "$why" \
            --json "$RESULTS/9-failed-$(date +%s%N).json"
    fi
}

# 1. CUDA masking identity (all skipped on a CPU, in the tiny mode)
step "CUDA masking identity" 120 "$PY" -m pytest tests/test_masking.py -q -p no:cacheprovider \
    -k cuda -rs --junitxml "$RESULTS/masking.xml"
# a run that left no report already has its FAILED row from step
[ -f "$RESULTS/masking.xml" ] && ROW pytest-row "$RESULTS/masking.xml" --check "CUDA masking identity" \
    --setting "tests/test_masking.py -k cuda" --json "$RESULTS/0-masking.json"
step "CUDA packed attention" 120 "$PY" -m pytest tests/test_packing.py -q -p no:cacheprovider \
    -k cuda -rs --junitxml "$RESULTS/packing.xml"
[ -f "$RESULTS/packing.xml" ] && ROW pytest-row "$RESULTS/packing.xml" --check "CUDA packed attention" \
    --setting "tests/test_packing.py -k cuda" --json "$RESULTS/0-packing.json"

# 2. training throughput: padded, packed under each attention path, packed and compiled
n=10
for model in "${MODELS[@]}"; do
    bs=$LOGO_BS
    [ "$model" = dnabert ] && bs=$DNABERT_BS
    for run in "off auto" "on sdpa" "on torch_varlen" "on flash_attn" "on auto compile"; do
        set -- $run
        [ "${3:-}" = compile ] && [ "$model" != dnabert ] && [ "$TINY" != 1 ] && continue
        step "training $model packing=$1 attention=$2${3:+ $3}" "$LIMIT" \
            "$PY" benchmarks/gpu_train.py train --data-dir "$DATA" --model "$model" \
            --packing "$1" --attention "$2" ${3:+--compile} --max-length "$LEN" \
            --micro-batch-size "$bs" "${TRAIN[@]}" --json "$RESULTS/1-train-$n.json"
        n=$((n + 1))
    done
done

# 3. the loader, pinned memory and copies to the GPU (on the CPU in the tiny mode)
step "loader" "$LIMIT" "$PY" benchmarks/bench_loader.py --data-dir "$DATA" \
    --max-length "$LEN" "${LOADER[@]}" --json "$RESULTS/loader.out"
if [ -f "$RESULTS/loader.out" ]; then
    ROW loader-rows "$RESULTS/loader.out" --json "$RESULTS/2-loader.json"
fi

# 4. a cm_gems run that switches and exports
step "cm_gems run" "$((LIMIT + 120))" "$PY" benchmarks/gpu_train.py cm-gems --data-dir "$DATA" \
    --max-length "$LEN" "${CM_GEMS[@]}" --json "$RESULTS/3-cm-gems.json"

echo
ROW table "$RESULTS"/*.json ${TABLE:+--out "$TABLE"} || FAILED=1
[ -n "$TABLE" ] && echo "table written to $TABLE"
grep -q '"FAILED"' "$RESULTS"/*.json && FAILED=1
exit $FAILED
