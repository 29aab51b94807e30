"""Shared pytest fixtures (session-scoped: built once per test run, reused by every module).

Paths and real data (skip with a clear reason when the data is absent):
    repo_root        Path of the repository checkout
    shared_data      Path of <repo>/../shared/data (skip if missing)
    cifar_jpeg_root  Path of the extracted "cifar10-jpeg" directory (train/ and test/
                     ImageFolder trees), extracted once per session into a tmp dir
    fmnist_dir       Path of the Fashion-MNIST IDX files (/usr/share/datasets/fashion-mnist)
    cifar_jpegs      (class name, JPEG bytes) of the first 12 train images of each CIFAR-10
                     class (120 real images, for writing third-party shards)

Small converted datasets (made with pipeline.formats.convert; open with
pipeline.open_dataset(path)); each fixture returns the output directory (Path):
    cifar_wds        CIFAR-10 JPEG train, first 2000 samples after the seed-0 shuffle,
                     WebDataset, 500 samples per shard (4 tars + DALI .idx files)
    cifar_zarr       the same 2000 samples as a Zarr v3 store (raw 32x32x3 pixels), 4 shards
    cifar_test_wds   CIFAR-10 JPEG test split, 1000 samples, WebDataset, 250 per shard
    fmnist_wds       Fashion-MNIST train (IDX), 2000 samples, WebDataset PNG (1 channel),
                     500 per shard
    fmnist_test_wds  Fashion-MNIST test split, 1000 samples, WebDataset PNG, one shard
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
SUBSET = 2000


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data(repo_root) -> Path:
    path = Path(os.environ.get("SHARED_DATA", repo_root.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data directory {path} is absent (see its README in the project docs)")
    return path


@pytest.fixture(scope="session")
def cifar_jpeg_root(shared_data, tmp_path_factory) -> Path:
    archive = shared_data / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip(f"{archive} is absent: CIFAR-10 JPEG tests need it")
    dest = tmp_path_factory.mktemp("cifar10-jpeg-extract")
    if shutil.which("tar"):         # GNU tar is several times faster than tarfile here
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest)], check=True)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    root = dest / "cifar10-jpeg"
    if not (root / "train").is_dir():
        pytest.skip(f"{archive} does not contain cifar10-jpeg/train")
    return root


@pytest.fixture(scope="session")
def cifar_jpegs(cifar_jpeg_root) -> list[tuple[str, bytes]]:
    train = cifar_jpeg_root / "train"
    return [(c, (train / c / f).read_bytes()) for c in sorted(os.listdir(train))
            for f in sorted(os.listdir(train / c))[:12]]


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST IDX files are absent from {FMNIST_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
    return FMNIST_DIR


def _convert(src, out, **kw) -> Path:
    from pipeline.formats import convert
    convert(src, out, progress=False, **kw)
    return Path(out)


@pytest.fixture(scope="session")
def cifar_wds(cifar_jpeg_root, tmp_path_factory) -> Path:
    return _convert(cifar_jpeg_root / "train", tmp_path_factory.mktemp("cifar_wds"),
                    format="wds", limit=SUBSET, samples_per_shard=500, seed=0)


@pytest.fixture(scope="session")
def cifar_zarr(cifar_jpeg_root, tmp_path_factory) -> Path:
    return _convert(cifar_jpeg_root / "train", tmp_path_factory.mktemp("cifar_zarr"),
                    format="zarr", limit=SUBSET, samples_per_shard=500, seed=0)


@pytest.fixture(scope="session")
def cifar_test_wds(cifar_jpeg_root, tmp_path_factory) -> Path:
    return _convert(cifar_jpeg_root, tmp_path_factory.mktemp("cifar_test_wds"), split="test",
                    format="wds", limit=1000, samples_per_shard=250, seed=0)


@pytest.fixture(scope="session")
def fmnist_wds(fmnist_dir, tmp_path_factory) -> Path:
    return _convert(fmnist_dir, tmp_path_factory.mktemp("fmnist_wds"), split="train",
                    format="wds", limit=SUBSET, samples_per_shard=500, seed=0)


@pytest.fixture(scope="session")
def fmnist_test_wds(fmnist_dir, tmp_path_factory) -> Path:
    return _convert(fmnist_dir, tmp_path_factory.mktemp("fmnist_test_wds"), split="test",
                    format="wds", limit=1000, seed=0)
