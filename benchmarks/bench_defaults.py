"""The Loader's knobs side by side, to choose its defaults by measurement.

    python benchmarks/bench_defaults.py --data /tmp/photos-wds --augment imagenet --batch 64
    python benchmarks/bench_defaults.py --data data/cifar25k-train --augment cifar --batch 256

Configurations (DALI backend, CPU, keep 1.0, policy full): DALI threads ``--threads``
(default 1 2 3 4), prefetch depth ``--prefetch`` (2 3 4) and reader processes
``--workers`` (0 1 2), each varied alone from the defaults (threads
min(4, cores), prefetch 2, 0 reader processes on local CPU); one warm-up epoch each, then
``--repeats`` rounds with the configurations interleaved in a rotating order; best and
median images/s relative to the defaults.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=DeprecationWarning)


def row(ds, batch: int, augment: str, threads, prefetch: int, workers):
    import pipeline
    L = pipeline.Loader(ds, batch_size=batch, keep=1.0, policy="full", epochs=1000, seed=0,
                        backend="dali", device="cpu", augment=augment, num_workers=workers,
                        options=pipeline.LoaderOptions.of(num_threads=threads, prefetch=prefetch))
    e = [0]

    def run() -> int:
        n = sum(int((b.ids >= 0).sum()) for b in L.epoch(e[0]))
        e[0] += 1
        return n
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--augment", default="imagenet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2, 3, 4])
    ap.add_argument("--prefetch", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import pipeline
    ds = pipeline.open_dataset(a.data)
    dflt_threads = max(1, min(4, os.cpu_count() or 1))
    configs = {"defaults": (None, 2, None)}
    configs.update({f"threads={t}": (t, 2, None) for t in a.threads if t != dflt_threads})
    configs.update({f"prefetch={p}": (None, p, None) for p in a.prefetch if p != 2})
    configs.update({f"workers={w}": (None, 2, w) for w in a.workers if w != 0})
    runs = {k: row(ds, a.batch, a.augment, *v) for k, v in configs.items()}
    for r in runs.values():
        r()
    res = {k: [] for k in runs}
    names = list(runs)
    for k in range(a.repeats):
        for name in names[k % len(names):] + names[:k % len(names)]:
            t = time.perf_counter()
            n = runs[name]()
            res[name].append(n / (time.perf_counter() - t))
    base = res["defaults"]
    print(f"{len(ds):,} images, {a.augment}, batch {a.batch}, {os.cpu_count()} cores "
          f"(defaults: threads {dflt_threads}, prefetch 2, 0 reader processes)")
    print(f"{'config':12s} {'best':>7s} {'median':>7s} {'vs defaults (best/median)':>26s}")
    for name, v in res.items():
        print(f"{name:12s} {max(v):7.0f} {statistics.median(v):7.0f} "
              f"{max(v) / max(base):12.2f} / {statistics.median(v) / statistics.median(base):.2f}")


if __name__ == "__main__":
    main()
