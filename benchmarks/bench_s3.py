"""S3 on loopback: bytes the server sent at keep 0.7 vs 1.0, and images/s vs local disk.

    python benchmarks/make_photos.py --out /tmp/photos --count 2000
    python tools/shard.py /tmp/photos/train /tmp/photos-wds --format wds --samples-per-shard 250
    python benchmarks/bench_s3.py --data /tmp/photos-wds --repeats 3

Starts SeaweedFS (``weed mini``, tests/_s3.py) on 127.0.0.1, uploads the dataset to
``s3://data/bench`` (formats/upload.py) and puts a counting TCP proxy (tests/_proxy.py)
between the Loader and the S3 gateway: the bytes counted there are what the server
sent, headers included, not the Loader's own counters.  Rows: the Loader (DALI backend,
the ``--augment`` preset, batch ``--batch``, policy uniform, its default reader
processes per storage) on the local shards, on S3 directly, and on S3 through the proxy
(the bytes rows: the proxy costs CPU of its own), at keep 1.0 and 0.7; ``--s3-workers
0 2`` adds S3 rows with that many reader processes.  A warm-up
epoch per row, then ``--repeats`` rounds with the rows interleaved (rotating order);
best and median images/s, the S3 rows' bytes sent by the server per epoch, and CPU per
image of the Loader's processes and of the server's (from /proc), with the cores they
kept busy: on a small machine the server shares the cores, so a row whose cores are all
busy is limited by CPU, not by request latency.  The local shards sit in the page cache
after the warm-up, as the server's own files do.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pipeline  # noqa: E402
from _proxy import CountingProxy  # noqa: E402
from _s3 import start_weed  # noqa: E402
from pipeline.formats.upload import upload_dataset  # noqa: E402

URL = "s3://data/bench"


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def cpu_now(server_pid: int) -> tuple[float, float]:
    """(CPU seconds of this process and its reader processes, of the S3 server's processes)."""
    me = os.getpid()
    mine = sum(_cpu_s(p) for p in [me] + _descendants(me) if p != server_pid
               and p not in _descendants(server_pid))
    return mine, sum(_cpu_s(p) for p in [server_pid] + _descendants(server_pid))


def epoch(loader, e: int) -> tuple[int, float]:
    """Delivered (non-padding) samples and wall seconds of epoch ``e``."""
    t0 = time.perf_counter()
    n = 0
    for b in loader.epoch(e):
        n += int((b.ids >= 0).sum())
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a converted (wds) dataset directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--augment", default="imagenet")
    ap.add_argument("--backend", default="dali")
    ap.add_argument("--s3-workers", type=int, nargs="*", default=[],
                    help="extra S3 rows with these reader processes (the default rows use the "
                         "Loader's default for remote shards)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = start_weed(tmp / "weed")
    proxy = None
    loaders = {}
    try:
        t0 = time.perf_counter()
        up = upload_dataset(a.data, URL, server.storage_options)
        print(f"uploaded {up['uploaded']} objects ({up['bytes'] / 1e6:.1f} MB) in "
              f"{time.perf_counter() - t0:.1f} s")
        proxy = CountingProxy(("127.0.0.1", int(server.endpoint.rsplit(":", 1)[1])))
        counted = {**server.storage_options, "endpoint_url": proxy.url}
        sources = {"local": pipeline.open_dataset(a.data),
                   "s3": pipeline.open_dataset(URL, storage_options=server.storage_options),
                   "s3_proxy": pipeline.open_dataset(URL, storage_options=counted)}
        extra = [f"s3_w{w}" for w in a.s3_workers]
        rows = [(where, keep) for keep in (1.0, 0.7) for where in ("local", "s3", *extra, "s3_proxy")]
        for where, keep in rows:
            workers = int(where[4:]) if where.startswith("s3_w") else None
            loaders[where, keep] = pipeline.Loader(
                sources["s3" if workers is not None else where], a.batch, keep=keep,
                policy="uniform", epochs=a.repeats + 1, seed=0, backend=a.backend, device="cpu",
                augment=a.augment, num_workers=workers)
        rates = {r: [] for r in rows}
        sent = {r: [] for r in rows}
        cpu = {r: [] for r in rows}   # (loader us/img, server us/img) per timed epoch
        for rnd in range(a.repeats + 1):           # round 0: the warm-up
            order = rows[rnd % len(rows):] + rows[:rnd % len(rows)]
            for r in order:
                proxy.reset()
                c0 = cpu_now(server.proc.pid)
                n, s = epoch(loaders[r], rnd)
                c1 = cpu_now(server.proc.pid)
                if rnd:
                    rates[r].append(n / s)
                    sent[r].append(proxy.down)
                    cpu[r].append((1e6 * (c1[0] - c0[0]) / n, 1e6 * (c1[1] - c0[1]) / n))
                print(f"round {rnd} {r[0]:8s} keep {r[1]:.1f}: {n} images, {n / s:7.1f} img/s, "
                      f"server sent {proxy.down / 1e6:7.2f} MB", flush=True)
        print("\n| row | best img/s | median img/s | vs local (best / median) | server sent MB/epoch "
              "| CPU us/img: loader + server | cores busy |")
        print("|---|---|---|---|---|---|---|")
        for where, keep in rows:
            r = rates[where, keep]
            base = rates["local", keep]
            mb = statistics.median(sent[where, keep]) / 1e6 if where == "s3_proxy" else None
            lc = statistics.median(c[0] for c in cpu[where, keep])
            sc = statistics.median(c[1] for c in cpu[where, keep])
            print(f"| {where} keep {keep} | {max(r):.0f} | {statistics.median(r):.0f} | "
                  f"{max(r) / max(base):.2f} / {statistics.median(r) / statistics.median(base):.2f} "
                  f"| {'-' if mb is None else f'{mb:.2f}'} | {lc:.0f} + {sc:.0f} "
                  f"| {(lc + sc) * statistics.median(r) / 1e6:.2f} of {os.cpu_count()} |")
        ratio = statistics.median(sent["s3_proxy", 0.7]) / statistics.median(sent["s3_proxy", 1.0])
        print(f"\nbytes sent by the server, keep 0.7 / keep 1.0: {ratio:.3f}")
    finally:
        for L in loaders.values():
            L.close()
        if proxy is not None:
            proxy.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
