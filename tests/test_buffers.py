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
