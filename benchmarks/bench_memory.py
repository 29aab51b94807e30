"""Resident memory of the Loader over many epochs (does it grow?), and its peak.

    python benchmarks/bench_memory.py --data /tmp/photos-wds --batch 256 --epochs 20

One Loader (imagenet preset, CPU, policy ``--policy`` at ``--keep``) runs ``--epochs``
epochs; after each, the resident memory of this process and of its reader processes
(children, when ``--workers`` > 0) is printed.  Growth is measured from the end of epoch 2
(buffers, DALI's pools and the page cache of the maps are warm by then) to the last epoch;
the peak is the kernel's high-water mark (VmHWM) of this process plus the children's
largest resident set.  Figures go to docs/benchmarks.md with the machine and date.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status(pid: int | str, key: str) -> float:
    """A ``/proc/PID/status`` field in MB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        pids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--keep", type=float, default=1.0)
    ap.add_argument("--policy", default="full")
    ap.add_argument("--backend", default="dali", choices=["dali", "torch"])
    ap.add_argument("--workers", type=int, default=None, help="reader processes (default: the Loader's)")
    a = ap.parse_args(argv)
    import pipeline
    from tqdm import tqdm
    ds = pipeline.open_dataset(a.data)
    L = pipeline.Loader(ds, batch_size=a.batch, keep=a.keep, policy=a.policy, epochs=a.epochs,
                        seed=0, backend=a.backend, device="cpu", augment="imagenet",
                        num_workers=a.workers)
    own, kids, peak_kids = [], [], 0.0
    t0 = time.perf_counter()
    for e in tqdm(range(a.epochs), desc="epochs", unit="epoch"):
        for b in L.epoch(e):
            pass
        child = [_status(p, "VmRSS") for p in _children()]
        peak_kids = max(peak_kids, sum(child))
        own.append(_status("self", "VmRSS"))
        kids.append(sum(child))
        tqdm.write(f"epoch {e:2d}: RSS {own[-1]:7.0f} MB (this process) + {kids[-1]:6.0f} MB "
                   f"({len(child)} children)")
    dt = time.perf_counter() - t0
    L.close()
    total = [o + k for o, k in zip(own, kids)]
    ref = total[min(2, len(total) - 1)]
    growth = total[-1] / ref - 1
    peak = _status("self", "VmHWM") + peak_kids
    print(f"\n{a.epochs} epochs of {len(ds):,} images, batch {a.batch}, {a.backend} backend, "
          f"keep {a.keep}: {dt:.0f} s")
    print(f"RSS after epoch 2 {ref:.0f} MB, after epoch {a.epochs - 1} {total[-1]:.0f} MB: "
          f"growth {growth:+.1%} (target within 5%); peak {peak:.0f} MB "
          f"(this process's high-water mark + its readers' largest)")
    return {"rss": total, "growth": growth, "peak_mb": peak}


if __name__ == "__main__":
    main()
