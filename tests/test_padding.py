"""Padding rows in training carry real planned samples (weight 0, id -1), never a fake image.

The last partial batch of an epoch and the per-rank padding of the plan go through the
model in training mode, so BatchNorm's running statistics see them: they must be real
images (issue 13, item 12).  Evaluation keeps the synthetic filler (the model is in eval
mode there).  Real data: the raw-pixel CIFAR-10 Zarr fixture, both backends.
"""
import numpy as np
import pytest
import torch

import pipeline
from pipeline.batch import LastBatch, cut_batches, fill_ids
from pipeline.decode.augment import CIFAR_MEAN, CIFAR_STD
from pipeline.options import LoaderOptions

# 2000 samples, uniform keep 0.7: K = 1400; batch 256 -> 5 full batches + 120 real rows and
# 136 padding rows in the last one
KW = dict(keep=0.7, policy="uniform", epochs=2, seed=3, device="cpu", augment=None, num_workers=0)


def test_fill_ids_cycle_through_the_pool_in_order():
    ids = np.array([[5, 6, 7], [8, -1, -1], [-1, -1, -1]])
    fill = fill_ids(ids, np.array([5, 6, 7, 8]))
    np.testing.assert_array_equal(fill, [[-1, -1, -1], [-1, 5, 6], [7, 8, 5]])
    assert (fill_ids(ids, None) == -1).all() and (fill_ids(ids, np.zeros(0, np.int64)) == -1).all()
    bp = cut_batches(np.array([3, 1, 4, 1, 5]), np.ones(5), np.zeros(5), 4, LastBatch.PAD,
                     fill_from=np.array([3, 1, 4]))
    assert bp.steps == 2 and bp.ids[1].tolist() == [5, -1, -1, -1]
    assert bp.fill[1].tolist() == [-1, 3, 1, 4] and bp.weights[1].tolist() == [1, 0, 0, 0]
    assert bp.rows(1).shape == (1, 2, 4) and bp.rows(1)[0, 1].tolist() == [-1, 3, 1, 4]


def _epoch(loader, e=0):
    return [(b.ids.clone(), b.images.clone(), b.weights.clone(), b.labels.clone()) for b in loader.epoch(e)]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_training_padding_rows_are_real_planned_samples(cifar_zarr, backend):
    """Every padding row's pixels are those of the planned sample the plan put there (the
    same sample delivered as a real row of the epoch: augment=None is deterministic), and
    the stored raw pixels; ids -1, weights 0, labels 0; the reads are counted."""
    ds = pipeline.open_dataset(cifar_zarr)
    with pipeline.Loader(ds, 256, backend=backend, **KW) as L:
        batches = _epoch(L)
        bp = L.batch_plan(0)
        assert len(batches) == bp.steps == L.steps_per_epoch(0) == 6
        real_img = {}
        for ids, images, _, _ in batches:
            for j in np.flatnonzero(ids.numpy() >= 0):
                real_img[int(ids[j])] = images[j]
        n_pad = 0
        for s, (ids, images, w, labels) in enumerate(batches):
            pad = np.flatnonzero(ids.numpy() < 0)
            n_pad += len(pad)
            assert (w[pad] == 0).all() and (labels[pad] == 0).all()
            for j in pad:
                src = int(bp.fill[s, j])
                assert src in real_img, "a padding row carries a sample planned in this epoch"
                torch.testing.assert_close(images[j], real_img[src], rtol=0, atol=1e-5)
                raw = np.frombuffer(ds.read(src), np.uint8).reshape(32, 32, 3)
                assert images[j].std() > 0 and np.asarray(raw).std() > 0, "not the (constant) filler"
        assert n_pad == 6 * 256 - 1400 == 136
        st = L.stats(0)
        assert st.samples_padding == 136 and st.samples_delivered == 1400
        assert st.samples_read == 1400 + 136, "the fill samples' reads are counted"


def test_rank_padding_of_the_plan_is_filled_too(cifar_zarr):
    """world_size 3: K = 1400 -> 467 per rank, the last rank's row ends with one padding
    entry of the plan; steps are the same on every rank and every padding row is real."""
    ds = pipeline.open_dataset(cifar_zarr)
    steps = []
    for r in range(3):
        with pipeline.Loader(ds, 100, backend="torch", options=LoaderOptions.of(world_size=3, rank=r),
                             **KW) as L:
            batches = _epoch(L)
            bp = L.batch_plan(0)
            steps.append(len(batches))
            pad = bp.ids < 0
            assert (bp.fill[pad] >= 0).all() and (bp.fill[~pad] == -1).all()
            assert set(bp.fill[pad].tolist()) <= set(bp.ids[~pad].tolist()), "from this rank's own plan"
            for ids, images, _, _ in batches:
                p = ids < 0
                if p.any():
                    assert (images[p].flatten(1).std(1) > 0).all()
    assert steps == [5, 5, 5]


def test_evaluation_keeps_the_filler(cifar_zarr):
    ds = pipeline.open_dataset(cifar_zarr)
    with pipeline.Loader.for_eval(ds, 300, backend="torch", device="cpu", num_workers=0) as L:
        *_, (ids, images, w, _) = _epoch(L)
        pad = ids < 0
        assert int(pad.sum()) == 7 * 300 - 2000 and (L.batch_plan(0).fill == -1).all()
        assert (images[pad].flatten(1).std(1) == 0).all(), "the filler: one constant image"
        assert L.stats(0).samples_read == 2000


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_batchnorm_running_stats_see_only_real_images(cifar_zarr, backend):
    """Train-mode forward of a BatchNorm over an epoch's batches: its running mean and
    variance are those of real images only (the fill rows are real images).  With the old
    synthetic filler in the 136 padding rows they would be far off (checked, so that the
    test can fail)."""
    ds = pipeline.open_dataset(cifar_zarr)
    bn = torch.nn.BatchNorm2d(3, momentum=None)  # cumulative average over the batches
    bn.train()
    with pipeline.Loader(ds, 256, backend=backend, **dict(KW, augment="cifar")) as L:
        batches = _epoch(L)
    for _, images, _, _ in batches:
        bn(images)
    real = torch.cat([im[ids >= 0] for ids, im, _, _ in batches])
    mean, var = real.mean((0, 2, 3)), real.var((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0.02)
    torch.testing.assert_close(bn.running_var, var, rtol=0.05, atol=0.0)
    # the counterfactual: the last batch's padding rows as the (constant) filler image
    ids, images, _, _ = batches[-1]
    fake = images.clone()
    mean0, std0 = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR_MEAN, CIFAR_STD))
    fake[ids < 0] = (0 - mean0) / std0  # the filler's zero pixels, normalised
    bad = torch.nn.BatchNorm2d(3, momentum=None).train()
    for _, im, _, _ in batches[:-1]:
        bad(im)
    bad(fake)
    assert (bad.running_mean - mean).abs().min() > 0.1
