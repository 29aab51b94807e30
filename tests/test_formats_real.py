"""Real-data round trips and interop: CIFAR-10 JPEG (ImageFolder) and Fashion-MNIST (IDX)
converted to WebDataset and Zarr, read back through the manifest and by webdataset, DALI,
zarr and tar."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.formats import convert, verify
from pipeline.formats.sources import open_source, read_idx

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def _pixels(data: bytes, channels: int = 3) -> np.ndarray:
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    img = img.convert("L" if channels == 1 else "RGB")
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _source_bytes(paths: list[str], keys) -> list[bytes]:
    return [Path(paths[k]).read_bytes() for k in keys]


def test_cifar_wds_subset_bytes_labels(cifar_wds, cifar_jpeg_root):
    ds = pipeline.open_dataset(cifar_wds)
    src = open_source(cifar_jpeg_root / "train")
    assert (len(ds), ds.format, ds.codec, ds.classes) == (2000, "wds", "jpeg", CIFAR_CLASSES)
    assert ds.sample_shape == (32, 32, 3) and ds.channels == 3 and len(ds.files) == 4
    assert len(set(ds.keys.tolist())) == 2000
    np.testing.assert_array_equal(ds.labels, src.labels[ds.keys])
    # shuffled: the first shard is not one class (the source is sorted by class)
    assert len(np.unique(ds.labels[:500])) == 10
    for i, want in enumerate(_source_bytes(src.paths, ds.keys)):
        assert ds.read(i) == want, f"sample {i} differs from {src.paths[ds.keys[i]]}"
    ds.check_files(verify_checksum=True)
    rep = verify(cifar_wds)
    assert rep["num_samples"] == 2000 and rep["checks"] == ["sizes", "sha256", "per-sample CRC32", "locations", "labels"]


def test_cifar_train_full_wds_two_workers(cifar_jpeg_root, tmp_path):
    """All 50,000 training JPEGs, stored byte for byte, in parallel."""
    out = tmp_path / "full"
    s = convert(cifar_jpeg_root, out, split="train", workers=2, samples_per_shard=12500,
                progress=False)
    assert (s["num_samples"], s["num_shards"], s["skipped_samples"]) == (50000, 4, 0)
    ds = pipeline.open_dataset(out)
    assert np.bincount(ds.labels).tolist() == [5000] * 10
    src = open_source(cifar_jpeg_root / "train")
    assert sorted(ds.keys.tolist()) == list(range(50000))
    for fi, path in enumerate(ds.files):
        data = Path(path).read_bytes()
        for i in np.flatnonzero(ds.file == fi):
            o, n = int(ds.offset[i]), int(ds.length[i])
            assert data[o:o + n] == Path(src.paths[ds.keys[i]]).read_bytes()
    assert subprocess.run(["tar", "-tf", ds.files[0]], capture_output=True, text=True,
                          check=True).stdout.splitlines()[:2] == ["000000000.cls", "000000000.jpg"]


def test_cifar_test_split_wds(cifar_test_wds):
    ds = pipeline.open_dataset(cifar_test_wds)
    assert len(ds) == 1000 and ds.classes == CIFAR_CLASSES
    assert ds.header["source"]["split"] == "test"


def test_cifar_zarr_pixels(cifar_zarr, cifar_jpeg_root):
    import zarr
    ds = pipeline.open_dataset(cifar_zarr)
    src = open_source(cifar_jpeg_root / "train")
    assert (ds.format, ds.codec, ds.sample_shape) == ("zarr", "raw", (32, 32, 3))
    arr = zarr.open_array(cifar_zarr / "data.zarr" / "images", mode="r")
    assert arr.shape == (2000, 32, 32, 3) and arr.dtype == np.uint8
    pixels = arr[:]
    labels = zarr.open_array(cifar_zarr / "data.zarr" / "labels", mode="r")[:]
    np.testing.assert_array_equal(labels, src.labels[ds.keys])
    np.testing.assert_array_equal(labels, ds.labels)
    for i in range(len(ds)):
        want = _pixels(Path(src.paths[ds.keys[i]]).read_bytes())
        np.testing.assert_array_equal(pixels[i], want)
        assert ds.read(i) == want.tobytes()
    assert verify(cifar_zarr)["num_samples"] == 2000


def test_cifar_test_full_zarr(cifar_jpeg_root, tmp_path):
    import zarr
    s = convert(cifar_jpeg_root / "test", tmp_path / "z", format="zarr", progress=False)
    assert s["num_samples"] == 10000
    ds = pipeline.open_dataset(tmp_path / "z")
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    arr = zarr.open_array(tmp_path / "z" / "data.zarr" / "images", mode="r")
    src = open_source(cifar_jpeg_root / "test")
    sel = np.arange(0, 10000, 97)
    got = arr[:]
    for i in sel:
        np.testing.assert_array_equal(got[i], _pixels(Path(src.paths[ds.keys[i]]).read_bytes()))
    verify(tmp_path / "z")


def test_fmnist_wds_png_roundtrip(fmnist_wds, fmnist_dir):
    ds = pipeline.open_dataset(fmnist_wds)
    images = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz")
    assert (ds.codec, ds.sample_shape, ds.channels) == ("png", (28, 28, 1), 1)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.labels, labels[ds.keys])
    from PIL import Image
    for i in range(len(ds)):
        img = Image.open(io.BytesIO(ds.read(i)))
        assert img.mode == "L"                          # grayscale stays one channel
        np.testing.assert_array_equal(np.asarray(img), images[ds.keys[i]])


@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fmnist_full_zarr_and_wds(fmnist_dir, tmp_path, split, n):
    import zarr
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(fmnist_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(fmnist_dir / f"{prefix}-labels-idx1-ubyte.gz")
    convert(fmnist_dir, tmp_path / "z", format="zarr", split=split, progress=False)
    ds = pipeline.open_dataset(tmp_path / "z")
    assert len(ds) == n and ds.sample_shape == (28, 28, 1)
    got = zarr.open_array(tmp_path / "z" / "data.zarr" / "images", mode="r")[:]
    np.testing.assert_array_equal(got[..., 0], images[ds.keys])
    np.testing.assert_array_equal(ds.labels, labels[ds.keys])
    for fi, path in enumerate(ds.files):       # every manifest range = the raw pixels
        data = Path(path).read_bytes()
        for i in np.flatnonzero(ds.file == fi)[::50]:
            o = int(ds.offset[i])
            assert data[o:o + 784] == images[ds.keys[i]].tobytes()
    if split == "test":
        s = convert(fmnist_dir, tmp_path / "w", format="wds", split=split, progress=False)
        assert s["num_samples"] == n and s["codec"] == "png"
        verify(tmp_path / "w")


def test_webdataset_library_reads_our_tars(cifar_wds):
    import webdataset as wds
    ds = pipeline.open_dataset(cifar_wds)
    seen = {}
    for sample in wds.WebDataset([str(f) for f in ds.files], shardshuffle=False, empty_check=False):
        i = int(sample["__key__"])
        seen[i] = (sample["jpg"], int(sample["cls"]))
    assert sorted(seen) == list(range(len(ds)))
    for i, (data, label) in seen.items():
        assert data == ds.read(i) and label == ds.labels[i]


def test_dali_webdataset_reader_with_our_index(cifar_wds):
    from nvidia.dali import fn, pipeline_def
    ds = pipeline.open_dataset(cifar_wds)
    idx = [f[:-4] + ".idx" for f in ds.files]
    batch = 250

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def wds_pipe():
        jpg, cls = fn.readers.webdataset(paths=ds.files, index_paths=idx, ext=["jpg", "cls"],
                                         missing_component_behavior="error",
                                         random_shuffle=False, name="reader")
        return jpg, cls, fn.get_property(jpg, key="source_info")

    pipe = wds_pipe()
    pipe.build()
    assert pipe.epoch_size("reader") == len(ds)
    seen = set()
    for _ in range(len(ds) // batch):
        jpgs, clss, infos = pipe.run()
        for j in range(batch):
            info = bytes(np.asarray(infos.at(j))).decode()
            tar_path, offset, member = info.rsplit(":", 2)
            i = int(member.split(".")[0])
            assert int(offset) == int(ds.offset[i]) and tar_path == ds.files[ds.file[i]]
            assert bytes(np.asarray(jpgs.at(j))) == ds.read(i)
            assert int(bytes(np.asarray(clss.at(j))).decode()) == ds.labels[i]
            seen.add(i)
    assert seen == set(range(len(ds)))


def test_our_index_matches_dali_wds2idx(cifar_wds, tmp_path):
    """DALI's own index tool (which runs GNU tar) produces the same index as our writer."""
    tool = shutil.which("wds2idx") or str(Path(__import__("sys").executable).parent / "wds2idx")
    if not Path(tool).exists() or shutil.which("tar") is None:
        pytest.skip("wds2idx (from nvidia-dali) or tar not found")
    tar = sorted(cifar_wds.glob("*.tar"))[0]
    subprocess.run([tool, str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "ref.idx").read_text() == tar.with_suffix(".idx").read_text()


def test_no_pax_headers_and_integer_mtime(cifar_wds):
    tar = sorted(cifar_wds.glob("*.tar"))[0]
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(not m.pax_headers and m.mtime == 0 for m in members)
    assert b"PaxHeader" not in tar.read_bytes()
