"""Build an offline stand-in for ImageNet-size photographs from the CIFAR-10 JPEGs.

    python benchmarks/make_photos.py --src ../shared/data/cifar10-jpeg.tar.gz --out /tmp/photos --count 2000
    python tools/shard.py /tmp/photos/train /tmp/photos-wds --format wds --samples-per-shard 250

Each CIFAR-10 training JPEG is upscaled (bicubic) to a shorter side drawn uniformly from
[300, 500] px with an aspect ratio drawn log-uniformly from [3/4, 4/3], given mild
Gaussian grain (``--noise``, the fine texture an upscale lacks, so that the entropy-coded
size and decode work resemble a photograph's) and re-encoded at JPEG quality 90 (about
20-60 KB each): decode cost grows with pixels, so this is close enough to real photographs
for loader throughput.  Output: an ImageFolder tree
``OUT/train/<class>/<name>.jpg``.  Deterministic from ``--seed`` (each image's draws from ``(seed, index)``, whatever ``--workers``).
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile

import numpy as np
from tqdm import tqdm


def _write(a, work: list[tuple[int, str, str, bytes]]) -> tuple[int, int]:
    """Upscale, grain and re-encode ``(index, class, name, jpeg)`` items; each image's
    draws come from ``(seed, index)``, so the output does not depend on ``--workers``."""
    from PIL import Image

    total = 0
    for i, cls, name, data in work:
        rng = np.random.default_rng([a.seed, i])
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            s = int(rng.integers(a.shorter[0], a.shorter[1] + 1))
            r = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            w, h = (int(round(s * r)), s) if r >= 1 else (s, int(round(s / r)))
            big = np.asarray(im.resize((w, h), Image.BICUBIC), dtype=np.float32)
        big += rng.normal(0.0, a.noise, size=big.shape).astype(np.float32)
        big = Image.fromarray(np.clip(big + 0.5, 0, 255).astype(np.uint8))
        d = os.path.join(a.out, "train", cls)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, name)
        big.save(path, "JPEG", quality=a.quality)
        total += os.path.getsize(path)
    return len(work), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="../shared/data/cifar10-jpeg.tar.gz", help="cifar10-jpeg archive")
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=2000, help="images to write")
    ap.add_argument("--shorter", type=int, nargs=2, default=(300, 500), metavar=("MIN", "MAX"))
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--noise", type=float, default=6.0, help="grain: std of Gaussian noise, in 0-255 levels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes encoding photos")
    a = ap.parse_args()

    items = []
    with tarfile.open(a.src) as tf:
        for m in tf:
            if len(items) >= a.count:
                break
            parts = m.name.split("/")
            if m.isfile() and m.name.endswith(".jpg") and "train" in parts:
                items.append((len(items), parts[-2], os.path.basename(m.name), tf.extractfile(m).read()))
    chunks = [items[k:k + 50] for k in range(0, len(items), 50)]
    n = total = 0
    with tqdm(total=len(items), unit="img", desc="photos") as bar:
        if a.workers <= 1:
            results = (_write(a, c) for c in chunks)
        else:
            from concurrent.futures import ProcessPoolExecutor
            pool = ProcessPoolExecutor(a.workers)
            results = pool.map(_write, [a] * len(chunks), chunks)
        for k, size in results:
            n, total = n + k, total + size
            bar.update(k)
    print(f"wrote {n} JPEGs to {a.out}/train: {total / 1e6:.1f} MB, {total / max(n, 1) / 1e3:.1f} KB each")


if __name__ == "__main__":
    main()
