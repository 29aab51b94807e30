"""The DALI backend hands its output buffers to torch without a copy (DLPack; the dynamic
executor keeps a buffer for as long as it is referenced): a batch the caller keeps must
never change, whatever the prefetch depth and reader processes."""
import pytest
import torch

import pipeline


@pytest.mark.parametrize("prefetch,workers", [(1, 0), (4, 0), (2, 1)])
def test_loader_batches_kept_by_the_caller_never_change(cifar_test_wds, prefetch, workers):
    ds = pipeline.open_dataset(cifar_test_wds)
    L = pipeline.Loader.for_eval(ds, 100, augment="cifar", backend="dali", device="cpu",
                                 num_workers=workers,
                                 options=pipeline.LoaderOptions.of(prefetch=prefetch))
    kept, copies = [], []
    for e in range(2):
        for b in L.epoch(e):
            kept.append(b)
            copies.append(b.images.clone())
    assert len(kept) == 20
    for b, c in zip(kept, copies):
        torch.testing.assert_close(b.images, c, rtol=0, atol=0)
    ptrs = {b.images.data_ptr() for b in kept}
    assert len(ptrs) == len(kept)            # every kept batch has memory of its own
    L.close()


@pytest.mark.parametrize("prefetch", [1, 4])
def test_source_buffers_are_not_reused_too_early(cifar_wds, prefetch):
    """Packed batches are read into a ring of buffers that DALI decodes from in place (main
    process, no_copy) or that a reader process copies into shared memory later, from a
    thread: a buffer reused too early changes images depending on timing.  The main
    process and one or two reader processes must give the same images, batch for batch."""
    ds = pipeline.open_dataset(cifar_wds)
    kw = dict(keep=0.7, policy="uniform", epochs=2, seed=4, backend="dali", device="cpu",
              augment="cifar", options=pipeline.LoaderOptions.of(prefetch=prefetch))
    with pipeline.Loader(ds, 64, num_workers=0, **kw) as A, \
            pipeline.Loader(ds, 64, num_workers=1, **kw) as B, \
            pipeline.Loader(ds, 64, num_workers=2, **kw) as C:
        for e in range(2):
            n = 0
            for a, b, c in zip(A.epoch(e), B.epoch(e), C.epoch(e), strict=True):
                assert torch.equal(a.ids, b.ids) and torch.equal(a.ids, c.ids)
                torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
                torch.testing.assert_close(a.images, c.images, rtol=0, atol=0)
                n += 1
            assert n == 22
