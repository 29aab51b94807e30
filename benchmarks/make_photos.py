"""Build an offline stand-in for ImageNet-size photographs from the CIFAR-10 JPEGs.

    python benchmarks/make_photos.py --src ../shared/data/cifar10-jpeg.tar.gz --out /tmp/photos --count 2000
    python tools/shard.py /tmp/photos/train /tmp/photos-wds --format wds --samples-per-shard 250

Each CIFAR-10 training JPEG is upscaled (bicubic) to a shorter side drawn uniformly from
[300, 500] px with an aspect ratio drawn log-uniformly from [3/4, 4/3], given mild
Gaussian grain (``--noise``, the fine texture an upscale lacks, so that the entropy-coded
size and decode work resemble a photograph's) and re-encoded at JPEG quality 90 (about
20-60 KB each): decode cost grows with pixels, so this is close enough to real photographs
for loader throughput.  Output: an ImageFolder tree
``OUT/train/<class>/<name>.jpg``.  Deterministic from ``--seed``.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile

import numpy as np
from tqdm import tqdm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="../shared/data/cifar10-jpeg.tar.gz", help="cifar10-jpeg archive")
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=2000, help="images to write")
    ap.add_argument("--shorter", type=int, nargs=2, default=(300, 500), metavar=("MIN", "MAX"))
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--noise", type=float, default=6.0, help="grain: std of Gaussian noise, in 0-255 levels")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from PIL import Image

    rng = np.random.default_rng(a.seed)
    total, n = 0, 0
    with tarfile.open(a.src) as tf, tqdm(total=a.count, unit="img", desc="photos") as bar:
        for m in tf:
            if n >= a.count:
                break
            parts = m.name.split("/")
            if not (m.isfile() and m.name.endswith(".jpg") and "train" in parts):
                continue
            cls = parts[-2]
            with Image.open(io.BytesIO(tf.extractfile(m).read())) as im:
                im = im.convert("RGB")
                s = int(rng.integers(a.shorter[0], a.shorter[1] + 1))
                r = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
                w, h = (int(round(s * r)), s) if r >= 1 else (s, int(round(s / r)))
                big = np.asarray(im.resize((w, h), Image.BICUBIC), dtype=np.float32)
            big += rng.normal(0.0, a.noise, size=big.shape).astype(np.float32)
            big = Image.fromarray(np.clip(big + 0.5, 0, 255).astype(np.uint8))
            d = os.path.join(a.out, "train", cls)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, os.path.basename(m.name))
            big.save(path, "JPEG", quality=a.quality)
            total += os.path.getsize(path)
            n += 1
            bar.update(1)
    print(f"wrote {n} JPEGs to {a.out}/train: {total / 1e6:.1f} MB, {total / max(n, 1) / 1e3:.1f} KB each")


if __name__ == "__main__":
    main()
