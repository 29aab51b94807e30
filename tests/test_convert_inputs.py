"""Converter inputs that lost data, crashed later or went wrong silently: --overwrite and
the user's own shards, OUT inside SRC, float TIFFs, RGBA / LA images and arrays, huge labels,
gray + RGB .npy payloads, --resize 0x0, damaged .npz files, same-size gray + RGB folders,
option checks and Ctrl-C. Real files written with PIL (or by hand) under tmp_path."""
from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.formats import ConvertError, SourceError, convert
from pipeline.formats import images as imgs
from pipeline.formats import outdir
from pipeline.formats.convert import parse_resize
from pipeline.formats.index import MAX_LABEL
from pipeline.formats.outdir import PAUSE_ENV, STATE_DIR, prepare_out
from pipeline.formats.sources import open_source
from tools import shard

REPO = Path(__file__).resolve().parents[1]
SHARD = [sys.executable, str(REPO / "tools" / "shard.py")]


# ============================================================ helpers

def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth RGB image with some noise (uint8 HxWx3)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     (x + y) * 127 // max(h + w - 2, 1)], -1)
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _folder(root: Path, mode: str, n: int = 4, size=(16, 16), classes=("a", "b")) -> Path:
    """``n`` PNGs per class, each in PIL ``mode`` (or, for "mixed", image 0 of each class L,
    image 1 RGBA, the rest RGB)."""
    from PIL import Image
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.fromarray(_photo(*size, seed=10 * c + i))
            m = mode if mode != "mixed" else ("L" if i == 0 else "RGBA" if i == 1 else "RGB")
            if m in ("RGBA", "LA"):
                img = img.convert(m)
                img.putalpha(Image.fromarray(np.full(size, 30 * i + 5, np.uint8)))
            elif m != "RGB":
                img = img.convert(m)
            img.save(root / cls / f"{i}.png")
    return root


def _source_pixels(path: str, channels: int) -> np.ndarray:
    """What PIL makes of a source file with alpha dropped (the decoders' GRAY / RGB)."""
    from PIL import Image
    a = np.asarray(Image.open(path).convert("L" if channels == 1 else "RGB"))
    return a.reshape(*a.shape[:2], channels)


def _delivered(ds, backend: str) -> dict[int, np.ndarray]:
    """id -> HWC image (0..1) as the Loader delivers it (every sample once)."""
    L = pipeline.Loader.for_eval(ds, 4, backend=backend, device="cpu", num_workers=0)
    got = {}
    try:
        for b in L.epoch(0):
            for row, i in enumerate(b.ids.tolist()):
                if i >= 0:
                    got[i] = b.images[row].permute(1, 2, 0).cpu().numpy()
    finally:
        L.close()
    return got


def _run_shard(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(PAUSE_ENV, None)
    return subprocess.run([*SHARD, *args, "--no-progress"], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


# ============================================================ 1. --overwrite and the user's files

def test_overwrite_never_deletes_shards_and_stores_it_did_not_write(tmp_path):
    src = _folder(tmp_path / "src", "RGB")
    out = tmp_path / "out"
    (out / "data.zarr").mkdir(parents=True)
    (out / "data.zarr" / "zarr.json").write_text("{}")           # the user's own Zarr store
    tar = out / "imagenet-train-000000.tar"                      # and WebDataset shard
    tar.write_bytes(b"user shard " * 100)
    for overwrite in (False, True):
        with pytest.raises(ConvertError) as e:
            convert(src, out, overwrite=overwrite, progress=False)
        msg = str(e.value)
        assert "holds no conversion" in msg and "imagenet-train-000000.tar" in msg
        assert "data.zarr" in msg and "use --overwrite" not in msg
        assert tar.read_bytes() == b"user shard " * 100
        assert (out / "data.zarr" / "zarr.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["data.zarr", "imagenet-train-000000.tar"]


def test_overwrite_of_a_conversion_removes_its_record_last(tmp_path, monkeypatch):
    """A kill part way through --overwrite leaves manifest.json, so the rerun still finds a
    conversion to replace (and is not refused as a folder of someone else's files)."""
    src = _folder(tmp_path / "src", "RGB")
    out = tmp_path / "out"
    convert(src, out, samples_per_shard=2, progress=False)
    removed, real = [], outdir._remove

    def dies_after_three(p):
        if len(removed) == 3:
            raise KeyboardInterrupt
        removed.append(p.name)
        real(p)
    monkeypatch.setattr(outdir, "_remove", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_out(out, "another fingerprint", overwrite=True)
    assert "manifest.json" not in removed and (out / "manifest.json").exists()
    monkeypatch.undo()
    s = convert(src, out, seed=1, overwrite=True, progress=False)
    assert s["status"] == "converted" and len(pipeline.open_dataset(out)) == 8


# ============================================================ 2. OUT inside SRC

def test_out_inside_the_source_is_refused(tmp_path):
    src = _folder(tmp_path / "src", "RGB")
    for out in (src / "_shards", src, src / "a" / "deeper"):
        with pytest.raises(ConvertError, match="inside the source") as e:
            convert(src, out, progress=False)
        assert str(out) in str(e.value) and str(src) in str(e.value)
        assert not (src / "_shards").exists() and not (src / "a" / "deeper").exists()
    (tmp_path / "link").symlink_to(src)                          # the same place, another name
    with pytest.raises(ConvertError, match="inside the source"):
        convert(tmp_path / "link", src / "_shards", progress=False)
    r = _run_shard(str(src), str(src / "_shards"))
    assert r.returncode == 2 and "inside the source" in r.stderr
    assert sorted(p.name for p in src.iterdir()) == ["a", "b"]
    convert(src, tmp_path / "out", progress=False)               # outside: fine
    assert pipeline.open_dataset(tmp_path / "out").classes == ["a", "b"]


def test_out_inside_a_directory_of_arrays_is_harmless(tmp_path):
    """An .npz (like CIFAR batches and IDX files) is read by name: OUT may lie beside it,
    and the rerun, which finds OUT there, still sees an npz source, not an image folder."""
    src = tmp_path / "arrays"
    src.mkdir()
    np.savez(src / "d.npz", x=np.random.default_rng(0).integers(0, 256, (6, 4, 4), np.uint8),
             y=np.arange(6) % 2)
    assert convert(src, src / "out", progress=False)["status"] == "converted"
    assert convert(src, src / "out", progress=False)["status"] == "already complete"
    with pytest.raises(ConvertError, match="inside the source"):
        convert(src, src / "out2", source_type="imagefolder", progress=False)


# ============================================================ 3. float and 32-bit TIFFs

@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_float_and_int32_images_are_skipped_with_a_reason(tmp_path, fmt):
    from PIL import Image
    src = _folder(tmp_path / "src", "L", n=2)
    ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    Image.fromarray(ramp).save(src / "a" / "float.tiff")                       # mode F, 0..1
    Image.fromarray((ramp * 100_000).astype(np.int32)).save(src / "b" / "int32.tiff")  # mode I
    v16 = np.arange(256, dtype=">u2").reshape(16, 16) * 257      # a 16-bit PGM: mode I, scaled
    (src / "b" / "deep.pgm").write_bytes(b"P5\n16 16\n65535\n" + v16.astype(">u2").tobytes())
    out = tmp_path / "out"
    s = convert(src, out, format=fmt, shuffle=False, progress=False)
    reasons = {Path(k["path"]).name: k["error"] for k in s["skipped"]}
    assert set(reasons) == {"float.tiff", "int32.tiff"}
    assert "mode F" in reasons["float.tiff"] and "mode I" in reasons["int32.tiff"]
    ds = pipeline.open_dataset(out)
    assert len(ds) == 5 and ds.channels == 1
    assert {Path(k["path"]).name for k in ds.manifest.source["skipped"]} == set(reasons)
    src_ds = open_source(src)
    deep = next(i for i in range(len(ds)) if src_ds.paths[ds.keys[i]].endswith("deep.pgm"))
    b = ds.read(deep)
    px = (np.frombuffer(b, np.uint8) if ds.codec == "raw"
          else np.asarray(Image.open(io.BytesIO(b)))).reshape(16, 16)
    assert np.array_equal(px, np.arange(256).reshape(16, 16))   # round(v * 255 / 65535)
    with pytest.raises(ConvertError, match="float.tiff.*mode F"):
        convert(src, tmp_path / "strict", format=fmt, strict=True, shuffle=False, progress=False)


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "I;16"])
def test_channels_of_mode_is_what_decode_bytes_stores(mode):
    from PIL import Image
    img = Image.fromarray(_photo(6, 5, 0)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "PA") else "PNG")
    px = imgs.decode_bytes(buf.getvalue())
    assert px.shape == (6, 5, imgs.channels_of_mode(img.mode)) and px.dtype == np.uint8
    assert imgs.channels_of_mode(img.mode) in (1, 3)


# ============================================================ 4. RGBA / LA images and arrays

@pytest.mark.parametrize("mode,channels", [("RGBA", 3), ("LA", 1)])
@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_alpha_is_dropped_and_every_loader_delivers_the_manifest_channels(tmp_path, mode,
                                                                         channels, fmt):
    src = _folder(tmp_path / "src", mode, n=3)
    out = tmp_path / "out"
    convert(src, out, format=fmt, progress=False)
    ds = pipeline.open_dataset(out)
    assert ds.channels == channels and ds.sample_shape == (16, 16, channels)
    paths = open_source(src).paths
    backends = ("torch", "dali") if (fmt, mode) == ("wds", "RGBA") else ("torch",)
    for backend in backends:
        got = _delivered(ds, backend)
        assert len(got) == 6
        for i, img in got.items():
            want = _source_pixels(paths[ds.keys[i]], channels)
            assert np.array_equal((img * 255).round(), want), (backend, i)
        L = pipeline.Loader(ds, 4, backend=backend, device="cpu", augment="cifar",
                            num_workers=0)
        b = next(iter(L.epoch(0)))
        assert tuple(b.images.shape) == (4, channels, 16, 16)
        L.close()


@pytest.mark.parametrize("c", [2, 4])
@pytest.mark.parametrize("fmt,encode", [("wds", None), ("wds", "npy"), ("zarr", None)])
def test_npz_with_alpha_is_stored_without_it(tmp_path, c, fmt, encode, capfd):
    x = np.random.default_rng(c).integers(0, 256, (6, 8, 8, c), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6) % 2)
    out = tmp_path / "out"
    convert(tmp_path / "d.npz", out, format=fmt, encode=encode, shuffle=False, progress=False)
    assert "alpha channel is dropped" in capfd.readouterr().err
    ds = pipeline.open_dataset(out)
    assert ds.channels == c - 1 and ds.sample_shape == (8, 8, c - 1)
    got = _delivered(ds, "torch")
    for i in range(6):
        assert np.array_equal((got[i] * 255).round(), x[ds.keys[i], ..., :c - 1])


# ============================================================ 5. labels far beyond any class count

def test_an_npz_label_beyond_max_label_is_refused_by_name(tmp_path):
    x = np.zeros((4, 4, 4), np.uint8)
    f = tmp_path / "ids.npz"
    np.savez(f, x=x, y=np.array([0, 1, MAX_LABEL + 1, 3]))
    with pytest.raises(SourceError, match=rf"label {MAX_LABEL + 1} of sample 2 in .*ids.npz"):
        open_source(f)
    np.savez(f, x=x, y=np.array([0, 2**64 - 1, 1, 2], np.uint64))   # no wrap to a negative
    with pytest.raises(SourceError, match=rf"label {2**64 - 1} of sample 1 "):
        open_source(f)
    np.savez(f, x=x, y=np.array([0, MAX_LABEL, 1, 2]))              # the limit itself is fine
    assert len(open_source(f).classes) == MAX_LABEL + 1
    idx = tmp_path / "idx"                                          # IDX files, the same
    idx.mkdir()
    (idx / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2,
                                                         0, 0, 0, 2]) + bytes(12))
    (idx / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 0x0C, 1, 0, 0, 0, 3]) + np.array([1, MAX_LABEL + 1, 0], ">i4").tobytes())
    with pytest.raises(SourceError, match=rf"label {MAX_LABEL + 1} of sample 1 in .*train-labels"):
        open_source(idx)


def test_a_huge_npz_label_fails_fast_within_a_memory_cap(tmp_path):
    """The tester's case (one label 2**40): refused in a process capped at 3 GB of address
    space, which the list of 2**40 class names would have run out of."""
    np.savez(tmp_path / "big.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 2**40, 1]))

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    r = _run_shard(str(tmp_path / "big.npz"), str(tmp_path / "out"), preexec_fn=cap)
    assert r.returncode == 2 and f"label {2**40} of sample 1" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


# ============================================================ 6. --encode npy of gray + RGB + RGBA

def test_npy_payloads_all_hold_the_dataset_channels(tmp_path):
    src = _folder(tmp_path / "src", "mixed", n=4)
    out = tmp_path / "out"
    convert(src, out, encode="npy", progress=False)
    ds = pipeline.open_dataset(out)
    assert ds.channels == 3 and ds.sample_shape == (16, 16, 3)
    paths = open_source(src).paths
    for i in range(len(ds)):
        a = np.load(io.BytesIO(ds.read(i)), allow_pickle=False)
        assert a.shape == (16, 16, 3), (i, a.shape)
        assert np.array_equal(a, _source_pixels(paths[ds.keys[i]], 3))
    for backend in ("torch", "dali"):       # DALI crashed on a 1-channel .npy among 3-channel
        assert len(_delivered(ds, backend)) == 8


# ============================================================ 7. --resize 0x0

def test_resize_below_1x1_is_refused_before_out_is_touched(tmp_path):
    for bad in ("0x0", "0x16", "16x0", (0, 4), [4, 0]):
        with pytest.raises(ValueError, match="resize"):
            parse_resize(bad)
    src = _folder(tmp_path / "src", "RGB", n=2)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="at least 1x1"):
        convert(src, out, format="zarr", resize="0x0", progress=False)
    assert not out.exists()
    r = _run_shard(str(src), str(out), "--resize", "0x0")
    assert r.returncode == 2 and "argument --resize" in r.stderr and not out.exists()
    convert(src, out, format="zarr", resize="8x8", progress=False)   # the corrected rerun
    assert pipeline.open_dataset(out).sample_shape == (8, 8, 3)


# ============================================================ 8. damaged .npz files

def test_a_damaged_or_empty_npz_is_named_not_a_traceback(tmp_path):
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=np.random.default_rng(0).integers(0, 256, (40, 8, 8), np.uint8),
                        y=np.arange(40) % 3)
    data = good.read_bytes()
    cases = {"garbage.npz": b"PK\x03\x04garbage", "empty.npz": b"",
             "half.npz": data[:len(data) // 2],
             "crc.npz": data[:300] + bytes(b ^ 0x55 for b in data[300:340]) + data[340:]}
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(SourceError, match=rf"cannot read {tmp_path / name}: "):
            open_source(tmp_path / name)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(SourceError, match="not an .npz archive"):
        open_source(tmp_path / "array.npy", source_type="npz")
    r = _run_shard(str(tmp_path / "empty.npz"), str(tmp_path / "out"))
    assert r.returncode == 2 and "error: cannot read" in r.stderr and "Traceback" not in r.stderr


# ============================================================ 9. same size, gray and RGB

def test_same_size_gray_and_rgb_images_keep_sample_shape(tmp_path):
    src = _folder(tmp_path / "src", "mixed", n=4)
    out = tmp_path / "out"
    convert(src, out, progress=False)
    ds = pipeline.open_dataset(out)
    assert ds.sample_shape == (16, 16, 3) and ds.shapes is None and ds.channels == 3
    L = pipeline.Loader(ds, 4, backend="torch", device="cpu", augment="cifar", num_workers=0)
    assert tuple(next(iter(L.epoch(0))).images.shape) == (4, 3, 16, 16)
    L.close()
    from PIL import Image                                        # sizes that differ: no shape
    Image.fromarray(_photo(20, 16, 1)).convert("L").save(src / "a" / "tall.png")
    convert(src, tmp_path / "out2", progress=False)
    ds2 = pipeline.open_dataset(tmp_path / "out2")
    assert ds2.sample_shape is None and set(ds2.shapes[:, 2].tolist()) == {3}


# ============================================================ 10. reasons, options, Ctrl-C

def test_skip_reasons_carry_no_memory_address(tmp_path):
    src = _folder(tmp_path / "src", "RGB", n=2)
    (src / "a" / "notes.png").write_bytes(b"this is no image at all")
    s = convert(src, tmp_path / "out", progress=False)
    assert s["skipped"] == [{"path": str(src / "a" / "notes.png"),
                             "error": "not an image PIL can read"}]
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert "not an image PIL can read" in text and " at 0x" not in text


@pytest.mark.parametrize("args,option", [
    (["--quality", "150"], "--quality"), (["--quality", "-5"], "--quality"),
    (["--workers", "-3"], "--workers"), (["--workers", "0"], "--workers"),
    (["--shard-bytes", "0"], "--shard-bytes"), (["--shard-bytes", "lots"], "--shard-bytes"),
    (["--samples-per-shard", "0"], "--samples-per-shard"), (["--limit", "0"], "--limit"),
])
def test_out_of_range_options_are_argparse_errors(tmp_path, args, option, capsys):
    with pytest.raises(SystemExit) as e:
        shard.build_parser().parse_args([str(tmp_path / "src"), str(tmp_path / "out"), *args])
    assert e.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shard.build_index_parser().parse_args(["x", "y", "--workers", "-3"])


@pytest.mark.parametrize("kw", [{"quality": 150}, {"workers": 0}, {"shard_bytes": 0}])
def test_out_of_range_options_are_refused_by_the_library_too(tmp_path, kw):
    src = _folder(tmp_path / "src", "RGB", n=1)
    with pytest.raises(ValueError, match=next(iter(kw))):
        convert(src, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_prints_one_line_exits_130_and_the_rerun_resumes(tmp_path):
    src = _folder(tmp_path / "src", "RGB", n=6)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{PAUSE_ENV: "write:60"})
    args = [str(src), str(out), "--samples-per-shard", "2", "--workers", "2", "--no-progress"]
    # a terminal's job gets SIGINT; a background job of a non-interactive shell (CI under
    # `... &`) inherits it ignored, and Python then keeps ignoring it: restore the default
    p = subprocess.Popen([*SHARD, *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, err = time.time() + 90, ""
        while time.time() < deadline:
            line = p.stderr.readline()
            err += line
            if "paused at write" in line or (not line and p.poll() is not None):
                break
        assert "paused at write" in err, err
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)          # the terminal's Ctrl-C: the whole group
        _, rest = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err += rest
    assert p.returncode == 130, err
    assert "interrupted: rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    r = _run_shard(*args[:-1])
    assert r.returncode == 0 and "resumed" in r.stdout, r.stdout + r.stderr
    assert len(pipeline.open_dataset(out)) == 12 and not (out / STATE_DIR).exists()
