#!/usr/bin/env bash
# Short demo on a built-in real dataset (Fashion-MNIST from Debian's dataset-fashion-mnist):
# convert to WebDataset shards, train full data and SwDPP (keep 0.7) for a few epochs on CPU,
# print the savings table and write the plots. A few minutes on 2 cores.
#
# Knobs (environment): PY, DATA (data dir), RUNS (runs dir), EPOCHS, KEEP, LIMIT (training
# subset size; 0 = all 60,000), BACKEND (dali|torch), FMNIST (source IDX folder).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
RUNS=${RUNS:-runs/demo}
EPOCHS=${EPOCHS:-3}
KEEP=${KEEP:-0.7}
LIMIT=${LIMIT:-30000}
BACKEND=${BACKEND:-dali}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}

if [ ! -x "$PY" ]; then PY=python3; fi
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte" ]; then
  echo "Fashion-MNIST not found in $FMNIST: install Debian's dataset-fashion-mnist (make setup does, as root)" >&2
  exit 1
fi

TRAIN="$DATA/fmnist-demo-train"
TEST="$DATA/fmnist-demo-test"
LIMIT_ARGS=()
if [ "$LIMIT" != "0" ]; then LIMIT_ARGS=(--limit "$LIMIT"); fi

echo "== 1/3 convert Fashion-MNIST to WebDataset shards ($TRAIN, $TEST)"
[ -e "$TRAIN/manifest.json" ] || "$PY" tools/shard.py "$FMNIST" "$TRAIN" --format wds --split train "${LIMIT_ARGS[@]}"
[ -e "$TEST/manifest.json" ]  || "$PY" tools/shard.py "$FMNIST" "$TEST"  --format wds --split test

echo "== 2/3 train full data and SwDPP keep=$KEEP for $EPOCHS epochs (CPU, backend $BACKEND)"
rm -rf "$RUNS"
# Warm the page cache (libraries and shards) so the first run does not pay cold-start costs
# that the second would not: the savings table compares the two side by side.
"$PY" -c "import torch, torchvision, nvidia.dali.fn" >/dev/null 2>&1 || true
cat "$TRAIN"/*.tar "$TEST"/*.tar >/dev/null
for policy in full swdpp; do
  "$PY" -m trainers.classify --data "$TRAIN" --test-data "$TEST" --policy "$policy" --keep "$KEEP" \
      --epochs "$EPOCHS" --seed 0 --backend "$BACKEND" --device cpu --out "$RUNS/$policy"
done

echo "== 3/3 savings report"
"$PY" tools/report.py "$RUNS" --out "$RUNS/report"
echo "plots and report.md in $RUNS/report/"
