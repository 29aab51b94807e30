"""Two source trees' Loaders side by side in one run: epochs interleaved A, B, B, A, ...

    git worktree add /tmp/tree-before <rev>
    python benchmarks/bench_ab_trees.py --trees /tmp/tree-before . --data data/cifar-train \\
        --epochs 8 --backend dali

Each tree runs in its own long-lived process (its ``pipeline`` package first on sys.path;
the script checks which one it imported), with the options both APIs share: policy
``full`` (keep 1.0) or ``uniform`` (keep < 1), batch size, backend, CPU, augment preset,
reader processes.  The parent tells one process at a time to run one epoch, alternating
the order every round so that the machine's drift falls on both alike, and prints per
tree the best and median images/s, CPU seconds per image, and the B/A ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r'''
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")
tree, data, backend, batch, keep, augment, workers = sys.argv[1:8]
sys.path.insert(0, tree)
for m in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
    del sys.modules[m]
import pipeline
assert os.path.realpath(pipeline.__file__).startswith(os.path.realpath(tree)), pipeline.__file__
ds = pipeline.open_dataset(data)
keep = float(keep)
kw = dict(batch_size=int(batch), keep=keep, policy="full" if keep >= 1 else "uniform", epochs=1000,
          seed=0, backend=backend, device="cpu", augment=None if augment == "none" else augment)
if workers != "default":
    kw["num_workers"] = int(workers)
L = pipeline.Loader(ds, **kw)
e = 0
print(json.dumps({"ready": pipeline.__file__}), flush=True)
for line in sys.stdin:
    r0 = resource.getrusage(resource.RUSAGE_SELF); c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter(); n = 0
    for b in L.epoch(e):
        n += int((b.ids >= 0).sum())
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF); c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
           + c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
    e += 1
    print(json.dumps({"images": n, "seconds": dt, "cpu_s": cpu}), flush=True)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs=2, required=True, metavar=("A", "B"), help="two source trees")
    ap.add_argument("--data", required=True, help="a converted dataset (tools/shard.py output)")
    ap.add_argument("--backend", default="dali")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--keep", type=float, default=1.0)
    ap.add_argument("--augment", default="cifar", help="cifar | imagenet | none")
    ap.add_argument("--workers", default="default", help="reader processes (default: the Loader's)")
    ap.add_argument("--epochs", type=int, default=8, help="timed epochs per tree (after one warm-up)")
    ap.add_argument("--procs", type=int, default=2, choices=(1, 2),
                    help="processes per tree (2: launched A, B, B, A, used in turn; see main)")
    a = ap.parse_args()
    # Two processes per tree, launched A, B, B, A: a process launched earlier ran ~6% faster
    # here (an A/A run with one process each gave B/A 0.93 median and CPU 1.06x, and so did
    # an A/B run in both orders), and with this order both trees have the same mean rank.
    launch = [0, 1, 1, 0] if a.procs == 2 else [0, 1]
    procs = []
    for i in launch:
        t = a.trees[i]
        p = subprocess.Popen([sys.executable, "-u", "-c", WORKER, os.path.abspath(t), a.data, a.backend,
                              str(a.batch), str(a.keep), a.augment, a.workers],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.path.abspath(t))
        print(f"{t}: {json.loads(p.stdout.readline())['ready']}", flush=True)
        procs.append(p)
    pairs = [(0, 1), (3, 2)] if a.procs == 2 else [(0, 1)]  # (A process, B process)

    def epoch(k: int) -> dict:
        procs[k].stdin.write("epoch\n"); procs[k].stdin.flush()
        return json.loads(procs[k].stdout.readline())

    for k in range(len(procs)):  # warm-up: page cache, pipeline build
        epoch(k)
    rows: list[list[dict]] = [[], []]
    for r in range(a.epochs):  # each round: one process of each tree, A first on even rounds
        pair = pairs[(r // 2) % len(pairs)]
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            rows[i].append(epoch(pair[i]))
            x = rows[i][-1]
            print(f"round {r} tree {'AB'[i]} (process {pair[i]}): {x['images'] / x['seconds']:8.0f} img/s "
                  f"{1e6 * x['cpu_s'] / x['images']:7.1f} CPU us/img", flush=True)
    for p in procs:
        p.stdin.close(); p.wait()
    summary = {}
    for i, t in enumerate(a.trees):
        ips = [x["images"] / x["seconds"] for x in rows[i]]
        cpi = [1e6 * x["cpu_s"] / x["images"] for x in rows[i]]
        summary["AB"[i]] = dict(tree=t, best=max(ips), median=statistics.median(ips),
                                cpu_us_median=statistics.median(cpi))
        print(f"{'AB'[i]} {t}: best {max(ips):.0f} img/s, median {statistics.median(ips):.0f}, "
              f"median CPU {statistics.median(cpi):.1f} us/img")
    A, B = summary["A"], summary["B"]
    print(f"B/A: best {B['best'] / A['best']:.3f}x, median {B['median'] / A['median']:.3f}x, "
          f"CPU per image {B['cpu_us_median'] / A['cpu_us_median']:.3f}x")


if __name__ == "__main__":
    main()
