"""Pooled output buffers (pipeline/decode/buffers.py): reused only when nobody holds them."""
import torch

import pipeline
from pipeline.decode.buffers import TensorPool


def test_pool_reuses_only_free_buffers():
    p = TensorPool(3)
    a = p.take((4, 4), torch.float32)
    a_ptr = a.data_ptr()
    del a
    b = p.take((4, 4), torch.float32)
    assert b.data_ptr() == a_ptr and p.allocated == 1     # free again: reused
    view = b[1:2]
    del b
    c = p.take((4, 4), torch.float32)
    assert c.data_ptr() != a_ptr and p.allocated == 2     # a view still holds its memory
    kept = [c]
    del c
    d = p.take((4, 4), torch.float32)
    assert d.data_ptr() not in (a_ptr, kept[0].data_ptr()) and p.allocated == 3
    assert view.shape == (1, 4)


def test_loader_batches_kept_by_the_caller_never_change(cifar_test_wds):
    ds = pipeline.open_dataset(cifar_test_wds)
    L = pipeline.Loader.for_eval(ds, 100, augment="cifar", backend="dali", device="cpu", num_workers=0)
    kept, copies = [], []
    for b in L.epoch(0):
        kept.append(b)
        copies.append(b.images.clone())
    for b, c in zip(kept, copies):
        torch.testing.assert_close(b.images, c, rtol=0, atol=0)
    del kept, b
    n = L._backend._pool.allocated
    for b in L.epoch(0):  # the caller drops each batch: a couple of buffers serve the epoch
        pass
    assert L._backend._pool.allocated - n <= 3
    L.close()
