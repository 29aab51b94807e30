"""Real HTTP servers for the tests, on 127.0.0.1 with free ports, stopped by PID.

``nginx`` (honours Range requests; logs method, URI, status, bytes sent and the Range
header of each request) and ``python -m http.server`` (ignores Range: answers 200 with
the whole file).  Each helper returns a :class:`Server`; ``stop()`` ends that process
only (SIGCONT first, in case a test froze it with SIGSTOP).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path | None = None

    def pids(self) -> list[int]:
        """The server process and its children (nginx: the master and its worker)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout.split()
        return [self.proc.pid] + [int(p) for p in out]

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process of the server (SIGSTOP freezes it all)."""
        for pid in self.pids():
            os.kill(pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _start(cmd: list[str], port: int, stderr: Path, what: str) -> subprocess.Popen:
    """Start ``cmd`` (stderr to a file: a pipe nobody reads would block the server) and
    wait until it listens on ``port``."""
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                pytest.skip(f"{what} failed to start: {stderr.read_text()[:300]}")
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.skip(f"{what} did not listen on port {port}")


def start_nginx(root: Path, tmp: Path, locations: str = "") -> Server:
    """nginx serving ``root`` (one worker process, ``daemon off``: ``proc`` is the master);
    ``locations``: extra location blocks (e.g. one that answers 503)."""
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
  log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
  access_log {tmp}/access.log ranges;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{ }}
    {locations}
  }}
}}
""")
    proc = _start([NGINX, "-c", str(conf), "-p", str(tmp)], port, tmp / "stderr.log", "nginx")
    return Server(f"http://127.0.0.1:{port}", proc, tmp / "access.log")


def start_http_server(root: Path, tmp: Path) -> Server:
    """``python -m http.server`` serving ``root``: a server without Range support."""
    port = free_port()
    proc = _start([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                   "--directory", str(root)], port, tmp / "http-server.log", "http.server")
    return Server(f"http://127.0.0.1:{port}", proc)
