"""Fault suite, decoding (issue 13 items 9, 10 and the zeroed-shard weak spot): tiny images
on both backends, payloads that are no image or a damaged one without checksums (the
reader's cheap checks, read/sniff.py), the DALI decoder-recovery path, a shard of zeros
(one warning, and a threshold that stops the run).  Real images, real damaged bytes; a
decoder crash fails its test instead of pytest (tests/_fault_decode_worker.py)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.formats import convert
from pipeline.loader import CorruptSampleError
from pipeline.read.sniff import looks_decodable, plausible_image, plausible_structure

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["dali", "torch"]


# ============================================================ item 9: tiny images

TINY = [(1, 1), (1, 7), (7, 1), (3, 3), (2, 5), (1, 2), (40, 30)]  # (width, height)


def _tiny_folder(root: Path, sizes=TINY, formats=("JPEG", "PNG")) -> Path:
    from PIL import Image
    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            for fmt in formats:
                img = Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
                img.save(root / c / f"{k}.{fmt.lower()}", fmt)
    return root


@pytest.mark.parametrize("fmt, sizes", [("wds", TINY), ("zarr", [(1, 1)] * 4)])
def test_tiny_images_train_and_evaluate_on_both_backends(tmp_path, fmt, sizes):
    convert(_tiny_folder(tmp_path / "src", sizes), tmp_path / "out", format=fmt, progress=False)
    ds = pipeline.open_dataset(tmp_path / "out")
    images = {}
    for backend in BACKENDS:
        kw = dict(backend=backend, device="cpu", augment="imagenet", num_workers=0,
                  options=pipeline.LoaderOptions.of(image_size=16))
        L = pipeline.Loader(ds, 8, keep=1.0, policy="full", **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for e in range(2):
                batches = list(L.epoch(e))
                assert all(b.images.shape == (8, 3, 16, 16) for b in batches)
                assert all(bool(b.images.isfinite().all()) for b in batches)
                assert L.stats(e).samples_corrupt == 0 and L.stats(e).samples_delivered == len(ds)
            images[backend] = batches[0].images
            ev = pipeline.Loader.for_eval(ds, 8, augment="imagenet", backend=backend, device="cpu",
                                          num_workers=0, options=pipeline.LoaderOptions.of(image_size=16))
            assert sum(int(b.mask.sum()) for b in ev.epoch(0)) == len(ds)
        L.close()
        ev.close()
    d, t = images["dali"], images["torch"]  # the same crop windows, pixel for pixel
    assert (d - t).abs().mean().item() < 0.2 * (d - t.roll(1, 0)).abs().mean().item()


def test_tiny_images_train_through_the_trainer_with_dali(tmp_path):
    convert(_tiny_folder(tmp_path / "src"), tmp_path / "out", progress=False)
    r = subprocess.run([sys.executable, "-m", "trainers.classify", "--data", str(tmp_path / "out"),
                        "--augment",
                        "imagenet", "--backend", "dali", "--device", "cpu", "--workers", "0",
                        "--epochs", "1", "--batch-size", "8", "--policy", "full", "--width", "8",
                        "--no-progress", "--out", str(tmp_path / "run")],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


# ============================================================ item 10: undecodable payloads

def _jpeg_damage(b: bytes, kind: str, seed: int) -> bytes:
    n = len(b)
    if kind == "flipped":       # every 7th byte but the first two and last two
        a = bytearray(b)
        for k in range(2, n - 2, 7):
            a[k] ^= 0xFF
        return bytes(a)
    if kind == "zeros":
        return bytes(n)
    if kind == "random":
        return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    if kind == "cut_header":    # the first 60 bytes (SOI, APP0, part of DQT), then zeros
        return b[:60] + bytes(n - 60)
    raise ValueError(kind)


def _png_idat_damage(b: bytes) -> bytes:
    """Damage the deflate stream and write the chunk CRC after the damage (an image that
    was corrupt before it was checksummed): only inflating it shows the damage."""
    a = bytearray(b)
    i = a.index(b"IDAT") - 4
    n = int.from_bytes(a[i:i + 4], "big")
    for k in range(i + 10, i + 8 + n, 5):
        a[k] ^= 0x5A
    a[i + 8 + n:i + 12 + n] = zlib.crc32(bytes(a[i + 4:i + 8 + n])).to_bytes(4, "big")
    return bytes(a)


def _damaged_copy(src: Path, dst: Path, damage: dict[int, object], update_crc: bool = False):
    """A copy of dataset ``src`` with the payloads of ``damage`` (id -> function of the old
    bytes) rewritten in place, same length; ``update_crc``: the manifest's CRC32 follows."""
    shutil.copytree(src, dst)
    ds = pipeline.open_dataset(dst)
    crc = np.load(dst / "manifest" / "crc32.npy")
    for i, fn in damage.items():
        f, off = ds.files[int(ds.file[i])], int(ds.offset[i])
        new = fn(ds.read(i))
        assert len(new) == int(ds.length[i])
        with open(f, "r+b") as fh:
            fh.seek(off)
            fh.write(new)
        crc[i] = zlib.crc32(new)
    if update_crc:
        np.save(dst / "manifest" / "crc32.npy", crc)
    return ds


def _run_worker(data: Path, backend: str, workers: int, verify_crc: bool, augment: str) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "tests" / "_fault_decode_worker.py"), str(data),
                        backend, str(workers), "1" if verify_crc else "0", augment], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, f"rc {r.returncode} (-11: segfault)\n{r.stdout[-1500:]}{r.stderr[-3000:]}"
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _check_epochs(res: dict, n: int, bad: list[int]) -> None:
    for e in res["epochs"]:
        assert e["corrupt"] == sorted(bad), e["corrupt"]
        assert sorted(e["delivered"]) == sorted(set(range(n)) - set(bad)), "every other sample once"


JPEG_KINDS = ["flipped", "zeros", "random", "cut_header"]


@pytest.mark.parametrize("backend, workers", [("dali", 0), ("dali", 1), ("dali", 2), ("torch", 0),
                                              ("torch", 2)])
def test_undecodable_payloads_without_checksums_are_skipped(cifar_wds, tmp_path, backend, workers):
    """verify_crc=False (as for third-party shards): bytes that are no image, or a damaged
    one, are flagged by the reader's cheap checks before any decoder sees them."""
    bad = [3, 700, 1200, 1800]  # one per shard
    damage = {i: (lambda b, k=k, i=i: _jpeg_damage(b, k, i)) for i, k in zip(bad, JPEG_KINDS)}
    ds = _damaged_copy(cifar_wds, tmp_path / "d", damage)
    res = _run_worker(tmp_path / "d", backend, workers, False, "cifar")
    _check_epochs(res, len(ds), bad)
    warned = res["epochs"][0]["warnings"]
    assert len(warned) == 4 and all(f"corrupt sample {i} " in " ".join(warned) for i in bad)
    assert not any("DALI pipeline failed" in w for w in warned), "stopped before the decoder"
    # no checksum was compared, so none is blamed
    assert all(": undecodable; skipped" in w and "checksum" not in w for w in warned), warned


@pytest.mark.parametrize("backend", BACKENDS)
def test_png_with_a_damaged_deflate_stream_is_caught_before_decoding(fmnist_wds, tmp_path, backend):
    bad = [5, 600]
    ds = _damaged_copy(fmnist_wds, tmp_path / "d", {i: _png_idat_damage for i in bad})
    assert not any(plausible_image(ds.read(i)) for i in bad)
    _check_epochs(_run_worker(tmp_path / "d", backend, 2, False, "none"), len(ds), bad)


@pytest.mark.parametrize("backend, workers", [("dali", 0), ("dali", 1), ("dali", 2), ("torch", 0),
                                              ("torch", 2)])
def test_recovery_path_masks_the_culprit_and_finishes_the_epoch(fmnist_wds, tmp_path, backend,
                                                                workers):
    """A PNG stored corrupt with a matching checksum reaches the decoder.  DALI's fails the
    pipeline: the backend finds the culprit with PIL, masks it, rebuilds the pipeline (a
    new table generation) and delivers the planned batches (issue: "backend delivered ids
    [1000, ...], planned [176, ...]").  torchvision's would crash the process (SIGSEGV
    after a libpng error): the torch backend gives a PNG that fails the structural check
    to PIL, which raises, and flags it."""
    bad = [5, 600, 1300]
    ds = _damaged_copy(fmnist_wds, tmp_path / "d", {i: _png_idat_damage for i in bad},
                       update_crc=True)
    res = _run_worker(tmp_path / "d", backend, workers, True, "cifar")
    _check_epochs(res, len(ds), bad)
    warned = " ".join(res["epochs"][0]["warnings"])
    assert ("masked undecodable samples" in warned) == (backend == "dali")
    assert all(f"corrupt sample {i} " in warned for i in bad if backend == "torch")
    assert res["epochs"][1]["warnings"] == [], "known bad: skipped unread, no second report"


@pytest.mark.parametrize("backend, workers", [("dali", 0), ("dali", 2), ("torch", 0)])
def test_damaged_jpegs_with_matching_checksums_are_skipped(cifar_wds, tmp_path, backend, workers):
    """Bytes with no image signature (zeros, random) and JPEGs with a broken marker chain
    crash DALI's CPU decoder (SIGSEGV) even when their checksum matches (stored damaged):
    the reader's structural check (sniff.plausible_structure) stops them first."""
    bad = [3, 700, 1200, 1800]
    damage = {i: (lambda b, k=k, i=i: _jpeg_damage(b, k, i)) for i, k in zip(bad, JPEG_KINDS)}
    ds = _damaged_copy(cifar_wds, tmp_path / "d", damage, update_crc=True)
    res = _run_worker(tmp_path / "d", backend, workers, True, "cifar")
    _check_epochs(res, len(ds), bad)
    warned = res["epochs"][0]["warnings"]
    assert len(warned) == 4 and not any("DALI pipeline failed" in w for w in warned), warned


def test_structure_checked_once_per_sample_and_checksums_every_epoch(cifar_wds, tmp_path, monkeypatch):
    """With checksums, a payload's structure is looked at once per process (the same CRC is
    the same bytes); its CRC is still checked on every read: bytes damaged on disk after
    the first epoch are caught in the second."""
    import pipeline.read.source as source
    calls = []
    real = source.plausible_structure
    monkeypatch.setattr(source, "plausible_structure", lambda b: calls.append(1) or real(b))
    shutil.copytree(cifar_wds, tmp_path / "d")
    ds = pipeline.open_dataset(tmp_path / "d")
    L = pipeline.Loader(ds, 100, keep=1.0, policy="full", backend="dali", device="cpu",
                        augment="cifar", num_workers=0)
    ids = lambda e: np.concatenate([b.ids.numpy() for b in L.epoch(e)])  # noqa: E731
    assert len(set(ids(0).tolist()) - {-1}) == len(ds) and len(calls) >= len(ds)
    first = len(calls)
    i = 321
    with open(ds.files[int(ds.file[i])], "r+b") as fh:   # damage one payload, CRC unchanged
        fh.seek(int(ds.offset[i]) + 40)
        fh.write(b"\x00" * 16)
    got = ids(1)
    assert len(calls) == first                            # no second structure check
    assert i not in got.tolist() and L.stats(1).samples_corrupt == 1
    L.close()


def test_cheap_checks_pass_real_images_and_refuse_damage(cifar_wds):
    from PIL import Image
    ds = pipeline.open_dataset(cifar_wds)
    good = [ds.read(i) for i in range(len(ds))]
    assert all(plausible_image(b) for b in good)
    im = Image.open(io.BytesIO(good[0])).resize((40, 24))
    for fmt, kw in [("JPEG", {"progressive": True}), ("JPEG", {"subsampling": 0}), ("PNG", {}),
                    ("PNG", {"interlace": 1}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})]:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        assert plausible_image(buf.getvalue()), (fmt, kw)
    assert looks_decodable(good[0] + b"trailing bytes after EOI")
    gif = io.BytesIO()
    im.save(gif, "GIF")
    assert not looks_decodable(gif.getvalue()), "DALI has no GIF decoder"
    for kind in JPEG_KINDS:
        assert not looks_decodable(_jpeg_damage(good[1], kind, 1)), kind
    assert not looks_decodable(good[2][: len(good[2]) // 2]), "cut short"
    assert all(plausible_structure(b) for b in good[:200])
    assert [plausible_structure(_jpeg_damage(good[1], k, 1)) for k in JPEG_KINDS] == [False] * 4


# ============================================================ weak spot: a shard of zeros

def _zeroed_shard(src: Path, dst: Path, name: str = "shard-000001.tar") -> Path:
    shutil.copytree(src, dst)
    size = (dst / name).stat().st_size
    (dst / name).write_bytes(bytes(size))  # same size: the size check passes
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeroed_shard_is_reported_once_and_stops_the_run(cifar_wds, tmp_path, backend):
    ds = pipeline.open_dataset(_zeroed_shard(cifar_wds, tmp_path / "z"))
    L = pipeline.Loader(ds, 64, keep=1.0, policy="full", backend=backend, device="cpu",
                        num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CorruptSampleError, match=r"max_corrupt_fraction=0.01 \(\S*shard-000001\.tar: \d+\)"):
            list(L.epoch(0))
    assert L.stats(0).samples_corrupt <= 64 + max(1, int(0.01 * len(ds))), "stopped early"
    L.close()
    L = pipeline.Loader(ds, 64, keep=1.0, policy="full", backend=backend, device="cpu",
                        num_workers=0, options=pipeline.LoaderOptions.of(max_corrupt_fraction=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = sum(int((b.ids >= 0).sum()) for b in L.epoch(0))
    msgs = [str(w.message) for w in caught if "corrupt sample" in str(w.message)]
    assert n == 1500 and L.stats(0).samples_corrupt == 500
    assert len(msgs) == 1 and "shard-000001.tar" in msgs[0], msgs
    L.close()


def test_max_corrupt_fraction_is_validated():
    with pytest.raises(ValueError, match="max_corrupt_fraction"):
        pipeline.LoaderOptions.of(max_corrupt_fraction=1.5)
    assert pipeline.LoaderOptions.of(max_corrupt_fraction=None).read.max_corrupt_fraction is None
