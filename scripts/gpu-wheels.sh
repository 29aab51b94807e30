#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the GPU check installs on a machine without
# network (benchmarks/gpu_check.sh), and cut the large ones into parts that fit one
# transfer (PART, default 60 MiB).  Output: wheels/gpu/ (ignored by git): *.whl or
# *.whl.part-NN, SHA256SUMS of the whole files, and data/cifar10-jpeg.tar.gz when
# SHARED_DATA holds it.  Rejoin with `cat F.part-* > F` (gpu_check.sh does it).
#   bash scripts/gpu-wheels.sh [PYTHON_VERSION]    # the GPU machine's Python, default 3.11
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.11}"
PART="${PART:-60M}"
OUT=wheels/gpu
PIP="${PIP:-.venv/bin/pip}"
mkdir -p "$OUT/dl" "$OUT/data"
# DALI for CUDA 13 (the lent machines' driver) and what it imports; the project's own
# runtime dependencies that the GPU machine lacks (it has torch, torchvision and numpy).
"$PIP" download -q --dest "$OUT/dl" --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    nvidia-dali-cuda130==2.4.0 webdataset braceexpand 'zarr>=3.1,<4' fsspec tqdm pyyaml pytest
# torch, numpy and the CUDA runtime are there already: never install second copies
rm -f "$OUT"/dl/torch-* "$OUT"/dl/numpy-* "$OUT"/dl/nvidia_cu*_runtime* "$OUT"/dl/nvidia_cublas*
( cd "$OUT/dl" && sha256sum *.whl > ../SHA256SUMS )
for f in "$OUT"/dl/*.whl; do
    if [ "$(stat -c %s "$f")" -gt $((60 * 1024 * 1024)) ]; then
        split -b "$PART" -d "$f" "$OUT/$(basename "$f").part-"
    else
        cp "$f" "$OUT/"
    fi
done
rm -rf "$OUT/dl"
data="${SHARED_DATA:-../shared/data}/cifar10-jpeg.tar.gz"
[ -f "$data" ] && cp "$data" "$OUT/data/"
echo "wheels/gpu: $(ls "$OUT" | wc -l) files, $(du -sh "$OUT" | cut -f1); carry them one path per call:"
ls "$OUT" "$OUT/data" | sed 's/^/  /'
