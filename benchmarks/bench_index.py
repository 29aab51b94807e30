"""Indexing speed of `shard.py index` locally, and the bytes it fetches over HTTP.

    python benchmarks/bench_index.py --shards /tmp/ab/cifar-train --http

Local: samples/s of ``pipeline.formats.index.index`` over the shards with 1 and 2 worker
processes (``--workers``; rows interleaved, best and median of ``--repeats``).  ``--http``: the same shards served by a real nginx on 127.0.0.1 (started
and stopped here; Debian's nginx), indexed from their URLs; the bytes nginx sent (its
access log: response bodies, and bodies plus HTTP response headers) against the shards'
total size, and the number of requests.  ``--repack``: first rewrite the shards with the
``webdataset`` library's own ``ShardWriter`` (PAX headers with float mtimes: two extra
blocks per member, as third-party shards have them) and index those.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nginx(root: str, tmp: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(tmp, "nginx.conf")
    user = "user root;" if os.geteuid() == 0 else ""
    with open(conf, "w") as f:
        f.write(f"""{user}
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{ log_format b '$status $body_bytes_sent $bytes_sent'; access_log {tmp}/access.log b;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/f;
  uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;
  server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }} }}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-c", conf, "-p", tmp], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}", os.path.join(tmp, "access.log")


def _repack(shards: list[str], out: str) -> list[str]:
    """The samples of ``shards`` rewritten by webdataset.ShardWriter (same members, keys)."""
    import webdataset as wds
    os.makedirs(out)
    per = max(1, sum(1 for _ in wds.WebDataset(shards[:1], shardshuffle=False)))
    with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=per, verbose=0) as w:
        for smp in wds.WebDataset(shards, shardshuffle=False):
            w.write({k: v for k, v in smp.items() if k == "__key__" or not k.startswith("__")})
    return sorted(glob.glob(os.path.join(out, "*.tar")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="a directory of .tar shards")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="worker processes for the local rows (rows interleaved in each repeat)")
    ap.add_argument("--http", action="store_true", help="also index them over HTTP (nginx)")
    ap.add_argument("--repack", action="store_true",
                    help="rewrite the shards with webdataset.ShardWriter first (PAX headers)")
    a = ap.parse_args()
    from pipeline.formats.index import index
    shards = sorted(glob.glob(os.path.join(a.shards, "*.tar")))
    with tempfile.TemporaryDirectory() as tmp:
        if a.repack:
            shards = _repack(shards, os.path.join(tmp, "repacked"))
        total = sum(os.path.getsize(s) for s in shards)
        rates: dict[int, list[float]] = {w: [] for w in a.workers}
        for r in range(a.repeats):
            for w in a.workers:
                t = time.perf_counter()
                s = index(shards, os.path.join(tmp, f"local{r}-{w}"), workers=w)
                rates[w].append(s["num_samples"] / (time.perf_counter() - t))
                shutil.rmtree(os.path.join(tmp, f"local{r}-{w}"))
        for w, v in rates.items():
            print(f"local: {s['num_samples']:,} samples in {len(shards)} shards ({total / 1e6:.1f} MB), "
                  f"workers {w}: best {max(v):,.0f}, median {statistics.median(v):,.0f} samples/s")
        if a.http:
            proc, url, log = _nginx(os.path.dirname(os.path.abspath(shards[0])), tmp)
            try:
                urls = [f"{url}/{os.path.basename(p)}" for p in shards]
                t = time.perf_counter()
                s = index(urls, os.path.join(tmp, "remote"), workers=max(4, *a.workers))
                dt = time.perf_counter() - t
                time.sleep(0.3)  # nginx writes its log line after the response
                lines = [line.split() for line in open(log)]
            finally:
                proc.terminate(); proc.wait(timeout=10)
            body, whole = (sum(int(v[k]) for v in lines) for k in (1, 2))
            print(f"http:  {s['num_samples']:,} samples in {dt:.1f} s, {len(lines):,} requests "
                  f"({len(lines) / s['num_samples']:.2f} per sample); nginx sent {body / 1e6:.2f} MB "
                  f"of bodies = {body / total:.2%} of the shards' bytes ({whole / total:.2%} with "
                  f"HTTP response headers); {total / s['num_samples'] / 1e3:.1f} KB per sample")


if __name__ == "__main__":
    main()
