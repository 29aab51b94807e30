"""Indexing speed of `shard.py index` locally, and the bytes it fetches over HTTP.

    python benchmarks/bench_index.py --shards /tmp/ab/cifar-train --http

Local: samples/s of ``pipeline.formats.index.index`` over the shards (best of
``--repeats``).  ``--http``: the same shards served by a real nginx on 127.0.0.1 (started
and stopped here; Debian's nginx), indexed from their URLs; the bytes nginx sent (its
access log) against the shards' total size.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
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
http {{ log_format b '$status $body_bytes_sent'; access_log {tmp}/access.log b;
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="a directory of .tar shards")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--http", action="store_true", help="also index them over HTTP (nginx)")
    a = ap.parse_args()
    from pipeline.formats.index import index
    shards = sorted(glob.glob(os.path.join(a.shards, "*.tar")))
    total = sum(os.path.getsize(s) for s in shards)
    with tempfile.TemporaryDirectory() as tmp:
        best = 0.0
        for r in range(a.repeats):
            t = time.perf_counter()
            s = index(shards, os.path.join(tmp, f"local{r}"), workers=a.workers)
            best = max(best, s["num_samples"] / (time.perf_counter() - t))
        print(f"local: {s['num_samples']:,} samples in {len(shards)} shards ({total / 1e6:.1f} MB): "
              f"best {best:,.0f} samples/s (workers {a.workers})")
        if a.http:
            proc, url, log = _nginx(os.path.abspath(a.shards), tmp)
            try:
                urls = [f"{url}/{os.path.basename(p)}" for p in shards]
                t = time.perf_counter()
                s = index(urls, os.path.join(tmp, "remote"), workers=max(4, a.workers))
                dt = time.perf_counter() - t
                time.sleep(0.3)  # nginx writes its log line after the response
                sent = sum(int(line.split()[1]) for line in open(log))
            finally:
                proc.terminate(); proc.wait(timeout=10)
            print(f"http:  {s['num_samples']:,} samples in {dt:.1f} s; nginx sent {sent / 1e6:.2f} MB "
                  f"= {sent / total:.2%} of the shards' bytes")


if __name__ == "__main__":
    main()
