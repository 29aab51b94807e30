#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the GPU check installs on a machine without
# network (benchmarks/gpu_check.sh), and pack them into bundles that fit one transfer each.
#   bash scripts/gpu-wheels.sh [PYTHON_VERSION]    # the GPU machine's Python, default 3.12
# Output, in wheels/gpu/ (ignored by git):
#   SHA256SUMS   checksums of the whole wheels (and of the data archive)
#   b1/ b2/ ...  bundles of at most BUNDLE MiB (default 58): whole wheels, or parts
#                NAME.whl.part-NN of a wheel too large for one (`split -b`); b1 holds the
#                data archive (data/cifar10-jpeg.tar.gz, when SHARED_DATA has it) and the
#                small wheels, so that the GPU machine can build its photos while the
#                other bundles travel.
# Carry wheels/gpu/SHA256SUMS and one bundle per call; gpu_check.sh rejoins the parts
# (in part order, whatever bundle they came in) and checks every file against SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
BUNDLE="${BUNDLE:-58}"
OUT=wheels/gpu
PIP="${PIP:-.venv/bin/pip}"
rm -rf "$OUT" && mkdir -p "$OUT/dl"
# the zarr the tests ran with here (newer ones need packages the GPU image lacks)
ZARR=$("${PIP%/pip}/python" -c 'import zarr; print(zarr.__version__)' 2>/dev/null || echo 3.1.6)
# DALI for CUDA 13 (the lent machines' driver), each of its requirements that the GPU
# machine's image lacks (nvImageCodec + nvJPEG for decoding, nvCOMP, the graph tooling),
# and the project's runtime dependencies missing there.  --no-deps: the image already has
# torch, numpy, the CUDA runtime, pillow, fsspec, tqdm, pytest; second copies would shadow them.
"$PIP" download -q --no-deps --dest "$OUT/dl" --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    nvidia-dali-cuda130==2.4.0 'nvidia-nvimgcodec-cu13>=0.9,<0.10' nvidia-libnvcomp-cu13==5.3.0.16 \
    'nvidia-nvjpeg>=13,<14' astunparse gast optree nvtx makefun 'libcst~=1.8' \
    webdataset braceexpand "zarr==$ZARR" numcodecs donfig crc32c google-crc32c zlib-ng
data="${SHARED_DATA:-../shared/data}/cifar10-jpeg.tar.gz"
[ -f "$data" ] && mkdir -p "$OUT/dl/data" && cp "$data" "$OUT/dl/data/"
( cd "$OUT/dl" && sha256sum *.whl data/* 2>/dev/null > ../SHA256SUMS )
limit=$((BUNDLE * 1024 * 1024))
# pieces: whole files, or parts of those larger than a bundle; then first-fit into bundles,
# the data archive and the smallest wheels first (b1 starts the photos on the GPU machine)
pieces="$OUT/pieces"
mkdir -p "$pieces"
for f in "$OUT"/dl/*.whl "$OUT"/dl/data/*; do
    [ -e "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt "$limit" ]; then
        split -b "${BUNDLE}M" -d "$f" "$pieces/$(basename "$f").part-"
    else
        cp "$f" "$pieces/"
    fi
done
python3 - "$pieces" "$OUT" "$limit" <<'EOF'
import os, shutil, sys
pieces, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sorted(os.listdir(pieces), key=lambda n: (not n.endswith(".tar.gz"), ".part-" in n,
                                                  os.path.getsize(os.path.join(pieces, n))))
bundles: list[list[str]] = []
sizes: list[int] = []
for n in names:
    s = os.path.getsize(os.path.join(pieces, n))
    k = next((i for i, used in enumerate(sizes) if used + s <= limit), None)
    if k is None:
        bundles.append([]); sizes.append(0); k = len(bundles) - 1
    bundles[k].append(n); sizes[k] += s
for i, group in enumerate(bundles, 1):
    d = os.path.join(out, f"b{i}")
    os.makedirs(d)
    for n in group:
        sub = os.path.join(d, "data") if n.endswith(".tar.gz") else d
        os.makedirs(sub, exist_ok=True)
        shutil.move(os.path.join(pieces, n), os.path.join(sub, n))
    print(f"  b{i}: {sizes[i - 1] / 2**20:5.1f} MiB  {len(group)} files")
EOF
rm -rf "$OUT/dl" "$pieces"
echo "wheels/gpu: $(du -sh "$OUT" | cut -f1); carry wheels/gpu/SHA256SUMS and one bundle per call (b1 first)"
