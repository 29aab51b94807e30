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


@pytest.fixture(scope="module")
def photos_wds(cifar_jpegs, tmp_path_factory):
    """64 real CIFAR-10 images upscaled to variable sizes (shorter side 48-160, aspect
    3/4-4/3, JPEG q90), as WebDataset shards: the imagenet preset's crops and ROI decode
    on images of different sizes."""
    import io

    from PIL import Image

    from pipeline.formats import convert
    root = tmp_path_factory.mktemp("photos") / "train"
    g = np.random.default_rng(0)
    for k, (cls, data) in enumerate(cifar_jpegs[::2][:64]):
        s, r = int(g.integers(48, 161)), float(np.exp(g.uniform(np.log(3 / 4), np.log(4 / 3))))
        w, h = (round(s * r), s) if r >= 1 else (s, round(s / r))
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.BICUBIC).save(
            root / cls / f"{k:03d}.jpg", "JPEG", quality=90)
    out = root.parent / "wds"
    convert(root, out, format="wds", samples_per_shard=20, seed=0, progress=False)
    return out


def _imagenet_loader(ds, device, **kw):
    return pipeline.Loader(ds, batch_size=16, keep=0.75, policy="uniform", epochs=2, seed=3,
                           backend="dali", device=device, augment="imagenet", num_workers=0,
                           options=pipeline.LoaderOptions.of(image_size=48), **kw)


def test_gpu_decode_matches_cpu_pixels_on_variable_sizes(photos_wds):
    """Mixed (nvJPEG) ROI decode + GPU resize gives the CPU graph's samples, crops and
    flips: the same ids, and pixels that differ only by the decoders' rounding."""
    ds = pipeline.open_dataset(photos_wds)
    with _imagenet_loader(ds, "cuda") as G, _imagenet_loader(ds, "cpu") as C:
        for e in range(2):
            for g, c in zip(G.epoch(e), C.epoch(e), strict=True):
                assert g.images.is_cuda and g.images.shape == (16, 3, 48, 48)
                np.testing.assert_array_equal(g.ids.cpu().numpy(), c.ids.numpy())
                diff = (g.images.cpu() - c.images).abs()
                real = c.ids >= 0
                # a wrong crop window or flip moves whole edges: mean errors of 0.3-1.0
                assert float(diff[real].mean()) < 0.08, f"epoch {e} step {g.step}: mean |gpu-cpu| {float(diff[real].mean()):.4f}"


def test_gpu_resume_replays_the_same_crops(photos_wds):
    ds = pipeline.open_dataset(photos_wds)
    with _imagenet_loader(ds, "cuda") as L:
        whole = [(b.ids.cpu(), b.images.clone()) for b in L.epoch(0)]
    with _imagenet_loader(ds, "cuda") as L:
        for _, _ in zip(range(2), L.epoch(0)):
            pass
        sd = L.state_dict()
    with _imagenet_loader(ds, "cuda") as L:
        L.load_state_dict(sd)
        rest = [(b.ids.cpu(), b.images.clone()) for b in L.epoch(0)]
    assert len(rest) == len(whole) - 2
    for (wi, wx), (ri, rx) in zip(whole[2:], rest):
        assert torch.equal(wi, ri)
        assert float((wx - rx).abs().max()) < 1e-4


def test_gpu_batches_kept_by_the_caller_never_change(cifar_test_wds):
    """DALI's GPU output buffers go to torch through DLPack, without a copy: kept batches
    stay as they were delivered while the pipeline runs on."""
    ds = pipeline.open_dataset(cifar_test_wds)
    L = pipeline.Loader.for_eval(ds, 100, augment="cifar", backend="dali", device="cuda",
                                 num_workers=1)
    kept, copies = [], []
    for e in range(2):
        for b in L.epoch(e):
            assert b.images.is_cuda
            kept.append(b)
            copies.append(b.images.clone())
    torch.cuda.synchronize()
    for b, c in zip(kept, copies):
        torch.testing.assert_close(b.images, c, rtol=0, atol=0)
    L.close()


def test_gpu_payload_rows_match_packed(photos_wds):
    """On the GPU the payloads reach the mixed decoder as per-sample views (``"rows"``)
    or as packed rows cut back by ``slice`` (``"packed"``, the default): the same
    ids and the same pixels."""
    ds = pipeline.open_dataset(photos_wds)
    kw = dict(batch_size=16, keep=0.75, policy="uniform", epochs=1, seed=3, backend="dali",
              device="cuda", augment="imagenet", num_workers=1)
    out = {}
    for payload in ("rows", "packed"):
        with pipeline.Loader(ds, options=pipeline.LoaderOptions.of(image_size=48, payload=payload),
                             **kw) as L:
            out[payload] = [(b.ids.cpu(), b.images.cpu()) for b in L.epoch(0)]
    assert len(out["rows"]) == len(out["packed"]) > 1
    for (ri, rx), (pi, px) in zip(out["rows"], out["packed"]):
        assert torch.equal(ri, pi)
        assert float((rx - px).abs().max()) < 1e-4
