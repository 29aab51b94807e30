"""The DALI backend's ROI decode (random-resized crop cut by the decoder) shows the same
windows as the torch backend's decode-then-crop, on real JPEGs."""
import warnings

import torch

import pipeline
from pipeline.options import LoaderOptions


def test_dali_roi_decode_matches_torch_crop(cifar_test_wds):
    ds = pipeline.open_dataset(cifar_test_wds)
    out = {}
    for backend in ("dali", "torch"):
        L = pipeline.Loader(ds, 64, keep=1.0, policy="full", backend=backend, device="cpu",
                            augment="imagenet", num_workers=0, options=LoaderOptions.of(image_size=32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out[backend] = next(iter(L.epoch(0))).images.clone()
        L.close()
    d, t = out["dali"], out["torch"]
    same = (d - t).abs().mean().item()
    other = (d - t.roll(1, 0)).abs().mean().item()  # what a wrong window looks like
    assert same < 0.1 * other, (same, other)
    assert (d - t).abs().mean(dim=(1, 2, 3)).max().item() < 0.4 * other  # every image, not just most
