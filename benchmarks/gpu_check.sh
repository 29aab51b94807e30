#!/usr/bin/env bash
# The one-command GPU check (`make gpu-check`): on a machine with one NVIDIA GPU and no
# network, install the GPU dependencies from the wheels carried beside the checkout
# (wheels/gpu/, made by scripts/gpu-wheels.sh: bundles b1, b2, ... of whole wheels or parts
# of the large ones, rejoined here and checked against SHA256SUMS), run the tests marked
# `gpu` on real data, and print the GPU benchmark table (benchmarks/bench_gpu.py).
#   bash benchmarks/gpu_check.sh            # everything, bounded by LIMIT seconds (default 480)
#   TESTS=0 ROWS="loader dali_reader" bash benchmarks/gpu_check.sh   # only those benchmark rows
#   bash benchmarks/gpu_check.sh install    # only install the carried wheels into .gpu-site
#   bash benchmarks/gpu_check.sh photos     # only build the photo shards (from bundle b1:
#                                           # the data archive and the small wheels), e.g. in
#                                           # the background while the other bundles travel
# Logs go to $LOGS (default $OUT when set, else /tmp/gpu-check); the photos' to /tmp/gpu-photos.log.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT="${LIMIT:-480}"
START=$(date +%s)
left() { echo $((LIMIT - ($(date +%s) - START))); }
PY="${PY:-python3}"
W=wheels/gpu
SITE="$PWD/.gpu-site"
LOGS="${LOGS:-${OUT:-/tmp/gpu-check}}"
COUNT="${COUNT:-10000}"                     # photos: enough for epochs of a second or more
PHOTOS="${PHOTOS:-/tmp/gpu-photos}"
NPROC=$(nproc)
mkdir -p "$LOGS"

install_wheels() {  # $1: target dir; the rest: wheels
    local target=$1; shift
    [ $# -gt 0 ] || return 0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$target" "$@"
}

photos() {
    # from a copy of the checkout: each call to the GPU machine lays the working tree anew,
    # which a background build reading the tree would trip over
    local repo=/tmp/gpu-repo site=/tmp/gpu-photos-site src
    rm -rf "$repo" && mkdir -p "$repo" && cp -r pipeline tools benchmarks "$repo/" || return 1
    src=$(ls "$PWD/$W"/b*/data/cifar10-jpeg.tar.gz "${SHARED_DATA:-../shared/data}/cifar10-jpeg.tar.gz" 2>/dev/null | head -1)
    [ -n "$src" ] || { echo "gpu-check: no cifar10-jpeg.tar.gz (bundle b1 or SHARED_DATA)"; return 1; }
    cp "$src" "$repo/cifar10-jpeg.tar.gz"
    # the small wheels of b1 (webdataset, zarr, ...) are enough to build the shards
    [ -n "${SKIP_INSTALL:-}" ] || install_wheels "$site" $(ls "$W"/b1/*.whl 2>/dev/null | grep -v nvidia_) || return 1
    ( cd "$repo" && export PYTHONPATH="$site:$repo" &&
      "$PY" benchmarks/make_photos.py --src cifar10-jpeg.tar.gz --out "$PHOTOS" --count "$COUNT" --workers "$NPROC" &&
      "$PY" tools/shard.py "$PHOTOS/train" "$PHOTOS-wds" --format wds --samples-per-shard 500 \
          --workers "$NPROC" --no-progress ) || return 1
    touch "$PHOTOS-wds.done"
}

if [ "${1:-}" = photos ]; then
    echo $$ > /tmp/gpu-photos.pid
    photos > /tmp/gpu-photos.log 2>&1; echo "photos exit $?" >> /tmp/gpu-photos.log
    rm -f /tmp/gpu-photos.pid
    exit 0
fi

install_all() {  # the carried wheels -> $SITE
    if [ -d "$W" ]; then
        # rejoin split wheels: the parts may have come in different bundles
        for first in $(ls "$W"/b*/*.whl.part-00 2>/dev/null); do
            name=$(basename "${first%.part-00}")
            cat $(ls "$W"/b*/"$name".part-* | awk -F'.part-' '{print $NF, $0}' | sort -n | cut -d' ' -f2-) > "$W/$name"
        done
        mkdir -p "$W/all" && for f in "$W"/b*/*.whl "$W"/*.whl; do ln -sf "$PWD/$f" "$W/all/"; done
        ( cd "$W/all" && sha256sum -c --quiet <(grep '\.whl$' ../SHA256SUMS) ) || { echo "gpu-check: a wheel does not match SHA256SUMS"; return 1; }
        install_wheels "$SITE" "$W"/all/*.whl || return 1
    else
        echo "gpu-check: no $W (run scripts/gpu-wheels.sh where PyPI is reachable); using what is installed"
    fi
}
install_all || exit 1
[ "${1:-}" = install ] && exit 0  # only the wheels (scripts/gpu_sweep.sh)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no CUDA GPU")' || exit 1

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import nvidia.dali as d; print("DALI", d.__version__)' || echo "gpu-check: DALI missing: its rows and tests will fail"

# real data: the CIFAR-10 JPEGs -> the tests' shards, and the photos for the benchmark
export SHARED_DATA="${SHARED_DATA:-$(dirname "$(ls "$W"/b*/data/cifar10-jpeg.tar.gz 2>/dev/null | head -1)")}"
if [ ! -f "$PHOTOS-wds.done" ] && [ -f /tmp/gpu-photos.pid ] && kill -0 "$(cat /tmp/gpu-photos.pid)" 2>/dev/null; then
    echo "== waiting for the photos started earlier ($(left) s left)"
    while kill -0 "$(cat /tmp/gpu-photos.pid 2>/dev/null)" 2>/dev/null && [ "$(left)" -gt 60 ]; do sleep 1; done
fi
if [ ! -f "$PHOTOS-wds.done" ]; then
    echo "== building $COUNT photos ($(left) s left)"
    rm -rf "$PHOTOS" "$PHOTOS-wds"
    photos > /tmp/gpu-photos.log 2>&1
fi
tail -3 /tmp/gpu-photos.log 2>/dev/null; cp /tmp/gpu-photos.log "$LOGS/" 2>/dev/null

echo "== GPU benchmark ($(left) s left)"
timeout "$(( $(left) - ${TEST_RESERVE:-150} ))" "$PY" benchmarks/bench_gpu.py --data "$PHOTOS-wds" --repeats "${REPEATS:-5}" \
    ${ROWS:+--rows $ROWS} ${PROFILE:+--profile $PROFILE} 2>&1 | tee "$LOGS/bench_gpu.log"
bench=${PIPESTATUS[0]}
if [ "${TESTS:-1}" = 0 ]; then  # a benchmark-only rerun
    echo "gpu-check: tests not run (TESTS=0), bench exit $bench"; exit "$bench"
fi
echo "== tests marked gpu ($(left) s left)"
timeout "$(( $(left) - 5 ))" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests -rs \
    > "$LOGS/pytest_gpu.log" 2>&1
status=$?
tail -25 "$LOGS/pytest_gpu.log"
echo "gpu-check: bench exit $bench, tests exit $status, $(( $(date +%s) - START )) s"
[ "$status" = 0 ] && [ "$bench" = 0 ]
