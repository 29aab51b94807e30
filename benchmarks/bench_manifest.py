"""Time and memory of open_dataset() for a manifest of N synthetic rows (default 10M).

    python benchmarks/bench_manifest.py [--rows 10000000]

Writes a synthetic manifest (1000 files, random labels/sizes) to a temp dir, drops it from
the page cache, then in a fresh process times open_dataset() and a full pass over the
labels column, reporting that process's resident memory (VmRSS) before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, sys, time
def rss_mb():   # current resident set (ru_maxrss would include the parent's pages before exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter()
import pipeline.formats.manifest as m
t_import = time.perf_counter() - t0
rss0 = rss_mb()
t0 = time.perf_counter()
ds = m.open_dataset(sys.argv[1])
t_open = time.perf_counter() - t0
rss1 = rss_mb()
t0 = time.perf_counter()
hist = (ds.labels[:] % 10).sum()
t_scan = time.perf_counter() - t0
rss2 = rss_mb()
print(json.dumps({"rows": len(ds), "open_s": t_open, "labels_scan_s": t_scan,
                  "rss_before_open_mb": rss0, "rss_after_open_mb": rss1,
                  "rss_after_scan_mb": rss2}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    args = p.parse_args()
    from pipeline.formats.manifest import write_manifest
    n = args.rows
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        length = rng.integers(700, 1200, n, dtype=np.uint32)
        per_file = -(-n // 1000)
        file = (np.arange(n) // per_file).astype(np.uint32)
        offset = np.zeros(n, np.uint64)
        ends = np.cumsum((-(-length.astype(np.int64) // 512) * 512 + 1536))
        offset[:] = ends - (-(-length.astype(np.int64) // 512) * 512)
        columns = {"file": file, "offset": offset, "length": length,
                   "label": rng.integers(0, 1000, n, dtype=np.int32),
                   "key": rng.permutation(n), "crc32": rng.integers(0, 2**32, n, dtype=np.uint32)}
        header = {"format": "wds", "codec": "jpeg", "classes": [str(i) for i in range(1000)],
                  "sample_shape": None, "channels": 3, "num_samples": n,
                  "files": [{"path": f"shard-{k:06d}.tar", "size": 0, "sha256": ""}
                            for k in range(1000)], "source": {"type": "synthetic"}, "seed": 0,
                  "fingerprint": "synthetic"}
        write_manifest(tmp, header, columns)
        t_write = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        os.sync()
        for f in Path(tmp).rglob("*.npy"):      # cold cache for the open
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        out = subprocess.run([sys.executable, "-c", CHILD, tmp], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        r = json.loads(out.stdout)
        print(f"rows {n:,}: manifest {size / 1e6:.0f} MB ({size / n:.1f} B/row), written in {t_write:.2f}s")
        print(f"open_dataset {r['open_s'] * 1e3:.1f} ms; RSS {r['rss_before_open_mb']:.0f} -> "
              f"{r['rss_after_open_mb']:.0f} MB after open, {r['rss_after_scan_mb']:.0f} MB after "
              f"reading all labels ({r['labels_scan_s'] * 1e3:.0f} ms, columns memory-mapped)")


if __name__ == "__main__":
    main()
