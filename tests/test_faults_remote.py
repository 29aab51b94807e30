"""Remote storage faults against real servers on 127.0.0.1 (started here, stopped by PID).

* a server that ignores Range (``python -m http.server`` answers 200 with the whole
  file): refused once, at Loader creation and on the read path, naming the URL; the
  trainer exits non-zero instead of training on 0 samples;
* a frozen server (nginx under SIGSTOP mid-epoch), a dead one (killed: connection
  refused) and a missing shard (404): one error naming the URL (and the byte range),
  "unreachable" apart from "missing", within a bounded time on both backends, with and
  without reader processes; a short freeze is ridden out by the retries.
"""
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import pipeline
from _servers import start_http_server, start_nginx
from pipeline.formats.header import ManifestError
from pipeline.options import LoaderOptions, ReadOptions
from pipeline.read.errors import (RangeNotSupported, RemoteUnreachable, ShardError,
                                  ShardMissing, storage_error)
from pipeline.read.reader import RangeReader
from pipeline.read.remote import RetryPolicy

FAST = dict(request_timeout=1.0, retries=1)  # a failing read gives up within ~2.5 s
BACKENDS = [("torch", 0), ("torch", 1), ("dali", 0), ("dali", 1)]


@pytest.fixture
def server(cifar_wds, tmp_path):
    s = start_nginx(cifar_wds, tmp_path)
    yield s
    s.stop()


@pytest.fixture
def no_range(cifar_wds, tmp_path):
    s = start_http_server(cifar_wds, tmp_path)
    yield s
    s.stop()


def _loader(url, backend="torch", workers=0, **opts):
    return pipeline.Loader(pipeline.open_dataset(url), 50, keep=1.0, policy="full", epochs=1,
                           backend=backend, num_workers=workers, device="cpu",
                           options=LoaderOptions.of(**{**FAST, **opts}))


def _fail_mid_epoch(loader, fault) -> tuple[BaseException, float, list]:
    """Iterate epoch 0, call ``fault()`` after the second batch; return the error raised,
    the seconds from the fault to the error, and the warnings issued."""
    t = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception) as info:
            for i, _ in enumerate(loader.epoch(0)):
                if i == 1:
                    fault()
                    t = time.monotonic()
    assert t is not None, "the fault was never injected"
    return info.value, time.monotonic() - t, caught


# -- a server without Range support ----------------------------------------------------------

def test_no_range_refused_at_loader_creation(no_range):
    t0 = time.monotonic()
    with pytest.raises(RangeNotSupported, match="server ignores Range requests") as info:
        _loader(no_range.url)
    assert f"{no_range.url}/shard-000000.tar" in str(info.value)
    assert time.monotonic() - t0 < 30


def test_no_range_refused_on_the_read_path(no_range):
    """The data path checks every answer, not only the probe: a 200 is never sliced."""
    ds = pipeline.open_dataset(no_range.url)
    r = RangeReader(ds.files, ds.file_sizes, merge_gap=0, retry=RetryPolicy(1.0, 1))
    ids = np.flatnonzero(ds.file == 2)[:5]
    with pytest.raises(RangeNotSupported, match=r"shard-000002\.tar answered 200"):
        r.read(ds.file[ids], ds.offset[ids], ds.length[ids])
    assert r.counters.samples == 0  # nothing was delivered, nothing counted as read


def test_no_range_trainer_exits_nonzero(no_range, tmp_path, repo_root):
    p = subprocess.run([sys.executable, "-m", "trainers.classify", "--data", no_range.url,
                        "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"),
                        "--no-progress"],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    err = p.stderr
    assert "RangeNotSupported: server ignores Range requests" in err
    assert f"{no_range.url}/shard-000000.tar" in err
    assert "corrupt sample" not in err and "test_acc" not in p.stdout
    assert not (tmp_path / "run" / "summary.json").exists()


# -- a frozen, a dead and a recovering server --------------------------------------------------

@pytest.mark.parametrize("backend,workers", BACKENDS)
def test_frozen_server_mid_epoch(server, backend, workers):
    """SIGSTOP of nginx mid-epoch: RemoteUnreachable naming the URL and the range, within
    the retry bound (plus a pipeline rebuild), not after minutes; no recovery probes; once
    the server is back (SIGCONT) the epoch can be read again."""
    loader = _loader(server.url, backend, workers)
    try:
        err, seconds, caught = _fail_mid_epoch(loader, lambda: server.signal(signal.SIGSTOP))
        server.signal(signal.SIGCONT)
        # the server is back: the same loader reads the epoch again, every sample once
        again = np.concatenate([b.ids.numpy() for b in loader.epoch(0)])
    finally:
        server.signal(signal.SIGCONT)
        loader.close()
    assert isinstance(err, RemoteUnreachable), repr(err)
    msg = str(err)
    assert f"{server.url}/shard-" in msg and "(bytes " in msg
    assert "no response within 1 s" in msg and "2 attempt(s)" in msg and "missing" not in msg
    assert seconds < min(30.0, RetryPolicy(1.0, 1).bound() + 6), seconds
    assert not [w for w in caught if "undecodable" in str(w.message)]
    assert sorted(again[again >= 0].tolist()) == list(range(len(loader.ds)))


@pytest.mark.parametrize("backend,workers", BACKENDS)
def test_dead_server_mid_epoch(server, backend, workers):
    """nginx killed mid-epoch (connection refused): "unreachable", not "missing"."""
    loader = _loader(server.url, backend, workers)
    try:
        err, seconds, _ = _fail_mid_epoch(loader, server.stop)
    finally:
        loader.close()
    assert isinstance(err, RemoteUnreachable), repr(err)
    msg = str(err)
    assert "server unreachable" in msg and "Connection refused" in msg and "missing" not in msg
    assert f"{server.url}/shard-" in msg
    assert seconds < 15, seconds


def test_dead_server_refused_at_loader_creation(server):
    url = server.url
    ds = pipeline.open_dataset(url)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(RemoteUnreachable, match="Connection refused") as info:
        pipeline.Loader(ds, 50, backend="torch", num_workers=0, device="cpu",
                        options=LoaderOptions.of(**FAST))
    assert f"{url}/shard-000000.tar" in str(info.value)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("backend,workers", [("torch", 1), ("dali", 0)])
def test_short_freeze_is_retried(server, backend, workers):
    """A freeze shorter than the retries last: the epoch completes with every sample."""
    loader = _loader(server.url, backend, workers, request_timeout=1.0, retries=3)

    def freeze():
        server.signal(signal.SIGSTOP)
        threading.Timer(1.2, server.signal, (signal.SIGCONT,)).start()

    try:
        got = []
        for i, b in enumerate(loader.epoch(0)):
            got.append(b.ids.numpy())
            if i == 1:
                freeze()
        got = np.concatenate(got)
        assert sorted(got[got >= 0].tolist()) == list(range(len(loader.ds)))
        assert loader.stats(0).samples_corrupt == 0
    finally:
        server.signal(signal.SIGCONT)
        loader.close()


# -- a missing shard (404) -----------------------------------------------------------------------

@pytest.fixture
def gap(cifar_wds, tmp_path):
    """nginx serving a copy of the dataset whose third shard was deleted."""
    root = tmp_path / "data"
    shutil.copytree(cifar_wds, root)
    (root / "shard-000002.tar").unlink()
    s = start_nginx(root, tmp_path)
    yield s
    s.stop()


def test_missing_shard_refused_at_loader_creation(gap):
    with pytest.raises(ManifestError, match="missing") as info:
        _loader(gap.url)
    assert f"{gap.url}/shard-000002.tar" in str(info.value)
    assert "unreachable" not in str(info.value)


@pytest.mark.parametrize("backend,workers", [("torch", 1), ("dali", 0), ("dali", 1)])
def test_missing_shard_mid_epoch(gap, backend, workers):
    """Without the up-front check, the 404 surfaces at the first read of that shard."""
    loader = _loader(gap.url, backend, workers, verify_files=None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            with pytest.raises(ShardError) as info:
                for _ in loader.epoch(0):
                    pass
    finally:
        loader.close()
    assert isinstance(info.value, ShardMissing), repr(info.value)
    msg = str(info.value)
    assert f"shard {gap.url}/shard-000002.tar is missing" in msg and "404" in msg
    assert "unreachable" not in msg
    assert time.monotonic() - t0 < 30
    assert not [w for w in caught if "undecodable" in str(w.message)]


# -- a truncated shard ----------------------------------------------------------------------------

@pytest.fixture
def truncated(cifar_wds, tmp_path):
    """nginx serving a copy of the dataset whose second shard is cut inside a sample."""
    root = tmp_path / "data"
    shutil.copytree(cifar_wds, root)
    ds = pipeline.open_dataset(root)
    mid = np.flatnonzero(ds.file == 1)[len(ds) // 8]
    cut = int(ds.offset[mid]) + int(ds.length[mid]) // 2
    with open(root / "shard-000001.tar", "r+b") as f:
        f.truncate(cut)
    s = start_nginx(root, tmp_path)
    yield s, cut
    s.stop()


def test_truncated_shard_named(truncated):
    server, cut = truncated
    ds = pipeline.open_dataset(server.url)
    url = f"{server.url}/shard-000001.tar"
    # the size the server reports (HEAD) against the manifest's
    r = RangeReader(ds.files, ds.file_sizes, merge_gap=0, retry=RetryPolicy(1.0, 1))
    ids = np.flatnonzero(ds.file == 1)
    with pytest.raises(ShardError, match=f"shard {url} has {cut} bytes, the manifest says"):
        r.read(ds.file[ids[:1]], ds.offset[ids[:1]], ds.length[ids[:1]])
    # without a manifest size: the range answers themselves (206 cut short, 416 past the end)
    r = RangeReader(ds.files, None, merge_gap=0, retry=RetryPolicy(1.0, 1))
    across = ids[(ds.offset[ids] < cut) & (ds.offset[ids] + ds.length[ids] > cut)]
    past = ids[ds.offset[ids] > cut]
    assert len(across) == 1 and len(past)
    for i, what in ((across, f"the shard has {cut} bytes"), (past, "shorter than the manifest")):
        with pytest.raises(ShardError, match="range beyond the end of") as info:
            r.read(ds.file[i[:1]], ds.offset[i[:1]], ds.length[i[:1]])
        assert url in str(info.value) and what in str(info.value)
        assert not isinstance(info.value, (RangeNotSupported, RemoteUnreachable))


# -- a server that fails (503) ------------------------------------------------------------------

@pytest.fixture
def failing(cifar_wds, tmp_path):
    """nginx that answers 503 Service Unavailable for the second shard."""
    s = start_nginx(cifar_wds, tmp_path, "location = /shard-000001.tar { return 503; }")
    yield s
    s.stop()


def test_server_error_refused_at_loader_creation(failing):
    with pytest.raises(ManifestError, match="server unreachable") as info:
        _loader(failing.url)
    assert f"{failing.url}/shard-000001.tar" in str(info.value) and "503" in str(info.value)
    assert "missing" not in str(info.value)


@pytest.mark.parametrize("backend,workers", [("torch", 0), ("dali", 1)])
def test_server_error_retried_then_raised(failing, backend, workers):
    """5xx is transient: retried with backoff, then RemoteUnreachable naming the status."""
    loader = _loader(failing.url, backend, workers, verify_files=None, retries=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(ShardError) as info:
            for _ in loader.epoch(0):
                pass
    finally:
        loader.close()
    assert isinstance(info.value, RemoteUnreachable), repr(info.value)
    msg = str(info.value)
    assert f"{failing.url}/shard-000001.tar" in msg and "HTTP 503" in msg and "3 attempt(s)" in msg
    assert time.monotonic() - t0 < 30
    served = failing.log.read_text().splitlines()
    assert sum(" /shard-000001.tar 503 " in line for line in served) >= 3  # really retried


# -- opening a remote dataset: the header, columns and sizes (formats/storage.py) -----------------

def test_open_dataset_unreachable_vs_missing(server, monkeypatch):
    """Metadata requests are bounded too (aiohttp's default: five minutes), and a server
    that does not answer is not reported as a missing dataset."""
    import pipeline.formats.storage as storage
    monkeypatch.setattr(storage, "METADATA_TIMEOUT", 1.0)
    with pytest.raises(ManifestError, match="no manifest.json at .*/nothere/manifest.json"):
        pipeline.open_dataset(server.url + "/nothere")
    ds = pipeline.open_dataset(server.url)
    server.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=f"server unreachable: {server.url}/manifest.json"):
            pipeline.open_dataset(server.url)
        with pytest.raises(ManifestError, match=f"server unreachable: {server.url}/shard-000000.tar"):
            ds.check_files()
        assert time.monotonic() - t0 < 15
    finally:
        server.signal(signal.SIGCONT)
    server.stop()
    with pytest.raises(ConnectionError, match="server unreachable: .*Connect call failed"):
        pipeline.open_dataset(server.url)
    with pytest.raises(ManifestError, match="server unreachable") as info:
        ds.check_files()
    assert "missing" not in str(info.value)


# -- options and the typed error from a worker's text ------------------------------------------

def test_read_options_refuse_bad_timeouts():
    for bad in (dict(request_timeout=0), dict(request_timeout=float("nan")),
                dict(retries=-1), dict(retries=1.5)):
        with pytest.raises(ValueError, match="request_timeout|retries"):
            ReadOptions(**bad)
    assert RetryPolicy(2.0, 2, 0.5).bound() == 3 * 4.0 + 0.5 + 1.0


def test_storage_error_from_worker_text():
    text = ("Critical error in pipeline:\nError in worker 0: Traceback ...\n"
            "pipeline.read.errors.RemoteUnreachable: server unreachable: http://h/s.tar "
            "(bytes 0-9): no response within 1 s\nCurrent pipeline object is no longer valid.")
    e = storage_error(RuntimeError(text))
    assert type(e) is RemoteUnreachable and str(e).startswith("server unreachable: http://h/s.tar")
    assert storage_error(RuntimeError("Assert on IsDenseTensor() failed")) is None
