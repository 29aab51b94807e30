"""S3 through a real object store: SeaweedFS (``weed mini``) on 127.0.0.1, started here.

* ``tools/shard.py SRC s3://bucket/prefix`` converts the CIFAR subset into the bucket
  (endpoint and credentials from the AWS environment variables): the objects equal the
  local conversion's files byte for byte, ``--verify`` passes over S3, and a conversion
  killed mid-upload leaves no manifest (never "complete") and resumes;
* ``open_dataset("s3://...", storage_options=...)`` + Loader, one epoch at keep 1.0 and
  0.7 on both backends: the same ids, labels and pixels as the local copy; the bytes the
  server sent (counted by a TCP proxy) are the planned ranges;
* wrong credentials, a missing object, a server killed or frozen mid-epoch: one error
  naming ``s3://bucket/key`` (and the range), within a bounded time.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pipeline
from _proxy import CountingProxy
from _s3 import start_weed
from pipeline.formats.header import ManifestError
from pipeline.formats.upload import upload_dataset
from pipeline.options import LoaderOptions
from pipeline.read.errors import AccessDenied, RemoteUnreachable, ShardMissing
from pipeline.read.remote import RetryPolicy

FAST = dict(request_timeout=1.0, retries=1)  # a failing read gives up within ~4.5 s
# reads that must succeed after the fork below: a timeout no loaded machine trips
ALIVE = dict(request_timeout=5.0, retries=1)
URL = "s3://data/cifar"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_weed(tmp_path_factory.mktemp("weed"))
    yield server
    server.stop()


def _shard(repo_root, args, env, **kw):
    return subprocess.run([sys.executable, str(repo_root / "tools" / "shard.py"), *args,
                           "--no-progress"], cwd=repo_root, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="module")
def s3_cifar(s3, cifar_jpeg_root, cifar_wds, repo_root, tmp_path_factory):
    """The CIFAR subset converted with tools/shard.py into s3://data/cifar, with the same
    parameters as the local ``cifar_wds`` (so the two are the same bytes)."""
    stage = tmp_path_factory.mktemp("stage")
    p = _shard(repo_root, [str(cifar_jpeg_root / "train"), URL, "--limit", "2000",
                           "--samples-per-shard", "500", "--seed", "0", "--stage", str(stage)],
               s3.env)
    assert p.returncode == 0, p.stderr
    assert "converted" in p.stdout and "uploaded and verified" in p.stdout, p.stdout
    return URL


def _loader(ds, backend="torch", workers=0, keep=1.0, **opts):
    return pipeline.Loader(ds, 100, keep=keep, policy="uniform", epochs=1, seed=3,
                           backend=backend, num_workers=workers, device="cpu", augment=None,
                           options=LoaderOptions.of(**opts))


# -- conversion into the bucket ------------------------------------------------------------

def test_converted_objects_equal_local(s3, s3_cifar, cifar_wds, repo_root):
    ds = pipeline.open_dataset(s3_cifar, storage_options=s3.storage_options)
    local = pipeline.open_dataset(cifar_wds)
    assert ds.fingerprint == local.fingerprint and len(ds) == len(local) == 2000
    assert ds.files[0] == f"{URL}/shard-000000.tar"
    for attr in ("file", "offset", "length", "labels", "keys", "crc32"):
        assert np.array_equal(getattr(ds, attr), getattr(local, attr)), attr
    fs = s3.fs()
    for path, entry in zip(ds.files, ds.file_entries):
        assert fs.size(path) == entry.size
    assert fs.cat_file(ds.files[1]) == open(local.files[1], "rb").read()
    p = _shard(repo_root, ["--verify", s3_cifar], s3.env)
    assert p.returncode == 0 and "verify OK: 2000 samples in 4 wds files" in p.stdout, p.stderr


def test_interrupted_upload_is_incomplete_then_resumes(s3, fmnist_dir, repo_root, tmp_path):
    """Killed at the conversion, then killed mid-upload: no manifest.json in the bucket
    (open_dataset refuses it); the third run completes, sends only what is missing, and
    the result verifies."""
    url, stage = "s3://data/resume", tmp_path / "stage"
    args = [str(fmnist_dir), url, "--split", "train", "--limit", "1200",
            "--samples-per-shard", "200", "--stage", str(stage)]
    for phase in ("write", "upload"):
        env = {**s3.env, "PIPELINE_CONVERT_PAUSE": f"{phase}:60"}
        proc = subprocess.Popen([sys.executable, str(repo_root / "tools" / "shard.py"), *args,
                                 "--no-progress"], cwd=repo_root, env={**os.environ, **env},
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            line = ""
            deadline = time.monotonic() + 60
            while f"paused at {phase}" not in line and time.monotonic() < deadline:
                line = proc.stderr.readline()
                assert line or proc.poll() is None, f"exited before {phase}"
            assert f"paused at {phase}" in line
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()
        with pytest.raises(ManifestError, match="not a converted dataset"):
            pipeline.open_dataset(url, storage_options=s3.storage_options)
    # the first object is verified before the pause; which one (an index file, a column,
    # a shard) and how many others the upload threads finished by then depends on timing
    sent = s3.fs().find(url.removeprefix("s3://"))
    assert sent, "the killed upload sent nothing"
    assert not any(p.endswith("manifest.json") for p in sent)
    p = _shard(repo_root, args, s3.env)
    assert p.returncode == 0, p.stderr
    assert "resumed" in p.stdout or "uploaded" in p.stdout, p.stdout
    skipped = int(p.stdout.split("verified, ")[1].split()[0])
    assert skipped >= 1, p.stdout   # what the killed run had verified is not sent again
    ds = pipeline.open_dataset(url, storage_options=s3.storage_options)
    assert len(ds) == 1200 and len(ds.files) == 6
    p = _shard(repo_root, ["--verify", url], s3.env)
    assert p.returncode == 0 and "verify OK: 1200 samples" in p.stdout, p.stderr


# -- reading: the same samples as the local copy --------------------------------------------

@pytest.mark.parametrize("backend,workers,keep", [("torch", 0, 1.0), ("torch", 1, 0.7),
                                                  ("dali", 1, 1.0), ("dali", 0, 0.7)])
def test_epoch_equals_local(s3, s3_cifar, cifar_wds, backend, workers, keep):
    remote = _loader(pipeline.open_dataset(s3_cifar, storage_options=s3.storage_options),
                     backend, workers, keep)
    local = _loader(pipeline.open_dataset(cifar_wds), backend, 0, keep)
    try:
        n = 0
        for a, b in zip(remote.epoch(0), local.epoch(0), strict=True):
            assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images)
            n += int((a.ids >= 0).sum())
        st = remote.stats(0)
    finally:
        remote.close()
        local.close()
    assert n == round(keep * 2000), n
    assert st.samples_delivered == n
    assert st.bytes_read < n * 4096  # the planned ranges (CIFAR JPEGs: ~1 KiB), not shards


def test_bytes_sent_by_server_are_the_planned_ranges(s3, s3_cifar):
    """Counted at the socket by a proxy: keep 0.7 makes the server send <= 0.72x the bytes
    of keep 1.0 (the planned payloads, plus headers and merge slack)."""
    proxy = CountingProxy(("127.0.0.1", int(s3.endpoint.rsplit(":", 1)[1])))
    try:
        opts = {**s3.storage_options, "endpoint_url": proxy.url}
        ds = pipeline.open_dataset(s3_cifar, storage_options=opts)
        sent = {}
        for keep in (1.0, 0.7):
            loader = _loader(ds, "torch", 0, keep, merge_gap=0)
            proxy.reset()
            ids = np.concatenate([b.ids.numpy() for b in loader.epoch(0)])
            sent[keep] = proxy.down
            payload = int(np.asarray(ds.length, np.int64)[ids[ids >= 0]].sum())
            # the payloads, plus each answer's HTTP headers (one per sample: no merging)
            assert payload <= proxy.down < payload + len(ids) * 1024, (keep, payload, proxy.down)
            loader.close()
    finally:
        proxy.close()
    assert sent[0.7] <= 0.72 * sent[1.0], sent


def test_credentials_from_environment(s3, s3_cifar, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    ds = pipeline.open_dataset(s3_cifar)
    loader = _loader(ds)
    try:
        batch = next(iter(loader.epoch(0)))
    finally:
        loader.close()
    assert int((batch.ids >= 0).sum()) == 100



def test_forked_reader_processes_leave_the_parents_clients_alone(s3, s3_cifar, tmp_path):
    """The Loader's reader processes are forked after ``open_dataset`` made s3fs clients
    in the parent. fsspec empties its instance cache in the child; a client only the cache
    held was then collected there, at a random moment of an epoch, and closed on the
    child's event loop: "Task exception was never retrieved ... attached to a different
    loop" on the training's stderr. Here the child collects garbage inside a coroutine on
    its own fsspec loop, as a reader process does while its requests are in flight: every
    client the parent made stays alive, nothing is written to stderr, and the parent's
    pooled connections still answer (a transport closed in the child also unregistered
    its socket from the epoll instance both share: the parent's next request hung)."""
    import gc
    import weakref

    import fsspec.asyn
    import s3fs

    ds = pipeline.open_dataset(s3_cifar, storage_options=s3.storage_options)
    made = [weakref.ref(fs) for fs in s3fs.S3FileSystem._cache.values()]
    assert made                   # open_dataset read the manifest through s3fs
    loader = _loader(ds, keep=0.7, **ALIVE)    # reads here: pooled connections to the server
    next(iter(loader.epoch(0)))
    loader.close()
    del loader
    gc.collect()                  # the parent's own garbage is collected here, not there
    err = tmp_path / "child-stderr"
    pid = os.fork()
    if pid == 0:                  # the child: as a reader process starts reading
        code = 1
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)

            async def collect():
                gc.collect()
            fsspec.asyn.sync(fsspec.asyn.get_loop(), collect)
            time.sleep(0.3)       # a close task, had one been made, runs and fails
            gc.collect()
            dead = sum(r() is None for r in made)
            if dead:
                os.write(fd, f"{dead} of {len(made)} s3fs clients collected\n".encode())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    text = err.read_text()
    assert text == "", text[:500]
    loader = _loader(ds, keep=0.7, **ALIVE)    # the parent's pooled connections still answer
    try:
        assert sum(int((b.ids >= 0).sum()) for b in loader.epoch(0)) == 1400
    finally:
        loader.close()


# -- faults ----------------------------------------------------------------------------------

def test_wrong_credentials(s3, s3_cifar):
    bad = {**s3.storage_options, "secret": "not-the-secret"}
    t0 = time.monotonic()
    with pytest.raises(PermissionError, match="access denied") as info:
        pipeline.open_dataset(s3_cifar, storage_options=bad)
    assert f"{URL}/manifest.json" in str(info.value) and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    ds = pipeline.open_dataset(s3_cifar, storage_options=s3.storage_options)
    with pytest.raises(AccessDenied, match="access denied to s3://data/cifar/shard-000000.tar"):
        _loader(ds, storage_options=bad, **FAST)
    assert time.monotonic() - t0 < 30


def test_no_credentials_at_all(s3, s3_cifar, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(PermissionError, match="no credentials for the object store: set AWS_ACCESS_KEY_ID"):
        pipeline.open_dataset(s3_cifar, storage_options={"endpoint_url": s3.endpoint})


def test_missing_object_and_dataset(s3, s3_cifar):
    fs = s3.fs()
    fs.copy(s3_cifar.removeprefix("s3://"), "data/gap", recursive=True)
    fs.rm_file("data/gap/shard-000002.tar")
    ds = pipeline.open_dataset("s3://data/gap", storage_options=s3.storage_options)
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match="data file missing: s3://data/gap/shard-000002.tar"):
        _loader(ds, **FAST)       # the Loader's size check of every file, at creation
    loader = _loader(ds, verify_files=None, **FAST)   # without it: on the read path
    try:
        with pytest.raises(ShardMissing) as info:
            for _ in loader.epoch(0):
                pass
    finally:
        loader.close()
    msg = str(info.value)
    assert "s3://data/gap/shard-000002.tar is missing" in msg and "unreachable" not in msg
    assert time.monotonic() - t0 < 30
    with pytest.raises(ManifestError, match="no manifest.json at s3://data/nothing-here"):
        pipeline.open_dataset("s3://data/nothing-here", storage_options=s3.storage_options)
    # a mistyped bucket is named as such (was "no manifest.json", as if the data were gone)
    with pytest.raises(ManifestError, match="s3://dtaa/cifar: the bucket 'dtaa' does not exist"):
        pipeline.open_dataset("s3://dtaa/cifar", storage_options=s3.storage_options)


def test_dead_endpoint_at_open(tmp_path):
    """Nothing listens at the endpoint: "unreachable" naming the manifest, not "missing",
    within a bounded time (botocore's and s3fs's metadata retries included)."""
    from _servers import free_port
    opts = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"}
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="server unreachable: s3://data/x/manifest.json"):
        pipeline.open_dataset("s3://data/x", storage_options=opts)
    assert time.monotonic() - t0 < 30


@pytest.fixture
def own_s3(cifar_wds, tmp_path):
    """A server of its own (this test kills it), holding the CIFAR subset."""
    server = start_weed(tmp_path / "weed")
    try:
        upload_dataset(cifar_wds, "s3://data/c", server.storage_options)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("fault,backend,workers", [("kill", "torch", 1), ("kill", "dali", 0),
                                                   ("freeze", "torch", 0)])
def test_server_dies_mid_epoch(own_s3, fault, backend, workers):
    """weed killed (connection refused) or frozen (SIGSTOP: no byte within the timeout)
    after the second batch: RemoteUnreachable naming the object and the byte range,
    within the retry bound, never a hang."""
    ds = pipeline.open_dataset("s3://data/c", storage_options=own_s3.storage_options)
    loader = _loader(ds, backend, workers, **FAST)
    t = None
    try:
        with pytest.raises(Exception) as info:
            for i, _ in enumerate(loader.epoch(0)):
                if i == 1:
                    own_s3.signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
                    t = time.monotonic()
    finally:
        if fault == "freeze":
            own_s3.signal(signal.SIGCONT)
        loader.close()
    seconds = time.monotonic() - t
    err = info.value
    assert isinstance(err, RemoteUnreachable), repr(err)
    msg = str(err)
    assert "server unreachable: s3://data/c/shard-" in msg and "(bytes " in msg, msg
    assert "2 attempt(s)" in msg and "missing" not in msg
    assert ("Connection refused" if fault == "kill" else "no response within 1 s") in msg, msg
    assert seconds < min(30.0, RetryPolicy(1.0, 1).bound() + 8), seconds


def test_index_shards_in_s3(s3, s3_cifar, cifar_wds, repo_root, tmp_path):
    """``tools/shard.py index s3://...`` reads only tar headers (ranged GetObjects) and the
    indexed dataset delivers the local copy's labels for the same bytes."""
    out = tmp_path / "indexed"
    p = _shard(repo_root, ["index", f"{s3_cifar}/shard-{{000000..000003}}.tar", str(out),
                           "--label", "cls", "--workers", "2"], s3.env)
    assert p.returncode == 0, p.stderr
    fetched = p.stdout.split("fetched ")[1].split(" (")[1].rstrip(")\n% ")
    # header windows, not whole shards (CIFAR's 1 KiB samples: most of a shard is headers)
    assert float(fetched.split("%")[0]) < 80, p.stdout
    ds = pipeline.open_dataset(out, storage_options=s3.storage_options)
    local = pipeline.open_dataset(cifar_wds)
    assert ds.files[0] == f"{URL}/shard-000000.tar" and len(ds) == len(local)
    want = {(int(f), int(o)): int(lab) for f, o, lab in zip(local.file, local.offset, local.labels)}
    got = {(int(f), int(o)): int(lab) for f, o, lab in zip(ds.file, ds.offset, ds.labels)}
    assert got == want
    assert ds.read(7) == local.read(int(np.flatnonzero((local.file == ds.file[7])
                                                       & (local.offset == ds.offset[7]))[0]))
    # a prefix (with or without "/") or a glob lists the shards in the bucket, as a local
    # directory or glob does (the manifest and index objects beside them are not shards)
    from pipeline.formats.index import IndexError_, expand_shards
    shards = [f"{URL}/shard-{i:06d}.tar" for i in range(4)]
    for spec in (s3_cifar, s3_cifar + "/", f"{s3_cifar}/shard-*.tar"):
        assert expand_shards(spec, s3.storage_options) == shards, spec
    with pytest.raises(IndexError_, match="no shards match 's3://data/nothing-here/"):
        expand_shards("s3://data/nothing-here/", s3.storage_options)
