"""Reading over HTTP from a real nginx on 127.0.0.1 that honours Range requests.

The test starts Debian's nginx itself (tests/_servers.py: temp config, free port) and
stops it afterwards; it skips when nginx is not installed.  The bytes nginx served for
the shards (its access log) must equal the planned samples' payload plus the documented
merge slack.
"""
import os
import time

import numpy as np
import pytest

import pipeline
from _servers import start_nginx
from pipeline.options import LoaderOptions
from pipeline.read.ranges import merge_ranges


@pytest.fixture(scope="module")
def nginx(cifar_wds, tmp_path_factory):
    server = start_nginx(cifar_wds, tmp_path_factory.mktemp("nginx"))
    yield server.url, server.log
    server.stop()


def _served(log, since: int):
    """(uri, start, end, bytes) of the 206 responses for shards, logged after offset ``since``."""
    out = []
    with open(log) as f:
        f.seek(since)
        for line in f:
            method, uri, status, sent, rng = line.split(" ", 4)
            if uri.endswith(".tar") and method == "GET":
                assert status == "206", line
                a, b = rng.strip().strip('"')[len("bytes="):].split("-")
                out.append((uri, int(a), int(b) + 1, int(sent)))
    return out


@pytest.mark.parametrize("merge_gap", [0, "neighbors"])
@pytest.mark.parametrize("backend,workers", [("torch", 0), ("dali", 1)])
def test_http_bytes_served_equal_planned(nginx, merge_gap, backend, workers):
    url, log = nginx
    ds = pipeline.open_dataset(url)
    assert ds.files[0].startswith("http://")
    L = pipeline.Loader(ds, batch_size=100, keep=0.7, policy="uniform", epochs=1, seed=2,
                        backend=backend, num_workers=workers, device="cpu", augment="cifar",
                        options=LoaderOptions.of(merge_gap=merge_gap))
    time.sleep(0.2)
    since = os.path.getsize(log)
    got = np.concatenate([b.ids.numpy() for b in L.epoch(0)])
    time.sleep(0.3)  # nginx writes its log line after the response
    served = _served(log, since)
    ids = L.batch_plan(0).ids.reshape(-1)
    ids = ids[ids >= 0]
    assert sorted(got[got >= 0]) == sorted(ids)
    st = L.stats(0)
    payload = int(np.asarray(ds.length, dtype=np.int64)[ids].sum())
    total = sum(s[3] for s in served)
    assert total == st.bytes_read
    # independent expectation of the requests: per batch, the merge rule of docs/architecture.md
    want = []
    rank = ds.file_rank
    for row in L.batch_plan(0).ids:
        r = row[row >= 0]
        _, _, gf, gs, ge = merge_ranges(ds.file[r], ds.offset[r],
                                        ds.offset[r].astype(np.int64) + ds.length[r],
                                        merge_gap, rank[r])
        want += [(os.path.basename(ds.files[f]), int(a), int(b)) for f, a, b in zip(gf, gs, ge)]
    assert sorted((os.path.basename(u), a, b) for u, a, b, _ in served) == sorted(want)
    if merge_gap == 0:
        assert total == payload and len(served) == len(ids) == st.requests
    else:
        assert total == payload + st.merge_slack and len(served) == st.requests < len(ids)
        # slack is tar framing only: no other sample's payload starts inside a request
        planned = set(ids.tolist())
        names = np.array([os.path.basename(f) for f in ds.files])
        for name, a, b in want:
            fi = int(np.flatnonzero(names == name)[0])
            inside = np.flatnonzero((ds.file == fi) & (ds.offset >= a) & (ds.offset < b))
            assert set(inside.tolist()) <= planned


def test_index_remote_shards_headers_only(nginx, cifar_wds, tmp_path):
    """`shard.py index` over HTTP: the same manifest as indexing the local files, and nginx
    sends only header windows (fewer bytes than the shards hold)."""
    from pipeline.formats.index import index
    url, log = nginx
    local = pipeline.open_dataset(cifar_wds)
    names = [os.path.basename(f) for f in local.files]
    time.sleep(0.2)
    since = os.path.getsize(log)
    s = index([f"{url}/{n}" for n in names], str(tmp_path / "remote"), workers=2)
    time.sleep(0.3)
    sent = 0
    with open(log) as f:
        f.seek(since)
        for line in f:
            sent += int(line.split(" ")[3])
    r = pipeline.open_dataset(tmp_path / "remote")
    assert len(r) == len(local) == s["num_samples"] and r.files[0].startswith("http://")
    want = sorted(zip(local.file.tolist(), local.offset.tolist(), local.length.tolist(), local.labels.tolist()))
    got = sorted(zip(r.file.tolist(), r.offset.tolist(), r.length.tolist(), r.labels.tolist()))
    assert got == want
    assert 0 < sent == s["bytes_fetched"] < int(np.asarray(local.file_sizes).sum())
    assert r.read(0) == local.read(int(np.flatnonzero((local.file == r.file[0]) & (local.offset == r.offset[0]))[0]))
