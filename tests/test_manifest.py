"""open_dataset: columns and dtypes, memory mapping, URL roots over HTTP, check_files."""
from __future__ import annotations

import functools
import http.server
import io
import os
import threading

import numpy as np
import pytest

import pipeline
from pipeline.formats.manifest import COLUMNS, ManifestError, open_dataset


def test_columns_dtypes_and_mmap(cifar_wds):
    ds = open_dataset(cifar_wds)
    for name, (dtype, attr) in COLUMNS.items():
        col = getattr(ds, attr)
        assert col.dtype == np.dtype(dtype) and len(col) == len(ds), name
        assert isinstance(col, np.memmap), f"{name} should be memory-mapped"
    assert ds.file_sizes.dtype == np.int64 and len(ds.file_sizes) == len(ds.files)
    assert all(f.startswith(str(cifar_wds)) for f in ds.files)
    assert ds.header["fingerprint"] and ds.header["seed"] == 0
    assert ds.header["files"][0]["sha256"] and ds.header["index_files"][0]["path"].endswith(".idx")
    assert np.all(ds.offset % 512 == 0)              # tar data offsets
    per_row = sum(getattr(ds, a).itemsize for _, a in COLUMNS.values())
    assert per_row <= 40
    assert pipeline.open_dataset is open_dataset


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        open_dataset(tmp_path)
    # a mistyped path is said to be absent, not "not a converted dataset"
    with pytest.raises(ManifestError, match=f"{tmp_path / 'trian'}: no such directory"):
        open_dataset(tmp_path / "trian")
    (tmp_path / "shard.tar").write_bytes(b"x")
    with pytest.raises(ManifestError, match="shard.tar: not a directory"):
        open_dataset(tmp_path / "shard.tar")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range ``Range: bytes=a-b`` support (object stores have it;
    the standard library handler does not)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        if not rng or not rng.startswith("bytes="):
            return super().send_head()
        path = self.translate_path(self.path)
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404)
            return None
        size = os.fstat(f.fileno()).st_size
        a, _, b = rng[6:].partition("-")
        start, end = int(a), min(int(b) if b else size - 1, size - 1)
        f.seek(start)
        body = f.read(end - start + 1)
        f.close()
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@pytest.fixture
def http_root(cifar_wds):
    handler = functools.partial(_RangeHandler, directory=str(cifar_wds))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_root(cifar_wds, http_root):
    local = open_dataset(cifar_wds)
    remote = open_dataset(http_root + "/")
    assert remote.is_remote and len(remote) == len(local)
    assert remote.files[0] == f"{http_root}/shard-000000.tar"
    for _, attr in COLUMNS.values():
        np.testing.assert_array_equal(getattr(remote, attr), getattr(local, attr))
    for i in (0, 777, len(local) - 1):
        assert remote.read(i) == local.read(i)
    remote.check_files(verify_checksum=True)
