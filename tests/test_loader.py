"""Loader end to end on small real CIFAR-10 / Fashion-MNIST shards (CPU; DALI CPU-only pipeline).

Checks: every planned sample arrives exactly once per epoch with its label, for both
backends and both formats; the two backends give the same ids (and, for lossless
formats, the same augmented pixels); a pruned sample's bytes are never read; padding,
drop_last, evaluation, corrupt samples, broken shards.
"""
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import pipeline
from pipeline.loader import CorruptSampleError
from pipeline.options import LoaderOptions


def _losses(ids: torch.Tensor) -> torch.Tensor:
    """Deterministic fake per-sample losses so scores (and plans) evolve identically."""
    return ((ids.float() * 0.6180339).remainder(1.0) * 3).clamp_min(0.01)


def run_epochs(loader, epochs, images=False):
    """[(ids, labels[, images]) per epoch], with score updates like a training loop."""
    out = []
    for e in range(epochs):
        ids, labels, ims, steps = [], [], [], 0
        for b in loader.epoch(e):
            steps += 1
            assert b.images.dtype == torch.float32 and b.images.shape[0] == loader.batch_size
            ids.append(b.ids.clone()); labels.append(b.labels.clone())
            if images:
                ims.append(b.images.clone())
            loader.update(b.ids, _losses(b.ids))
        assert steps == loader.steps_per_epoch(e)
        rec = (torch.cat(ids).numpy(), torch.cat(labels).numpy())
        out.append(rec + ((torch.cat(ims),) if images else ()))
    return out


def planned(loader, e):
    return loader.batch_plan(e).ids.reshape(-1)


def check_exactly_once(ds, loader, runs):
    for e, (ids, labels, *_) in enumerate(runs):
        real = ids >= 0
        plan = planned(loader, e) if loader._plan and loader._plan[0] == e else None
        assert len(np.unique(ids[real])) == real.sum(), "a sample was duplicated"
        np.testing.assert_array_equal(labels[real], np.asarray(ds.labels)[ids[real]])
        st = loader.stats(e)
        assert st.samples_delivered == real.sum() == st.samples_planned
        if plan is not None:
            assert set(ids[real].tolist()) == set(plan[plan >= 0].tolist())


KW = dict(batch_size=128, keep=0.7, policy="swdpp", epochs=4, seed=0, device="cpu",
          augment="cifar", mixup=False)


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_backends_same_ids_exactly_once(fmt, request):
    ds = pipeline.open_dataset(request.getfixturevalue(f"cifar_{fmt}"))
    a = pipeline.Loader(ds, backend="dali", num_workers=2, **KW)
    ra = run_epochs(a, 2, images=(fmt == "zarr"))
    check_exactly_once(ds, a, ra)
    b = pipeline.Loader(ds, backend="torch", num_workers=1, **KW)
    rb = run_epochs(b, 2, images=(fmt == "zarr"))
    check_exactly_once(ds, b, rb)
    # swdpp reads exactly K = round(0.7 N) in every epoch, epoch 0 included
    assert (ra[0][0] >= 0).sum() == (ra[1][0] >= 0).sum() == round(0.7 * len(ds))
    for x, y in zip(ra, rb):
        np.testing.assert_array_equal(x[0], y[0])      # same ids, same order
    if fmt == "zarr":  # raw pixels, same crop/flip parameters: identical images
        torch.testing.assert_close(ra[1][2], rb[1][2])
    a.close(); b.close()


@pytest.mark.parametrize("backend,workers", [("dali", 1), ("torch", 0), ("torch", 2)])
def test_worker_counts(cifar_wds, backend, workers):
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, backend=backend, num_workers=workers, **KW)
    check_exactly_once(ds, L, run_epochs(L, 2))


def test_grayscale_png_backends_agree(fmnist_wds):
    ds = pipeline.open_dataset(fmnist_wds)
    assert ds.channels == 1
    kw = dict(KW, batch_size=256, mixup=True)
    ra = run_epochs(pipeline.Loader(ds, backend="dali", num_workers=2, **kw), 2, images=True)
    rb = run_epochs(pipeline.Loader(ds, backend="torch", num_workers=1, **kw), 2, images=True)
    assert ra[0][2].shape[1:] == (1, 28, 28)
    for x, y in zip(ra, rb):
        np.testing.assert_array_equal(x[0], y[0])
        torch.testing.assert_close(x[2], y[2])  # PNG is lossless: same pixels, same mixup


def _recording_pread(monkeypatch):
    """Record every os.pread / os.preadv as (path, offset, bytes read)."""
    calls = []
    real, real_v = os.pread, os.preadv

    def pread(fd, n, off):
        out = real(fd, n, off)
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), off, len(out)))
        return out

    def preadv(fd, buffers, off, *flags):
        n = real_v(fd, buffers, off, *flags)
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))
        return n
    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    return calls


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_pruned_sample_never_read(cifar_wds, monkeypatch, backend):
    """keep 0.7: the ranges read are exactly the planned samples' payload ranges (the DALI
    backend reads packed batches in place with preadv, the torch backend with pread)."""
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, batch_size=100, keep=0.7, policy="uniform", epochs=2, seed=1,
                        backend=backend, num_workers=0, device="cpu", augment="cifar")
    calls = _recording_pread(monkeypatch)  # in-process reads (num_workers=0)
    list(L.epoch(0))
    plan = planned(L, 0)
    ids = plan[plan >= 0]
    assert len(ids) == 1400
    want = {(os.path.realpath(ds.files[int(ds.file[i])]), int(ds.offset[i]), int(ds.length[i]))
            for i in ids}
    shard_reads = [c for c in calls if c[0].endswith(".tar")]
    assert len(shard_reads) == len(want) and set(shard_reads) == want
    st = L.stats(0)
    assert st.bytes_read == st.payload_read == int(np.asarray(ds.length)[ids].sum())
    assert st.samples_read == 1400 and st.requests == 1400
    assert 0.68 < st.bytes_fraction < 0.72


def test_dali_reads_only_planned_bytes(cifar_wds):
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, batch_size=100, keep=0.7, policy="uniform", epochs=2, seed=1,
                        backend="dali", num_workers=2, device="cpu", augment="cifar")
    got = np.concatenate([b.ids.numpy() for b in L.epoch(0)])
    plan = planned(L, 0)
    ids = plan[plan >= 0]
    assert sorted(got[got >= 0]) == sorted(ids)
    st = L.stats(0)  # counted by the reader inside the DALI worker processes
    assert st.bytes_read == st.payload_read == int(np.asarray(ds.length)[ids].sum())
    assert st.samples_read == 1400


def test_eval_every_sample_once_padded(cifar_test_wds):
    ds = pipeline.open_dataset(cifar_test_wds)
    seen = []
    for r in range(2):
        L = pipeline.Loader.for_eval(ds, 128, backend="dali", device="cpu", num_workers=1,
                                     augment="cifar", options=LoaderOptions.of(world_size=2, rank=r))
        batches = list(L.epoch(0))
        assert len(batches) == L.steps_per_epoch(0) == 4  # 500 per rank -> 3 full + 1 partial
        last = batches[-1]
        assert (last.ids >= 0).sum() == 500 - 3 * 128 and (last.weights[last.ids < 0] == 0).all()
        for b in batches:
            seen.append(b.ids[b.ids >= 0].numpy())
            np.testing.assert_array_equal(b.labels[b.ids >= 0].numpy(),
                                          np.asarray(ds.labels)[b.ids[b.ids >= 0].numpy()])
    seen = np.concatenate(seen)
    assert sorted(seen.tolist()) == list(range(len(ds)))


def test_drop_last(cifar_wds):
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, batch_size=300, keep=1.0, policy="full", backend="torch",
                        num_workers=0, device="cpu", augment=None,
                        options=LoaderOptions.of(last_batch="drop"))
    batches = list(L.epoch(0))
    assert len(batches) == 2000 // 300 == L.steps_per_epoch(0)
    assert all((b.ids >= 0).all() for b in batches)
    # a batch larger than an epoch's share would silently train on nothing: refused, naming
    # the first such epoch (here the pruned ones: uniform at keep 0.1 plans 200 samples)
    for kw, msg in ((dict(batch_size=2001, keep=1.0, policy="full"), "epoch 0 empty: it plans 2000 of 2000"),
                    (dict(batch_size=101, keep=0.1, policy="uniform",
                          options=LoaderOptions.of(last_batch="drop", world_size=2, rank=1)),
                     "epoch 0 empty: it plans 200 of 2000 samples, 100 per rank")):
        kw.setdefault("options", LoaderOptions.of(last_batch="drop"))
        with pytest.raises(ValueError, match=msg):
            pipeline.Loader(ds, backend="torch", num_workers=0, device="cpu", augment=None, **kw)


def test_misuse_is_refused_naming_the_value(cifar_wds):
    ds = pipeline.open_dataset(cifar_wds)
    kw = dict(batch_size=64, keep=0.7, policy="uniform", backend="torch", num_workers=0,
              device="cpu", augment=None)
    with pytest.raises(ValueError, match="rank 3 out of range for world_size 1"):
        pipeline.Loader(ds, options=LoaderOptions.of(rank=3), **kw)   # world size from the env: 1
    L = pipeline.Loader(ds, **kw)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=f"epoch must be an integer >= 0, got {bad}"):
            next(iter(L.epoch(bad)))
    L.close()


def _corrupt_copy(src, tmp_path, sample):
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    ds = pipeline.open_dataset(dst)
    with open(ds.files[int(ds.file[sample])], "r+b") as f:
        f.seek(int(ds.offset[sample]))
        f.write(b"\xff" * int(ds.length[sample]))
    return ds


@pytest.mark.parametrize("backend,verify_crc", [("dali", True), ("dali", False), ("torch", False)])
def test_corrupt_sample_skipped(cifar_wds, tmp_path, backend, verify_crc):
    bad = 777
    ds = _corrupt_copy(cifar_wds, tmp_path, bad)
    L = pipeline.Loader(ds, batch_size=128, keep=1.0, policy="full", backend=backend,
                        num_workers=1, device="cpu", augment="cifar",
                        options=LoaderOptions.of(verify_crc=verify_crc))
    with pytest.warns(RuntimeWarning, match=f"corrupt sample {bad}|undecodable samples \\[{bad}\\]"):
        ids = np.concatenate([b.ids.numpy() for b in L.epoch(0)])
    assert sorted(ids[ids >= 0].tolist()) == sorted(set(range(2000)) - {bad})
    assert L.stats(0).samples_corrupt == 1 and L.stats(0).corrupt_ids == [bad]
    with warnings.catch_warnings():  # next epoch: known bad, skipped without reading
        warnings.simplefilter("error")
        ids = np.concatenate([b.ids.numpy() for b in L.epoch(1)])
    # what is read: the 1999 good samples, and the padding rows' fill samples (real planned
    # samples at weight 0, docs/reliability.md), the known-bad one excepted
    fill = L.batch_plan(1).fill
    assert len(ids[ids >= 0]) == 1999
    assert L.stats(1).samples_read == 1999 + int(((fill >= 0) & (fill != bad)).sum())


def test_corrupt_sample_raises(cifar_wds, tmp_path):
    ds = _corrupt_copy(cifar_wds, tmp_path, 5)
    L = pipeline.Loader(ds, batch_size=128, keep=1.0, policy="full", backend="dali",
                        num_workers=1, device="cpu",
                        options=LoaderOptions.of(on_corrupt="raise"))
    with pytest.raises(CorruptSampleError, match="corrupt sample 5"):
        list(L.epoch(0))


def test_truncated_shard_named(cifar_wds, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(cifar_wds, dst)
    ds = pipeline.open_dataset(dst)
    with open(ds.files[2], "r+b") as f:
        f.truncate(os.path.getsize(ds.files[2]) // 2)
    with pytest.raises(Exception, match=os.path.basename(ds.files[2])):
        pipeline.Loader(ds, batch_size=64, backend="torch", device="cpu")
    # unchecked at creation: the reader names it when it opens the shard
    L = pipeline.Loader(ds, batch_size=64, keep=1.0, policy="full", backend="torch",
                        num_workers=0, device="cpu",
                        options=LoaderOptions.of(verify_files=None))
    with pytest.raises(Exception, match=os.path.basename(ds.files[2])):
        list(L.epoch(0))


def test_break_mid_epoch_then_next_epoch(cifar_wds):
    """Leaving a DALI epoch early must not leak its batches into the next epoch."""
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, backend="dali", num_workers=2, **KW)
    for i, b in enumerate(L.epoch(0)):
        if i == 2:
            break
    ids, _ = run_epochs(L, 2)[1]
    plan = planned(L, 1)
    assert sorted(ids[ids >= 0]) == sorted(plan[plan >= 0])


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_an_epoch_left_open_is_ended_by_the_next(cifar_test_wds, backend):
    """A peek (`next(L.epoch(0))`) kept in a variable, then the epoch iterated: DALI delivered
    the peeked epoch's batches into the new one (ids not planned: RuntimeError), and the
    old iterator, collected during a later epoch, stopped that epoch's backend (torch:
    FileNotFoundError).  Starting an epoch now ends the one left open."""
    ds = pipeline.open_dataset(cifar_test_wds)
    L = pipeline.Loader(ds, 500, keep=0.5, policy="swdpp", epochs=3, backend=backend, device="cpu",
                        num_workers=0, augment=None)
    try:
        peek = L.epoch(0)
        next(peek)
        ids = np.concatenate([b.ids.numpy() for b in L.epoch(0)])
        plan = planned(L, 0)
        assert sorted(ids[ids >= 0]) == sorted(plan[plan >= 0])
        assert list(peek) == []                     # ended, as a break would have
        old = L.epoch(1)
        next(old)
        n = 0
        for i, b in enumerate(L.epoch(1)):
            if i == 2:
                del old                             # collected mid-epoch: no effect now
            n += int((b.ids >= 0).sum())
        assert n == int((planned(L, 1) >= 0).sum())
        with pytest.raises(KeyError, match=r"no stats for epoch 7: epochs started so far \[0, 1\]"):
            L.stats(7)
    finally:
        L.close()
    with pytest.raises(RuntimeError, match="is closed"):
        L.epoch(2)


def test_update_with_unplanned_ids_warns_once(cifar_test_wds):
    """`update(batch.labels, losses)` (labels for ids) was accepted: the scores of samples
    0-9 took every loss.  Ids the epoch did not plan now warn, once; batch.ids do not."""
    ds = pipeline.open_dataset(cifar_test_wds)
    with pipeline.Loader(ds, 500, keep=0.5, policy="swdpp", epochs=3, backend="torch", device="cpu",
                         num_workers=0, augment=None) as L:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for b in L.epoch(0):
                L.update(b.ids, _losses(b.ids))
        with pytest.warns(RuntimeWarning, match=r"ids \(e\.g\. .*\) are not in epoch 1's plan: pass "
                                                r"batch\.ids \(not the labels\)") as caught:
            for b in L.epoch(1):
                L.update(b.labels, _losses(b.ids))
        assert len([w for w in caught if "not in epoch" in str(w.message)]) == 1


def test_dali_spawned_workers(cifar_test_wds):
    """The path taken when CUDA is already initialised: workers spawned, source pickled."""
    ds = pipeline.open_dataset(cifar_test_wds)
    L = pipeline.Loader.for_eval(ds, 250, backend="dali", device="cpu", num_workers=1,
                                 options=LoaderOptions.of(py_start_method="spawn"))
    ids = np.concatenate([b.ids.numpy() for b in L.epoch(0)])
    assert sorted(ids.tolist()) == list(range(len(ds)))
    L.close()


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("train", [True, False])
def test_imagenet_preset_cpu(cifar_test_wds, backend, train):
    ds = pipeline.open_dataset(cifar_test_wds)
    kw = dict(backend=backend, device="cpu", num_workers=1, augment="imagenet",
              options=LoaderOptions.of(image_size=24))
    L = (pipeline.Loader(ds, 200, keep=1.0, policy="full", **kw) if train
         else pipeline.Loader.for_eval(ds, 200, **kw))
    b = next(iter(L.epoch(0)))
    assert b.images.shape == (200, 3, 24, 24) and torch.isfinite(b.images).all()
    L.close()


def test_ranks_disjoint_and_complete(cifar_wds):
    """world_size=2 without torch.distributed: each rank plans the same epoch and takes its slice."""
    ds = pipeline.open_dataset(cifar_wds)
    got = []
    for r in range(2):
        with pipeline.Loader(ds, batch_size=100, keep=0.7, policy="uniform", epochs=2, seed=4,
                             backend="torch", num_workers=0, device="cpu", augment=None,
                             options=LoaderOptions.of(world_size=2, rank=r)) as L:
            ids = np.concatenate([b.ids.numpy() for b in L.epoch(0)])
            assert len(ids) == L.steps_per_epoch(0) * 100
            got.append(ids[ids >= 0])
    assert not set(got[0]) & set(got[1])
    assert len(got[0]) + len(got[1]) == 1400


def test_packed_rows_reused_hold_each_payload_then_zeros(cifar_wds, tmp_path):
    """Packed batches share one buffer per process: every row is its sample's bytes and
    then zeros, also where a longer payload of an earlier batch sat in that row, and a
    padding row (filler) too."""
    from pipeline.read.table import EpochTable, TableHeader
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, batch_size=32, keep=1.0, policy="full", epochs=1, backend="dali",
                        num_workers=0, device="cpu")
    src = L._backend.config.source
    width = src.packed_len()
    assert width
    by_len = np.argsort(-np.asarray(ds.length))            # longest payloads first
    ids = np.stack([by_len[:32], by_len[-32:], by_len[100:132]])
    ids[2, 5] = -1                                          # a padding row with the filler
    fill = np.full_like(ids, -1)
    table = EpochTable.publish(str(tmp_path / "t.npy"), np.stack([ids, fill], axis=1),
                               TableHeader(epoch=0, first_step=0, rank=0, seed=0))
    bufs = []
    for i in range(3):
        sb = src.batch(table, i, width)
        assert sb.payload.shape == (32, width)
        for j, sample in enumerate(ids[i].tolist()):
            want = bytes(src.filler) if sample < 0 else src.read_samples(np.array([sample]))[0][0]
            row = sb.payload[j]
            assert bytes(row[:len(want)]) == want and not row[len(want):].any(), (i, j)
            assert sb.meta["length"][j] == len(want)
        bufs.append(sb.payload.__array_interface__["data"][0])
    assert len(set(bufs)) == 1                              # one buffer, reused
    L.close()


def test_default_parallelism_follows_the_rank_share_of_cores(monkeypatch):
    from pipeline.options import default_parallelism
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_parallelism("cuda", "dali", True) == (4, 8)
    assert default_parallelism("cpu", "dali", True) == (0, 4)
    assert default_parallelism("cpu", "dali", False) == (2, 4)     # remote shards: readers
    assert default_parallelism("cpu", "torch", True) == (2, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                      # 8 ranks share 16 cores
    assert default_parallelism("cuda", "dali", True) == (2, 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_parallelism("cuda", "dali", True) == (2, 1)
    assert default_parallelism("cpu", "dali", True) == (0, 2)
