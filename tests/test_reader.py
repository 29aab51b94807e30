"""RangeReader: merging, exact byte accounting, size checks naming the shard."""
import os
import shutil

import numpy as np
import pytest

import pipeline
from pipeline.read.ranges import merge_ranges
from pipeline.read.reader import RangeReader, ShardError


def test_merge_ranges_gap_and_neighbors():
    f = np.array([0, 0, 0, 1, 0])
    s = np.array([0, 100, 300, 0, 1000])
    e = s + 50
    order, group, gf, gs, ge = merge_ranges(f, s, e, gap=0)
    assert len(gf) == 5
    order, group, gf, gs, ge = merge_ranges(f, s, e, gap=50)
    assert list(zip(gf, gs, ge)) == [(0, 0, 150), (0, 300, 350), (0, 1000, 1050), (1, 0, 50)]
    rank = np.array([0, 1, 3, 10, 4])  # sample at 300 and 1000 are file-order neighbours
    order, group, gf, gs, ge = merge_ranges(f, s, e, gap="neighbors", rank=rank)
    assert list(zip(gf, gs, ge)) == [(0, 0, 150), (0, 300, 1050), (1, 0, 50)]


def test_reads_exact_payload_and_counts(cifar_wds):
    ds = pipeline.open_dataset(cifar_wds)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(len(ds), 700, replace=False))
    r = RangeReader(ds.files, ds.file_sizes)
    bufs = r.read(ds.file[ids], ds.offset[ids], ds.length[ids])
    for i, b in zip(ids[:50], bufs[:50]):
        assert bytes(b) == ds.read(int(i))
    c = r.counters
    assert c.samples == 700 and c.requests == 700
    assert c.bytes == c.payload == int(ds.length[ids].sum())
    # neighbours merge: slack is only tar framing, never another sample's payload
    rank = ds.file_rank
    rn = RangeReader(ds.files, ds.file_sizes, merge_gap="neighbors", rank=rank)
    bufs2 = rn.read(ds.file[ids], ds.offset[ids], ds.length[ids], ids)
    assert [bytes(b) for b in bufs2] == [bytes(b) for b in bufs]
    assert rn.counters.requests < 700
    order = np.argsort(rank)
    between = np.zeros(len(ds), bool)  # samples lying inside any merged request
    o, g, gf, gs, ge = merge_ranges(ds.file[ids], ds.offset[ids], ds.offset[ids] + ds.length[ids],
                                    "neighbors", rank[ids])
    for fi, a, b in zip(gf, gs, ge):
        inside = (ds.file == fi) & (ds.offset >= a) & (ds.offset < b)
        between |= inside
    assert set(np.flatnonzero(between)) == set(ids.tolist())


def test_truncated_and_missing_shard_named(cifar_wds, tmp_path):
    ds = pipeline.open_dataset(cifar_wds)
    files = []
    for f in ds.files:
        dst = tmp_path / os.path.basename(f)
        shutil.copy(f, dst)
        files.append(str(dst))
    with open(files[1], "r+b") as fh:
        fh.truncate(ds.file_sizes[1] - 1000)
    os.remove(files[2])
    r = RangeReader(files, ds.file_sizes)
    ids = np.flatnonzero(ds.file == 1)[:3]
    with pytest.raises(ShardError, match=os.path.basename(files[1])):
        r.read(ds.file[ids], ds.offset[ids], ds.length[ids])
    ids = np.flatnonzero(ds.file == 2)[:3]
    with pytest.raises(ShardError, match=os.path.basename(files[2])):
        r.read(ds.file[ids], ds.offset[ids], ds.length[ids])


def test_direct_io_reads_whole_blocks_only(cifar_wds):
    ds = pipeline.open_dataset(cifar_wds)
    ids = np.arange(0, len(ds), 3)
    try:
        r = RangeReader(ds.files, ds.file_sizes, direct_io=True)
        bufs = r.read(ds.file[ids], ds.offset[ids], ds.length[ids])
    except OSError as e:  # some file systems (tmpfs) refuse O_DIRECT
        pytest.skip(f"O_DIRECT unsupported here: {e}")
    assert [bytes(b) for b in bufs[:40]] == [ds.read(int(i)) for i in ids[:40]]
    c = r.counters
    assert c.payload == int(ds.length[ids].sum()) and c.bytes >= c.payload
    assert c.bytes % 512 == 0 and c.bytes < int(ds.length[ids].sum()) + 2 * 4096 * len(ids)
