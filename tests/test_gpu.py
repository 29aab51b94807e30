"""GPU path: DALI "mixed" decode + GPU augmentation, batches and mixup on the GPU.

Marked ``gpu``: skipped where torch.cuda is unavailable (the development machine has no GPU).
"""
import numpy as np
import pytest
import torch

import pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_gpu_dali_matches_cpu_ids(fmt, request):
    ds = pipeline.open_dataset(request.getfixturevalue(f"cifar_{fmt}"))
    kw = dict(batch_size=128, keep=0.7, policy="swdpp", epochs=3, seed=0, augment="cifar",
              mixup=True, num_workers=2)
    gpu = pipeline.Loader(ds, backend="dali", device="cuda", **kw)
    cpu = pipeline.Loader(ds, backend="torch", device="cpu", **kw)
    for e in range(2):
        gi, ci = [], []
        for g in gpu.epoch(e):
            assert g.images.is_cuda and g.ids.is_cuda and g.images.shape[1:] == (3, 32, 32)
            logits = torch.zeros(len(g), 10, device="cuda")
            gpu.update(g.ids, g.loss(logits))
            gi.append(g.ids.cpu())
        for c in cpu.epoch(e):
            cpu.update(c.ids, c.loss(torch.zeros(len(c), 10)))
            ci.append(c.ids)
        np.testing.assert_array_equal(torch.cat(gi).numpy(), torch.cat(ci).numpy())


def test_gpu_imagenet_preset(cifar_wds):
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, batch_size=64, keep=1.0, policy="full", backend="dali",
                        device="cuda", augment="imagenet", num_workers=1,
                        options=pipeline.LoaderOptions.of(image_size=64))
    b = next(iter(L.epoch(0)))
    assert b.images.is_cuda and b.images.shape == (64, 3, 64, 64)
