#!/usr/bin/env bash
# The one-command GPU check (`make gpu-check`): on a machine with one NVIDIA GPU and no
# network, install the GPU dependencies from the wheels carried beside the checkout
# (wheels/gpu/, made by scripts/gpu-wheels.sh: large wheels in parts, rejoined here and
# checked against SHA256SUMS), run the tests marked `gpu` on real data, and print the GPU
# benchmark table (benchmarks/bench_gpu.py).  Bounded: LIMIT seconds (default 480) in all.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT="${LIMIT:-480}"
START=$(date +%s)
left() { echo $((LIMIT - ($(date +%s) - START))); }
PY="${PY:-python3}"
W=wheels/gpu
SITE=.gpu-site

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no CUDA GPU")'

if [ -d "$W" ]; then
    for first in "$W"/*.whl.part-00; do            # rejoin split wheels
        [ -e "$first" ] || continue
        whl="${first%.part-00}"
        cat "$whl".part-* > "$whl" && rm -f "$whl".part-*
    done
    ( cd "$W" && sha256sum -c --quiet SHA256SUMS )
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$W"/*.whl
else
    echo "gpu-check: no $W (run scripts/gpu-wheels.sh where PyPI is reachable); using what is installed"
fi
export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import nvidia.dali as d; print("DALI", d.__version__)' || echo "gpu-check: DALI missing: its rows and tests will fail"

# real data: the CIFAR-10 JPEGs (carried in wheels/gpu/data or SHARED_DATA) -> test shards and photos
export SHARED_DATA="${SHARED_DATA:-$PWD/$W/data}"
PHOTOS="${PHOTOS:-/tmp/gpu-photos}"
if [ ! -f "$PHOTOS-wds/manifest.json" ]; then
    "$PY" benchmarks/make_photos.py --src "$SHARED_DATA/cifar10-jpeg.tar.gz" --out "$PHOTOS" --count 2000
    "$PY" tools/shard.py "$PHOTOS/train" "$PHOTOS-wds" --format wds --samples-per-shard 250 --no-progress
fi

echo "== tests marked gpu ($(left) s left)"
timeout "$(( $(left) - 150 ))" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || status=$?
echo "== GPU benchmark ($(left) s left)"
timeout "$(( $(left) - 5 ))" "$PY" benchmarks/bench_gpu.py --data "$PHOTOS-wds" --repeats 3
exit "${status:-0}"
