"""Bad input, crash safety, resume and reproducibility of the converter (small synthetic and
real inputs; each test runs in a second or two)."""
from __future__ import annotations

import gzip
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.formats import ConvertError, SourceError, VerifyError, convert, verify
from pipeline.formats.convert import _Interrupted
from pipeline.formats.manifest import ManifestError


def _png(path: Path, value: int, size=(8, 8)) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A tiny ImageFolder: 2 classes x 12 PNGs (8x8)."""
    root = tmp_path / "src"
    for c, name in enumerate(["cat", "dog"]):
        for j in range(12):
            _png(root / name / f"{j:03d}.png", 10 * j + c)
    return root


@pytest.fixture
def npz(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (50, 6, 5, 3), dtype=np.uint8),
             y=rng.integers(0, 4, 50), classes=np.array(["a", "b", "c", "d"]))
    return path


def test_corrupt_images_skipped_or_strict(folder, tmp_path, cifar_jpeg_root):
    good = sorted((cifar_jpeg_root / "train" / "cat").iterdir())[0].read_bytes()
    (folder / "cat" / "bad_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "dog" / "bad_garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    s = convert(folder, tmp_path / "o", samples_per_shard=10, progress=False)
    assert s["num_samples"] == 24 and s["skipped_samples"] == 2
    assert {Path(x["path"]).name for x in s["skipped"]} == {"bad_truncated.jpg", "bad_garbage.jpg"}
    assert len(pipeline.open_dataset(tmp_path / "o")) == 24
    verify(tmp_path / "o")
    with pytest.raises(ConvertError, match="bad_(truncated|garbage).jpg"):
        convert(folder, tmp_path / "strict", strict=True, progress=False)


def test_source_errors_name_the_file(tmp_path, folder):
    _png(folder / "stray.png", 1)
    with pytest.raises(SourceError, match="missing label.*stray.png"):
        convert(folder, tmp_path / "o1", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="unknown source type|empty"):
        convert(tmp_path / "empty", tmp_path / "o2", progress=False)
    (tmp_path / "emptyfolder" / "cls").mkdir(parents=True)
    with pytest.raises(SourceError, match="empty source.*emptyfolder"):
        convert(tmp_path / "emptyfolder", tmp_path / "o3", source_type="imagefolder", progress=False)
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match="unknown source type.*misc"):
        convert(tmp_path / "misc", tmp_path / "o4", progress=False)
    with pytest.raises(SourceError, match="unknown source type 'hdf5'"):
        convert(folder, tmp_path / "o5", source_type="hdf5", progress=False)


def test_idx_wrong_magic_and_missing_labels(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    with gzip.open(d / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes(4))   # idx1 magic, not idx3
    with gzip.open(d / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes(4))
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz has wrong magic number 0x00000801"):
        convert(d, tmp_path / "o", progress=False)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError, match="missing IDX file.*train-labels"):
        convert(d, tmp_path / "o", progress=False)


def test_npz_missing_labels(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(SourceError, match=r"missing labels.*x.npz"):
        convert(tmp_path / "x.npz", tmp_path / "o", progress=False)


def test_npz_both_formats_roundtrip(npz, tmp_path):
    import zarr
    x = np.load(npz)["x"]
    y = np.load(npz)["y"]
    for fmt, enc in (("wds", None), ("wds", "npy"), ("zarr", None)):
        out = tmp_path / f"{fmt}-{enc}"
        convert(npz, out, format=fmt, encode=enc, samples_per_shard=16, progress=False)
        ds = pipeline.open_dataset(out)
        assert ds.classes == ["a", "b", "c", "d"] and len(ds) == 50 and len(ds.files) == 4
        np.testing.assert_array_equal(ds.labels, y[ds.keys])
        for i in range(len(ds)):
            data = ds.read(i)
            if ds.codec == "raw":
                got = np.frombuffer(data, np.uint8).reshape(ds.sample_shape)
            elif ds.codec == "npy":
                got = np.load(__import__("io").BytesIO(data), allow_pickle=False)
            else:
                from PIL import Image
                got = np.asarray(Image.open(__import__("io").BytesIO(data)))
            np.testing.assert_array_equal(got, x[ds.keys[i]])
        if fmt == "zarr":
            np.testing.assert_array_equal(zarr.open_array(out / "data.zarr" / "images")[:], x[ds.keys])
        verify(out)


def test_cifar_python_batches(tmp_path):
    """CIFAR-10 python layout (synthetic, pickled like the original) via the safe unpickler."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        data[name] = x
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": [0, 1, 2, 1]}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b", b"c"]}, f, protocol=2)
    convert(tmp_path, tmp_path / "o", format="zarr", split="test", progress=False)
    ds = pipeline.open_dataset(tmp_path / "o")
    assert ds.classes == ["a", "b", "c"] and len(ds) == 4
    want = data["test_batch"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for i in range(4):
        assert ds.read(i) == want[ds.keys[i]].tobytes()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(SourceError, match="refusing to load builtins.print"):
        convert(tmp_path, tmp_path / "o2", split="test", progress=False)


def test_interrupted_conversion_resumes_to_identical_bytes(npz, tmp_path):
    ref = tmp_path / "ref"
    convert(npz, ref, samples_per_shard=10, progress=False)
    out = tmp_path / "out"
    with pytest.raises(_Interrupted):
        convert(npz, out, samples_per_shard=10, progress=False, _stop_after=2)
    assert not (out / "manifest.json").exists()
    (out / "shard-000004.tar.tmp").write_bytes(b"half a shard")     # crash mid-write
    s = convert(npz, out, samples_per_shard=10, progress=False)
    assert (s["status"], s["shards_skipped"], s["shards_written"]) == ("resumed", 2, 3)
    for f in sorted(ref.glob("*.tar")) + sorted(ref.glob("*.idx")):
        assert (out / f.name).read_bytes() == f.read_bytes()      # reproducible bytes
    assert not list(out.glob("*.tmp"))
    verify(out)
    assert convert(npz, out, samples_per_shard=10, progress=False)["status"] == "already complete"


def test_resume_rewrites_a_damaged_unfinished_shard(npz, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(_Interrupted):
        convert(npz, out, format="zarr", samples_per_shard=10, progress=False, _stop_after=2)
    shard = next(p for p in (out / "data.zarr" / "images" / "c").rglob("*") if p.is_file())
    shard.write_bytes(shard.read_bytes()[:-7])
    s = convert(npz, out, format="zarr", samples_per_shard=10, progress=False)
    assert s["shards_written"] == 4
    verify(out)


def test_other_dataset_in_out_is_refused(npz, folder, tmp_path):
    out = tmp_path / "out"
    convert(npz, out, progress=False)
    with pytest.raises(ConvertError, match="different dataset.*--overwrite"):
        convert(folder, out, progress=False)
    with pytest.raises(ConvertError, match="different dataset"):
        convert(npz, out, seed=1, progress=False)
    s = convert(folder, out, overwrite=True, progress=False)
    assert s["num_samples"] == 24 and pipeline.open_dataset(out).classes == ["cat", "dog"]
    assert len(list(out.glob("*.tar"))) == 1
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "mine.txt").write_text("x")
    with pytest.raises(ConvertError, match="not empty"):
        convert(npz, tmp_path / "junk", progress=False)


def test_truncated_modified_missing_shards_are_named(npz, tmp_path):
    out = tmp_path / "out"
    convert(npz, out, samples_per_shard=10, progress=False)
    tars = sorted(out.glob("*.tar"))
    ds = pipeline.open_dataset(out)
    tars[1].write_bytes(tars[1].read_bytes()[:-600])                    # truncated
    with pytest.raises(VerifyError, match=r"truncated.*shard-000001.tar"):
        verify(out)
    with pytest.raises(ManifestError, match=r"truncated.*shard-000001.tar"):
        ds.check_files()
    shutil.copy(tmp_path / "out" / "shard-000000.tar", tars[1])           # replaced
    data = bytearray(tars[2].read_bytes())
    data[int(ds.offset[ds.file == 2][0])] ^= 0xFF                         # one flipped byte
    tars[2].write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"shard-000001.tar"):
        verify(out)
    ds.check_files()            # sizes match, so only the checksum pass sees it
    with pytest.raises(ManifestError, match=r"shard-000001.tar"):
        ds.check_files(verify_checksum=True)
    shutil.copy(tars[0], tmp_path / "keep.tar")
    tars[1].unlink()
    with pytest.raises(VerifyError, match=r"missing.*shard-000001.tar"):
        verify(out)


def test_variable_size_folder(tmp_path):
    """Sizes may differ: WebDataset keeps bytes and a shape column; Zarr needs --resize."""
    root = tmp_path / "src"
    _png(root / "a" / "0.png", 1, (8, 8))
    _png(root / "a" / "1.png", 2, (10, 6))
    _png(root / "b" / "2.png", 3, (5, 7))
    convert(root, tmp_path / "w", progress=False)
    ds = pipeline.open_dataset(tmp_path / "w")
    assert ds.sample_shape is None and ds.shapes is not None
    assert sorted(map(tuple, np.asarray(ds.shapes).tolist())) == [(5, 7, 3), (8, 8, 3), (10, 6, 3)]
    with pytest.raises(ConvertError, match="differ in size.*--resize"):
        convert(root, tmp_path / "z", format="zarr", progress=False)
    convert(root, tmp_path / "z2", format="zarr", resize="6x6", progress=False)
    assert pipeline.open_dataset(tmp_path / "z2").sample_shape == (6, 6, 3)
    verify(tmp_path / "z2")


def test_cli_convert_verify_and_exit_codes(npz, tmp_path, repo_root):
    cli = [sys.executable, str(repo_root / "tools" / "shard.py")]
    r = subprocess.run(cli + [str(npz), str(tmp_path / "o"), "--samples-per-shard", "20",
                              "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "samples" in r.stdout and "images/s" in r.stdout and "bytes per payload byte" in r.stdout
    assert subprocess.run(cli + ["--verify", str(tmp_path / "o"), "--no-progress"]).returncode == 0
    (tmp_path / "o" / "shard-000002.tar").unlink()
    r = subprocess.run(cli + ["--verify", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "shard-000002.tar" in r.stderr
    r = subprocess.run(cli + [str(tmp_path), str(tmp_path / "o2"), "--source-type", "idx"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing IDX file" in r.stderr


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_verify_compares_the_stored_labels(npz, tmp_path, fmt):
    """A manifest label that disagrees with the label stored beside the image (the wds
    `.cls` member, the Zarr `labels` array): verify said OK and the Loader trained on it."""
    out = tmp_path / fmt
    convert(npz, out, format=fmt, samples_per_shard=10, progress=False)
    assert "labels" in verify(out)["checks"]
    path = out / "manifest" / "label.npy"
    labels = np.load(path)
    labels[17] = (labels[17] + 1) % 4                                       # still a class index
    np.save(path, labels)
    with pytest.raises(VerifyError, match=f"sample 17 is stored with label {(labels[17] - 1) % 4}, "
                                          f"the manifest says {labels[17]}"):
        verify(out)
