"""Conversion speed (images/s) and bytes on disk per payload byte, CIFAR-10 JPEG train.

    python benchmarks/bench_convert.py [--archive ../shared/data/cifar10-jpeg.tar.gz]
        [--workers 1 2] [--formats wds zarr] [--limit N]

Extracts the archive to a temp dir, then converts with each (format, workers) into a fresh
output and prints one line each. Timings include the image check pass and the manifest.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", default=str(repo.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--formats", nargs="+", default=["wds", "zarr"])
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    from pipeline.formats import convert
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-xzf", args.archive, "-C", tmp], check=True)
        src = Path(tmp) / "cifar10-jpeg" / "train"
        print(f"{'format':6} {'workers':>7} {'samples':>8} {'shards':>6} {'seconds':>8} "
              f"{'images/s':>9} {'payload MB':>10} {'disk MB':>8} {'disk/payload':>12}")
        for fmt in args.formats:
            for w in args.workers:
                s = convert(src, Path(tmp) / f"out-{fmt}-{w}", format=fmt, workers=w,
                            limit=args.limit, progress=False)
                print(f"{fmt:6} {w:>7} {s['num_samples']:>8} {s['num_shards']:>6} "
                      f"{s['seconds']:>8.2f} {s['images_per_s']:>9,.0f} "
                      f"{s['payload_bytes'] / 1e6:>10.1f} {s['bytes_on_disk'] / 1e6:>8.1f} "
                      f"{s['disk_per_payload']:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
