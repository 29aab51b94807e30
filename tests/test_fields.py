"""Samples with more than an image: `shard.py index --fields txt,json` and `Batch.fields`.

The shards are written by the `webdataset` library's own ShardWriter (.cls/.jpg/.json/.txt
members, PAX headers); every delivered row's label and fields must equal what the
`webdataset` library reads for that sample from the same shards.  Fields are read only
for planned samples (and the fill samples of padding rows), in their image's request.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from _tars import pax_tar, shard_writer
from pipeline.formats import VerifyError, verify
from pipeline.formats.index import IndexError_, index
from pipeline.options import LoaderOptions
from pipeline.read.ranges import MEMBER_GAP, merge_ranges

REPO = Path(__file__).resolve().parents[1]
KINDS = {"txt": "str", "json": "json"}


@pytest.fixture(scope="module")
def shards(cifar_jpegs, tmp_path_factory):
    d = tmp_path_factory.mktemp("wds-fields")
    classes = sorted({c for c, _ in cifar_jpegs})

    def sample(i, c, data):  # captions of varied length, some empty, not all ASCII
        caption = "" if i % 17 == 0 else f"a small photo of a {c}, n\u00b0{i}" + " ~" * (i % 9)
        return {"__key__": f"{c}/img{i:04d}", "jpg": data, "cls": str(classes.index(c)),
                "txt": caption, "json": json.dumps({"i": i, "class": c, "caption": caption})}
    shard_writer(d, (sample(i, c, data) for i, (c, data) in enumerate(cifar_jpegs)))
    return d


@pytest.fixture(scope="module")
def ref(shards):
    """The samples as the webdataset library reads them, in shard order (= our ``keys``)."""
    import webdataset as wds
    return list(wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False,
                               empty_check=False))


@pytest.fixture(scope="module")
def indexed(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed-fields")
    r = subprocess.run([sys.executable, str(REPO / "tools/shard.py"), "index", str(shards), str(out),
                        "--fields", "txt,json", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def _extent(ds, i) -> tuple[int, int]:
    """Bytes from the first to the last end of sample ``i``'s image and field members."""
    parts = [(ds.offset, ds.length)] + [(fc.offset, fc.length) for fc in ds.field_columns.values()]
    return (min(int(o[i]) for o, _ in parts), max(int(o[i]) + int(n[i]) for o, n in parts))


def _want(r, name, kind):
    return r[name].decode() if kind == "str" else json.loads(r[name]) if kind == "json" else r[name]


def _check_batch(ds, ref, b, fill, kinds):
    """Every row carries its own sample's (a padding row: its fill sample's) label and fields."""
    ids = b.ids.cpu().numpy()
    for j, sid in enumerate(np.where(ids >= 0, ids, fill).tolist()):
        for name, kind in kinds.items():
            got = b.fields[name][j]
            if sid < 0:
                assert got == {"str": "", "json": None}.get(kind, b"")
            else:
                assert got == _want(ref[int(ds.keys[sid])], name, kind), (sid, name)
        if ids[j] >= 0:
            assert int(b.labels[j]) == int(ref[int(ds.keys[sid])]["cls"])


def test_manifest_records_the_members_of_every_sample(indexed, ref):
    ds = pipeline.open_dataset(indexed)
    assert ds.field_names == ("txt", "json") and ds.header["fields"] == ["txt", "json"]
    assert len(ds) == len(ref) == 120
    for i in range(len(ds)):
        r = ref[int(ds.keys[i])]
        assert ds.read(i) == r["jpg"] and int(ds.labels[i]) == int(r["cls"])
        assert ds.read_field("txt", i) == r["txt"] and ds.read_field("json", i) == r["json"]
        a, b = _extent(ds, i)   # ShardWriter writes cls, jpg, json, txt: the three are adjacent
        assert b - a - int(ds.length[i]) - sum(int(fc.length[i]) for fc in ds.field_columns.values()) \
            <= MEMBER_GAP
    with pytest.raises(KeyError, match="no field 'cls'"):
        ds.read_field("cls", 0)
    assert verify(indexed)["ok"]     # --verify checks each field's member header too


def test_verify_names_a_field_pointing_at_another_member(indexed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(indexed, out)
    col = out / "manifest" / "field.txt.offset.npy"
    txt, js = np.load(col), np.load(out / "manifest" / "field.json.offset.npy")
    txt[5] = js[5]
    np.save(col, txt)
    with pytest.raises(VerifyError, match=r"field \.txt of sample 5 .* points at member .*\.json"):
        verify(out)


def test_members_of_one_sample_share_a_request():
    f = np.zeros(3, np.int64)
    s, e = np.array([0, 2560, 100_000]), np.array([1000, 2600, 100_010])
    assert len(merge_ranges(f, s, e, 0)[2]) == 3                       # other samples: no merge
    assert len(merge_ranges(f, s, e, 0, owner=np.array([7, 7, 7]))[2]) == 2   # the far one stays apart
    assert len(merge_ranges(f, s, e, 0, owner=np.array([7, 8, 8]))[2]) == 3


@pytest.mark.parametrize("backend,device", [
    ("torch", "cpu"), ("dali", "cpu"),
    pytest.param("dali", "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI mixed decode)")])])
def test_loader_delivers_fields_of_planned_samples_only(indexed, ref, backend, device):
    ds = pipeline.open_dataset(indexed)
    opts = LoaderOptions.of(image_size=32, fields=KINDS, policy_kwargs={"mixup": 1.0})
    L = pipeline.Loader(ds, 32, keep=0.7, policy="swdpp", epochs=4, backend=backend, device=device,
                        augment="imagenet", mixup=True, num_workers=1, options=opts)
    bp, mixed, seen = L.batch_plan(0), 0, []
    for b in L.epoch(0):
        _check_batch(ds, ref, b, bp.fill[bp.row(b.step)], KINDS)
        mixed += 0 if b.mix is None else int(b.mix.mixed.sum())   # fields stay the primary's
        seen += b.ids[b.ids >= 0].tolist()
        assert b.images.device.type == device
    L.close()
    planned = bp.ids[bp.ids >= 0]
    assert sorted(seen) == sorted(planned.tolist()) and len(planned) == 84 and mixed > 0
    read = np.concatenate([planned, bp.fill[bp.fill >= 0]])  # real rows + padding rows' fill
    st = L.stats(0)
    sizes = np.asarray(ds.length, np.int64) + sum(np.asarray(fc.length, np.int64)
                                                  for fc in ds.field_columns.values())
    assert st.samples_read == len(read) and st.payload_read == int(sizes[read].sum())
    # one request per sample, as without fields: the members are adjacent
    assert st.requests == len(read)
    assert st.bytes_read == sum(b - a for a, b in (_extent(ds, int(i)) for i in read))


def test_resumed_epoch_delivers_the_same_fields(indexed):
    ds = pipeline.open_dataset(indexed)
    kw = dict(keep=0.7, policy="uniform", epochs=1, seed=5, backend="torch", device="cpu",
              augment="imagenet", num_workers=0,
              options=LoaderOptions.of(image_size=32, fields={"txt": "bytes"}))
    with pipeline.Loader(ds, 16, **kw) as L:
        whole = [(b.ids.tolist(), b.fields["txt"]) for b in L.epoch(0)]
    with pipeline.Loader(ds, 16, **kw) as L:
        for k, _ in zip(range(2), L.epoch(0)):
            pass
        sd = L.state_dict()
    with pipeline.Loader(ds, 16, **kw) as L:
        L.load_state_dict(sd)
        rest = [(b.ids.tolist(), b.fields["txt"]) for b in L.epoch(0)]
    assert rest == whole[2:] and len(rest) >= 2


def test_missing_far_and_undecodable_fields(cifar_jpegs, tmp_path):
    img = cifar_jpegs[0][1]
    pax_tar(tmp_path / "odd.tar", [
        ("s0.cls", b"1"), ("s0.jpg", img), ("s0.json", b'{"a": 1}'), ("s0.txt", b"zero"),
        ("s1.cls", b"2"), ("s1.jpg", img), ("s1.json", b"{}"),                    # no .txt
        ("s2.cls", b"3"), ("s2.jpg", img), ("s2.npy", bytes(2 * MEMBER_GAP)),     # far from jpg
        ("s2.json", b"[2]"), ("s2.txt", b"two"),
        ("s3.cls", b"4"), ("s3.jpg", img), ("s3.json", b"{not json"), ("s3.txt", b"three")])
    s = index(str(tmp_path / "odd.tar"), str(tmp_path / "out"), fields="txt,json")
    assert s["num_samples"] == 3 and len(s["skipped"]) == 1
    assert "odd.tar: sample 's1': no .txt member" in s["skipped"][0]
    with pytest.raises(IndexError_, match="odd.tar: sample 's1': no .txt member"):
        index(str(tmp_path / "odd.tar"), str(tmp_path / "strict"), fields="txt,json", strict=True)
    ds = pipeline.open_dataset(tmp_path / "out")
    opts = LoaderOptions.of(fields=KINDS, image_size=32)
    kw = dict(backend="torch", device="cpu", augment="imagenet")   # one output size
    with pipeline.Loader.for_eval(ds, 4, options=opts, **kw) as L:
        with pytest.warns(RuntimeWarning, match=r"corrupt sample 2 .*its \.json member is not json"):
            (b,) = list(L.epoch(0))
        st = L.stats(0)
    assert b.ids.tolist() == [0, 1, -1, -1] and st.samples_corrupt == 1
    assert b.fields == {"txt": ["zero", "two", "", ""], "json": [{"a": 1}, [2], None, None]}
    assert st.requests == 1 + 2 + 1        # s2's .json/.txt lie past the 32 KB .npy member
    raise_opts = LoaderOptions.of(fields=KINDS, image_size=32, on_corrupt="raise")
    with pipeline.Loader.for_eval(ds, 4, options=raise_opts, **kw) as L:
        with pytest.raises(pipeline.loader.CorruptSampleError, match="sample 2 .*json"):
            list(L.epoch(0))
    index(str(tmp_path / "odd.tar"), str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="field 'txt' is not recorded.*--fields txt,json"):
        pipeline.Loader.for_eval(pipeline.open_dataset(tmp_path / "plain"), 4, options=opts, **kw)
    with pytest.raises(ValueError, match="fields\\['txt'\\] must be one of"):
        LoaderOptions.of(fields={"txt": "text"})


def test_fields_over_http(shards, ref, tmp_path):
    """Indexed over HTTP from nginx; what nginx sent is exactly the planned samples' members
    and the framing between them, one request per run of neighbouring planned samples."""
    from _servers import start_nginx
    (tmp_path / "nginx").mkdir()
    server = start_nginx(shards, tmp_path / "nginx")
    try:
        names = sorted(p.name for p in shards.glob("*.tar"))
        index([f"{server.url}/{n}" for n in names], str(tmp_path / "out"), fields="txt,json")
        ds = pipeline.open_dataset(tmp_path / "out")
        L = pipeline.Loader(ds, 32, keep=0.7, policy="uniform", epochs=1, backend="torch",
                            device="cpu", augment="imagenet", num_workers=0,
                            options=LoaderOptions.of(image_size=32, fields={"txt": "bytes"}))
        time.sleep(0.2)
        since = os.path.getsize(server.log)
        bp = L.batch_plan(0)
        for b in L.epoch(0):
            _check_batch(ds, ref, b, bp.fill[bp.row(b.step)], {"txt": "bytes"})
        time.sleep(0.3)  # nginx logs after the response
        st = L.stats(0)
        L.close()
    finally:
        server.stop()
    served = []
    with open(server.log) as f:
        f.seek(since)
        for line in f:
            method, uri, status, sent, rng = line.split(" ", 4)
            if method != "GET":
                continue  # the size checks of shards opened during the epoch
            assert status == "206", line
            a, b = rng.strip().strip('"')[len("bytes="):].split("-")
            served.append((names.index(uri.lstrip("/")), int(a), int(b) + 1, int(sent)))
    read = set(np.concatenate([bp.ids[bp.ids >= 0], bp.fill[bp.fill >= 0]]).tolist())
    assert sum(s[3] for s in served) == st.bytes_read and len(served) == st.requests
    assert st.requests < len(read)                         # neighbours merged ("neighbors")
    ext = np.array([_extent(ds, i) for i in range(len(ds))])
    for fi, a, b, _ in served:   # nothing of an unplanned sample, whole planned samples
        inside = np.flatnonzero((ds.file == fi) & (ext[:, 1] > a) & (ext[:, 0] < b))
        assert set(inside.tolist()) <= read
        assert ((ext[inside, 0] >= a) & (ext[inside, 1] <= b)).all()


def test_trainer_one_epoch_on_indexed_shards_with_fields(indexed, tmp_path):
    """`trainers.classify`, unchanged, trains on shards indexed in place (webdataset's own
    ShardWriter, .cls/.jpg/.json/.txt, fields recorded): the fields are simply not read."""
    r = subprocess.run([sys.executable, "-m", "trainers.classify", "--data", str(indexed),
                        "--epochs", "1", "--batch-size", "32", "--width", "8", "--policy", "full",
                        "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["train_samples"] == 120 and np.isfinite(rec["train_loss"])
