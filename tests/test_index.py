"""Indexing third-party WebDataset shards in place (pipeline/formats/index.py, `shard.py index`).

Shards are written by the `webdataset` library itself (ShardWriter: PAX headers, float
mtimes), by GNU tar (long names, members in any order within a sample); every indexed
sample must match what the `webdataset` library reads from the same shards.
"""
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline
from _tars import pax_tar, shard_writer
from pipeline.formats import verify
from pipeline.formats.index import IndexError_, index

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jpegs(cifar_jpegs):
    """(class name, jpeg bytes) for 12 images of each of the 10 CIFAR-10 classes."""
    return cifar_jpegs


@pytest.fixture(scope="module")
def wds_shards(jpegs, tmp_path_factory):
    d = tmp_path_factory.mktemp("wds-shards")
    classes = sorted({c for c, _ in jpegs})
    shard_writer(d, ({"__key__": f"{c}/sample{i:04d}", "jpg": data, "cls": str(classes.index(c)),
                      "json": json.dumps({"meta": {"class": classes.index(c)}, "name": c})}
                     for i, (c, data) in enumerate(jpegs)))
    return d, classes


def _wds_samples(shards):
    import webdataset as wds
    ds = wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False)
    return {s["__key__"]: s for s in ds}


@pytest.mark.parametrize("label", ["cls", "json:meta.class", "key:^([a-z]+)/"])
def test_webdataset_shards_match_the_webdataset_library(wds_shards, tmp_path, label):
    d, classes = wds_shards
    shards = sorted(d.glob("*.tar"))
    assert len(shards) == 3
    s = index(str(d), str(tmp_path / "out"), label=label)
    assert s["num_samples"] == 120 and not s["skipped"]
    ds = pipeline.open_dataset(tmp_path / "out")
    assert ds.files == [str(p) for p in shards] and not ds.has_checksums
    ref = _wds_samples(shards)
    assert len(ref) == len(ds) == 120
    by_bytes = {bytes(v["jpg"]): v for v in ref.values()}
    for i in range(len(ds)):
        r = by_bytes[ds.read(i)]                          # the image member, byte for byte
        assert ds.classes[ds.labels[i]] == r["__key__"].split("/")[0] if label.startswith("key") \
            else int(ds.labels[i]) == int(r["cls"])
    r = subprocess.run([sys.executable, str(REPO / "tools/shard.py"), "--verify",
                        str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0 and "sizes and locations match (indexed in place: no checksums" in r.stdout, r


@pytest.mark.parametrize("label", ["cls", "key:^([a-z]+)/"])
def test_worker_processes_write_what_one_process_writes(wds_shards, jpegs, tmp_path, label):
    """Local shards indexed by worker processes (each hands its shard back as an .npz):
    the same manifest and DALI index files, byte for byte, nothing left behind, and a
    strict error raised in a worker names its shard."""
    d, _ = wds_shards
    outs = []
    for w in (1, 3):
        out = tmp_path / f"w{w}"
        s = index(str(d), str(out), label=label, workers=w, fields="json")
        assert s["num_samples"] == 120 and not s["skipped"]
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted(d.glob("*.tar")):
        shutil.copy(p, bad / p.name)
    pax_tar(bad / "zz-badlabel.tar", [("s0.jpg", jpegs[0][1]), ("s0.cls", b"x")])
    with pytest.raises(IndexError_, match="zz-badlabel.tar.*not an integer"):
        index(str(bad), str(tmp_path / "strict"), strict=True, workers=2)
    s = index(str(bad), str(tmp_path / "lenient"), workers=2)
    assert s["num_samples"] == 120 and len(s["skipped"]) == 1 and "zz-badlabel.tar" in s["skipped"][0]


def test_gnu_tar_long_names_any_member_order(jpegs, tmp_path):
    src = tmp_path / "files"
    key_dir = "a" * 60 + "/" + "b" * 50                   # > 100 characters: GNU long names
    (src / key_dir).mkdir(parents=True)
    names, want = [], {}
    rnd = random.Random(0)
    for i, (c, data) in enumerate(jpegs[:30]):
        key = f"{key_dir}/k{i:03d}"
        ext = "JPEG" if i % 2 else "jpg"                    # ImageNet's own file names
        (src / f"{key}.{ext}").write_bytes(data)
        (src / f"{key}.cls").write_text(str(i % 10))
        (src / f"{key}.json").write_text(json.dumps({"label": i % 10}))
        members = [f"{key}.{ext}", f"{key}.cls", f"{key}.json"]
        rnd.shuffle(members)                              # any order within a sample
        names += members
        want[data] = i % 10
    for fmt in ("gnu", "pax"):
        tar = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "-cf", str(tar), f"--format={fmt}", "-C", str(src), *names], check=True)
        out = tmp_path / f"out-{fmt}"
        s = index(str(tar), str(out), label="json:label")
        ds = pipeline.open_dataset(out)
        assert s["num_samples"] == len(ds) == 30
        assert {ds.read(i): int(ds.labels[i]) for i in range(30)} == want
        assert verify(out)["num_samples"] == 30


def test_bad_input_named_skipped_or_refused(jpegs, tmp_path):
    img = jpegs[0][1]
    good = [("s0.jpg", img), ("s0.cls", b"1"), ("s1.jpg", img), ("s1.cls", b"2")]
    pax_tar(tmp_path / "noimage.tar", good + [("s2.txt", b"hi"), ("s2.cls", b"3")])
    pax_tar(tmp_path / "dup.tar", good + [("s3.jpg", img), ("s3.cls", b"4"), ("s0.jpg", img)])
    pax_tar(tmp_path / "badlabel.tar", good + [("s4.jpg", img), ("s4.cls", b"x")])
    pax_tar(tmp_path / "nolabel.tar", good + [("s5.jpg", img)])
    # labels are class indices: a negative one, or an id stored as the label (which would
    # make millions of classes), is a bad label of that sample, not of the whole run
    pax_tar(tmp_path / "neglabel.tar", good + [("s6.jpg", img), ("s6.cls", b"-1")])
    pax_tar(tmp_path / "biglabel.tar", good + [("s7.jpg", img), ("s7.cls", b"3000000")])
    cases = {"noimage": "s2': no image member", "dup": "s0': duplicate key",
             "badlabel": "'x' in .cls is not an integer", "nolabel": "s5': label 'cls': no .cls member",
             "neglabel": "s6': label 'cls': label -1 in .cls is not a class index (0..999999)",
             "biglabel": "s7': label 'cls': label 3000000 in .cls is not a class index"}
    for name, msg in cases.items():
        s = index(str(tmp_path / f"{name}.tar"), str(tmp_path / f"out-{name}"))
        assert any(msg in p and f"{name}.tar" in p for p in s["skipped"]), s["skipped"]
        assert len(pipeline.open_dataset(tmp_path / f"out-{name}").classes) <= 5
        with pytest.raises(IndexError_, match=f"{name}.tar.*{msg[:12]}"):
            index(str(tmp_path / f"{name}.tar"), str(tmp_path / f"strict-{name}"), strict=True)
    data = (tmp_path / "noimage.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "notar.tar").write_bytes(b"this is not a tar file at all" * 40)
    for name, msg in (("cut", "truncated|runs past the end"), ("notar", "non-tar|not a tar")):
        with pytest.raises(IndexError_, match=f"{name}.tar.*({msg})"):
            index(str(tmp_path / f"{name}.tar"), str(tmp_path / f"o-{name}"), strict=True)
    s = index([str(tmp_path / "cut.tar"), str(tmp_path / "dup.tar")], str(tmp_path / "o-mixed"))
    assert any("cut.tar" in p and "shard skipped" in p for p in s["skipped"]) and s["num_samples"] == 3
    # nothing indexable, and refused runs: no half-made dataset folder is left behind (a
    # folder that was there before stays, with what it held)
    with pytest.raises(IndexError_, match="no sample could be indexed from 1 shard.*notar.tar"):
        index(str(tmp_path / "notar.tar"), str(tmp_path / "o-nothing"))
    assert not (tmp_path / "o-nothing").exists() and not (tmp_path / "o-notar").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(IndexError_):
        index(str(tmp_path / "notar.tar"), str(tmp_path / "mine"))
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_reads_indexed_shards(wds_shards, tmp_path, backend):
    d, _ = wds_shards
    index(str(d), str(tmp_path / "out"))
    ds = pipeline.open_dataset(tmp_path / "out")
    L = pipeline.Loader(ds, 32, keep=0.7, policy="uniform", epochs=1, backend=backend, device="cpu",
                        augment="imagenet", num_workers=0,
                        options=pipeline.LoaderOptions.of(image_size=32))
    ids, labels = [], []
    for b in L.epoch(0):
        ids.append(b.ids.numpy()); labels.append(b.labels.numpy())
    ids, labels = np.concatenate(ids), np.concatenate(labels)
    real = ids >= 0
    assert real.sum() == round(0.7 * 120) == len(set(ids[real].tolist()))
    np.testing.assert_array_equal(labels[real], np.asarray(ds.labels)[ids[real]])
    assert L.stats(0).samples_corrupt == 0
    L.close()


# The trainer on indexed shards (.cls/.jpg/.json/.txt, fields recorded): tests/test_fields.py,
# test_trainer_one_epoch_on_indexed_shards_with_fields.


def _index_columns(root):
    ds = pipeline.open_dataset(root)
    return sorted(zip(ds.file.tolist(), ds.offset.tolist(), ds.length.tolist(), ds.labels.tolist()))


def test_remote_walk_reads_headers_only_in_every_tar_dialect(jpegs, tmp_path):
    """Over HTTP (a real nginx): the same manifest as indexing the local files, for POSIX
    ustar (names split into prefix + name), GNU long names, PAX (GNU tar and the webdataset
    library's ShardWriter), members in any order; and nginx sends per sample little more
    than the header bytes the walk needs (formats/tarscan.py)."""
    from _servers import start_nginx
    src = tmp_path / "files"
    key_dir = "d" * 70 + "/" + "e" * 40                   # > 100 characters: prefix or long name
    (src / key_dir).mkdir(parents=True)
    names, rnd = [], random.Random(1)
    for i, (c, data) in enumerate(jpegs[:40]):
        key = f"{key_dir}/k{i:03d}"
        (src / f"{key}.jpg").write_bytes(data)
        (src / f"{key}.cls").write_text(str(i % 10))
        members = [f"{key}.jpg", f"{key}.cls"]
        rnd.shuffle(members)
        names += members
    www = tmp_path / "www"
    www.mkdir()
    for fmt in ("ustar", "gnu", "pax"):
        subprocess.run(["tar", "-cf", str(www / f"{fmt}.tar"), f"--format={fmt}", "-C", str(src),
                        *names], check=True)
    shard_writer(www, ({"__key__": f"w/{i:04d}", "jpg": data, "cls": str(i % 10)}
                       for i, (_, data) in enumerate(jpegs[:40])), maxcount=100)
    (tmp_path / "nginx").mkdir()
    server = start_nginx(www, tmp_path / "nginx")
    try:
        for tar in sorted(www.glob("*.tar")):
            local = index(str(tar), str(tmp_path / f"l-{tar.stem}"))
            since = server.log.stat().st_size
            remote = index(f"{server.url}/{tar.name}", str(tmp_path / f"r-{tar.stem}"))
            time.sleep(0.3)  # nginx logs after the response
            with open(server.log) as f:
                f.seek(since)
                lines = [line.split(" ") for line in f]
            sent = sum(int(v[3]) for v in lines)
            assert local["num_samples"] == remote["num_samples"] == 40, tar.name
            lc, rc = _index_columns(tmp_path / f"l-{tar.stem}"), _index_columns(tmp_path / f"r-{tar.stem}")
            assert [v[1:] for v in lc] == [v[1:] for v in rc], tar.name
            assert sent == remote["bytes_fetched"]
            # ustar/GNU: two headers and a label a sample (GNU long names: two more blocks a
            # member); PAX: an extended header and its record before each member
            per_sample = {"ustar": 1024, "gnu": 3 * 1024, "pax": 3 * 1024}.get(tar.stem, 2048)
            assert sent <= 40 * per_sample + 4096, (tar.name, sent)
    finally:
        server.stop()


def test_http_urls_that_are_no_patterns_stay_as_given():
    """Over HTTP "?" starts a query (presigned URLs) and "[" an IPv6 host: neither is a
    glob, and a URL without ".tar" is not probed as a directory (that would GET a shard)."""
    from pipeline.formats.index import expand_shards
    for url in ("https://h/x/shard-000001.tar?X-Amz-Signature=abc&X-Amz-Date=1",
                "http://[::1]:8080/a/shard.tar", "https://h/no-extension"):
        assert expand_shards(url) == [url]
    assert expand_shards("https://h/s-{0..2}.tar?sig=1") == [f"https://h/s-{i}.tar?sig=1" for i in range(3)]
