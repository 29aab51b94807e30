"""Planner benchmarks: plan time, peak memory, read locality and batch mixing.

    python benchmarks/bench_planner.py time --n 1000000 10000000
    python benchmarks/bench_planner.py memory --n 10000000
    python benchmarks/bench_planner.py locality
    python benchmarks/bench_planner.py all --n 100000000      # once: time + memory

Run pinned to one core (taskset -c 0) with OMP_NUM_THREADS=1. Synthetic manifest: shards
of `--shard` samples, ids in byte order (as tools/shard.py writes them); scores with
lognormal losses (every sample seen), policy swdpp at keep 0.7.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from pipeline.plan.planner import make_plan
from pipeline.plan.policies import get_policy
from pipeline.plan.scores import Scores
from pipeline.streams import Stream, rng


def setup(n: int, shard: int, seed: int = 0):
    ids = np.arange(n, dtype=np.int64)
    file = (ids // shard).astype(np.uint32)
    offset = ((ids % shard) * 2048 + 512).astype(np.uint64)
    del ids
    gen = np.random.default_rng(seed)
    s = Scores(n)
    s.ema[:] = gen.lognormal(-1, 1, n)
    s.var[:] = gen.random(n, np.float32)
    s.count[:] = 1
    s.last_epoch[:] = 0
    return file, offset, s


def cmd_time(a):
    """Policy, make_plan and digest seconds (best of --repeat, the policies' repetitions
    interleaved, consecutive epochs from 3 on: the carry-over policies plan in order)."""
    print(f"{'N':>12} {'policy':>10} {'policy s':>9} {'plan s':>8} {'digest s':>9} {'plan ns/sample':>15}")
    for n in a.n:
        file, offset, s = setup(n, a.shard)
        pols = {name: get_policy(name, keep=a.keep, epochs=10) for name in a.policies}
        times = {name: ([], [], []) for name in a.policies}
        for rep in range(a.repeat):
            for name, pol in pols.items():
                tp, tm, td = times[name]
                t0 = time.perf_counter()
                out = pol(s, 3 + rep, rng(0, 3 + rep, Stream.POLICY))
                t1 = time.perf_counter()
                plan = make_plan(out, seed=0, epoch=3 + rep, file=file, offset=offset, order=None, window=a.window)
                t2 = time.perf_counter()
                plan.digest
                t3 = time.perf_counter()
                tp.append(t1 - t0), tm.append(t2 - t1), td.append(t3 - t2)
                del out, plan
        for name, (tp, tm, td) in times.items():
            print(f"{n:>12,} {name:>10} {min(tp):>9.3f} {min(tm):>8.3f} {min(td):>9.3f} "
                  f"{1e9 * min(tm) / n:>15.1f}", flush=True)


def cmd_memory(a):
    for n in a.n:
        file, offset, s = setup(n, a.shard)
        pol = get_policy("swdpp", keep=a.keep, epochs=10)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        out = pol(s, 3, rng(0, 3, Stream.POLICY))
        policy_peak = tracemalloc.get_traced_memory()[1] - base
        out_bytes = out.p.nbytes + out.weight.nbytes + out.mixup.nbytes
        tracemalloc.reset_peak()
        base2 = tracemalloc.get_traced_memory()[0]
        plan = make_plan(out, seed=0, epoch=3, file=file, offset=offset, order=None, window=a.window)
        plan_peak = tracemalloc.get_traced_memory()[1] - base2
        tracemalloc.stop()
        plan_bytes = plan.ids.nbytes + plan.weights.nbytes + plan.mixup.nbytes
        inputs = file.nbytes + offset.nbytes + s.ema.nbytes * 4
        print(f"N={n:,}: inputs (manifest file+offset, scores) {inputs / n:.0f} B/sample; "
              f"policy peak {policy_peak / n:.1f} B/sample (output {out_bytes / n:.0f}); "
              f"make_plan peak {plan_peak / n:.1f} B/sample (plan {plan_bytes / n:.1f}); "
              f"peak total {policy_peak / 2**30 + plan_peak / 2**30:.2f} GiB above inputs", flush=True)


def locality(plan_ids: np.ndarray, file: np.ndarray, label: np.ndarray, batch: int):
    """(mean run of consecutive same-shard samples in plan order, samples per merged read,
    distinct labels per batch, distinct shards per batch).

    Samples per merged read: a reader that sorts one batch's byte ranges and merges
    ranges that touch (byte-adjacent samples of one shard; ids are in byte order here)
    issues batch / that many requests."""
    ids = plan_ids[plan_ids >= 0]
    f = file[ids]
    runs = 1 + np.count_nonzero(np.diff(f))
    nb = ids.size // batch
    b_ids = np.sort(ids[: nb * batch].reshape(nb, batch), axis=1)
    adjacent = (np.diff(b_ids, axis=1) == 1) & (np.diff(file[b_ids], axis=1) == 0)
    merged = nb * batch / (nb * batch - np.count_nonzero(adjacent))
    lab = label[ids[: nb * batch]].reshape(nb, batch)
    fb = f[: nb * batch].reshape(nb, batch)
    labels_per_batch = np.mean([np.unique(r).size for r in lab])
    shards_per_batch = np.mean([np.unique(r).size for r in fb])
    return ids.size / runs, merged, labels_per_batch, shards_per_batch


def cmd_locality(a):
    for n, shard, classes in ((50_000, 1000, 10), (1_000_000, 10_000, 100)):
        file, offset, s = setup(n, shard)
        label = (np.arange(n) * classes // n).astype(np.int32)   # class-sorted shards
        out = get_policy("swdpp", keep=a.keep, epochs=10)(s, 3, rng(0, 3, Stream.POLICY))
        print(f"N={n:,}, {n // shard} shards of {shard}, {classes} classes sorted by class, "
              f"keep {a.keep}, batch {a.batch}")
        print(f"{'window':>7} {'run length':>11} {'per read':>9} {'labels/batch':>13} {'shards/batch':>13}")
        for w in (1, 2, 4, 8, 16, 10**9):
            plan = make_plan(out, seed=0, epoch=3, file=file, offset=offset, window=w)
            r, m, lb, sb = locality(plan.ids, file, label, a.batch)
            name = "all" if w == 10**9 else str(w)
            print(f"{name:>7} {r:>11.2f} {m:>9.2f} {lb:>13.2f} {sb:>13.2f}")
        # reference: a full random shuffle of the selected ids
        ids = np.random.default_rng(0).permutation(plan.ids[plan.ids >= 0])
        r, m, lb, sb = locality(ids, file, label, a.batch)
        print(f"{'shuffle':>7} {r:>11.2f} {m:>9.2f} {lb:>13.2f} {sb:>13.2f}")


def cmd_all(a):
    """Time (one repetition) then peak memory in one process: for the single 100M run."""
    a.repeat = 1
    cmd_time(a)
    cmd_memory(a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["time", "memory", "locality", "all"])
    ap.add_argument("--n", type=lambda x: int(float(x)), nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--shard", type=int, default=10_000, help="samples per shard")
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=["swdpp"], help="policies timed side by side (time)")
    a = ap.parse_args()
    {"time": cmd_time, "memory": cmd_memory, "locality": cmd_locality, "all": cmd_all}[a.what](a)


if __name__ == "__main__":
    main()
