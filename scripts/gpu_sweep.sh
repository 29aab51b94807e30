#!/usr/bin/env bash
# Paired training runs on one lent GPU (no network), several at a time: a small model
# leaves the GPU mostly idle, so JOBS trainings share it (tools/compare.py --jobs).
# Carry the wheels as for the GPU check (wheels/gpu, docs/benchmarks.md "How the check
# runs"); the CIFAR-10 JPEG archive in bundle b1 becomes the training and test shards.
#   EPOCHS=30 LR=0.2 SEEDS="0 1 2 3" JOBS=8 LIMIT=400 bash scripts/gpu_sweep.sh
#   POLICIES='full swdpp rs2 infobatch:{"budget":"run"}' (the default), KEEP=0.7,
#   SUBSET=25000 (the first N training images; default all 50,000), DEVICE=cpu (a dry run here)
# The sweep stops at LIMIT seconds (runs still going are killed and left out); the run
# directories' metrics.jsonl, config.json, summary.json and train.log are copied to
# $OUT/runs (default /tmp/gpu-sweep/runs) for tools/report.py.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
LIMIT="${LIMIT:-400}"
PY="${PY:-python3}"
RESULT="${OUT:-/tmp/gpu-sweep}/runs"
DATA=/tmp/gpu-sweep-data
mkdir -p "$RESULT"
bash benchmarks/gpu_check.sh install || exit 1
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -f "$DATA/done" ]; then
    src=$(ls wheels/gpu/b*/data/cifar10-jpeg.tar.gz "${SHARED_DATA:-../shared/data}/cifar10-jpeg.tar.gz" 2>/dev/null | head -1)
    [ -n "$src" ] || { echo "gpu-sweep: no cifar10-jpeg.tar.gz (bundle b1 or SHARED_DATA)"; exit 1; }
    rm -rf "$DATA" && mkdir -p "$DATA" && tar xzf "$src" -C "$DATA" || exit 1
    "$PY" tools/shard.py "$DATA/cifar10-jpeg/train" "$DATA/train" --format wds --workers "$(nproc)" \
        --no-progress ${SUBSET:+--limit $SUBSET} || exit 1
    "$PY" tools/shard.py "$DATA/cifar10-jpeg/test" "$DATA/test" --format wds --workers "$(nproc)" \
        --no-progress || exit 1
    touch "$DATA/done"
fi
echo "== data ready after $(( $(date +%s) - START )) s"

# shellcheck disable=SC2086
setsid "$PY" tools/compare.py --data "$DATA/train" --test-data "$DATA/test" --keep "${KEEP:-0.7}" \
    --epochs "${EPOCHS:-30}" --seeds ${SEEDS:-0 1 2 3} --runs /tmp/gpu-sweep-runs --jobs "${JOBS:-8}" \
    --policies ${POLICIES:-full swdpp rs2 'infobatch:{"budget":"run"}'} \
    -- --device "${DEVICE:-cuda}" --workers 1 --eval-every 10 ${LR:+--lr $LR} > "$RESULT/compare.log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - START )) -lt "$LIMIT" ]; do sleep 2; done
if kill -0 "$pid" 2>/dev/null; then
    echo "gpu-sweep: LIMIT $LIMIT s reached; stopping the runs still going"
    kill -- -"$pid" 2>/dev/null; sleep 2; kill -9 -- -"$pid" 2>/dev/null
fi
grep -E "exit|failed" "$RESULT/compare.log" | tail -40
for d in /tmp/gpu-sweep-runs/*/; do
    [ -f "$d/metrics.jsonl" ] || continue
    mkdir -p "$RESULT/$(basename "$d")"
    cp "$d"/{metrics.jsonl,config.json,summary.json,train.log} "$RESULT/$(basename "$d")/" 2>/dev/null
done
echo "gpu-sweep: $(ls "$RESULT"/*/summary.json 2>/dev/null | wc -l) finished runs in $RESULT, $(( $(date +%s) - START )) s"
