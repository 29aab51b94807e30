"""The DALI backend's ROI decode (random-resized crop cut by the decoder) shows the same
windows as the torch backend's decode-then-crop, on real JPEGs."""
import warnings

import pytest
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


def _photo(h: int, w: int):
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                                     (x + y) * 255 // max(h + w - 2, 1)], -1).astype(np.uint8))


def _odd_images() -> dict[str, tuple[str, bytes]]:
    """One image per thing a user's shards hold that CIFAR does not: EXIF orientation,
    16-bit and palette PNGs, grey, CMYK and progressive JPEGs, WebP, BMP, TIFF, 1-pixel."""
    import io

    import numpy as np
    from PIL import Image
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees clockwise to display
    cases = {
        "rgb": ("jpg", _photo(60, 80), "JPEG", {}),
        "exif6": ("jpg", _photo(60, 80), "JPEG", {"exif": ex.tobytes()}),
        "exif6_png": ("png", _photo(60, 80), "PNG", {"exif": ex.tobytes()}),
        "exif6_webp": ("webp", _photo(60, 80), "WEBP", {"exif": ex.tobytes(), "quality": 95}),
        "gray": ("jpg", _photo(60, 80).convert("L"), "JPEG", {}),
        "cmyk": ("jpg", _photo(60, 80).convert("CMYK"), "JPEG", {}),
        "progressive": ("jpg", _photo(61, 83), "JPEG", {"progressive": True}),
        "png16": ("png", Image.fromarray((np.arange(60 * 80).reshape(60, 80) * 13 % 65536)
                                         .astype(np.uint16)), "PNG", {}),
        "palette": ("png", _photo(60, 80).convert("P", dither=Image.Dither.NONE), "PNG", {}),
        "rgba": ("png", _photo(60, 80).convert("RGBA"), "PNG", {}),
        "bmp": ("bmp", _photo(60, 80), "BMP", {}),
        "tiff": ("tiff", _photo(60, 80), "TIFF", {}),
        "one_pixel": ("jpg", _photo(1, 1), "JPEG", {}),
    }
    out = {}
    for name, (ext, img, fmt, kw) in cases.items():
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        out[name] = (ext, b.getvalue())
    return out


def test_backends_agree_on_formats_beyond_cifar(tmp_path):
    """Shards written by the webdataset library with images of every kind above, indexed in
    place: both backends deliver every sample (none reported corrupt), oriented and scaled
    alike (DALI applies EXIF orientation and scales 16 bits to 8; so must torchvision/PIL)."""
    import numpy as np
    import webdataset as wds

    from pipeline.formats.index import index

    images = _odd_images()
    with wds.ShardWriter(str(tmp_path / "shard-%03d.tar"), maxcount=5, verbose=0) as w:
        for i, (name, (ext, data)) in enumerate(images.items()):
            w.write({"__key__": f"{i:03d}_{name}", ext: data, "cls": str(i % 3).encode()})
    index(str(tmp_path), str(tmp_path / "idx"))
    ds = pipeline.open_dataset(tmp_path / "idx")
    assert len(ds) == len(images)
    names = dict(enumerate(list(images)[k] for k in ds.keys.tolist()))  # keys: source order
    out: dict[str, dict[str, torch.Tensor]] = {}
    for backend in ("dali", "torch"):
        L = pipeline.Loader(ds, 4, keep=1.0, policy="full", backend=backend, device="cpu",
                            augment="imagenet", num_workers=0,
                            options=LoaderOptions.of(train=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for b in L.epoch(0):
                for j, i in enumerate(b.ids.tolist()):
                    if i >= 0:
                        out.setdefault(names[i], {})[backend] = b.images[j].clone()
        assert L.stats(0).samples_corrupt == 0, backend
        L.close()
    assert sorted(out) == sorted(images)
    diff = {name: round((got["dali"] - got["torch"]).abs().mean().item(), 3)
            for name, got in out.items()}
    assert max(diff.values()) < 0.05, f"backends differ (mean |diff|, normalised units): {diff}"
    # orientation really applied: the rotated image is not the upright one resized
    upright, rotated = out["rgb"]["dali"], out["exif6"]["dali"]
    assert (upright - rotated).abs().mean().item() > 0.3
    assert (out["exif6"]["torch"] - torch.rot90(upright, -1, (1, 2))).abs().mean().item() < 0.1


def test_raw_payloads_from_read_only_bytes_decode_quietly_and_unshared():
    """Raw pixels arrive as read-only views of the bytes read; the torch backend copies
    them (torch warned "not writable" once per run, and a tensor sharing them could be
    written in place)."""
    import numpy as np

    from pipeline.decode.torch_backend import decode

    raw = bytes(range(48))
    payload = np.frombuffer(raw, np.uint8).reshape(4, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = decode(payload, "raw", 3)
    assert img.shape == (3, 4, 4) and img.permute(1, 2, 0).flatten().tolist() == list(raw)
    img.add_(1)
    assert payload.flatten().tolist() == list(raw)


def test_payload_rows_and_packed_give_the_same_batches(cifar_test_wds):
    """``payload="rows"`` (per-sample views of the packed buffer) and ``"packed"`` (one
    ``[B, width]`` array) decode to the same pixels, in the main process and from a reader
    process, padding rows included (keep 0.7 of the test set ends on a padded batch)."""
    import numpy as np
    import pytest

    ds = pipeline.open_dataset(cifar_test_wds)
    for workers in (0, 1):
        got = {}
        for payload in ("packed", "rows"):
            L = pipeline.Loader(ds, 96, keep=0.7, policy="uniform", epochs=1, seed=5,
                                backend="dali", device="cpu", augment="imagenet",
                                num_workers=workers,
                                options=LoaderOptions.of(image_size=24, payload=payload))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                got[payload] = [(b.ids.clone(), b.images.clone()) for b in L.epoch(0)]
            L.close()
        assert len(got["rows"]) == len(got["packed"]) > 1
        assert any((ids < 0).any() for ids, _ in got["rows"])  # a padded batch was compared
        for (ri, rx), (pi, px) in zip(got["rows"], got["packed"]):
            np.testing.assert_array_equal(ri.numpy(), pi.numpy())
            assert torch.equal(rx, px), f"workers={workers}: rows and packed pixels differ"
    with pytest.raises(ValueError, match="payload must be 'packed' or 'rows'"):
        LoaderOptions.of(payload="list")


@pytest.mark.parametrize("fmt, extra", [("wds", {}), ("wds", {"encode": "png"}),
                                        ("wds", {"resize": "40x30"}), ("zarr", {})])
def test_conversion_keeps_exif_orientation(tmp_path, fmt, extra):
    """A photo stored sideways with EXIF orientation 6 arrives turned, whether the converter
    stores its bytes (the decoders turn it) or re-encodes it (the converter turns it: the new
    file has no orientation tag), and the manifest records the turned size."""
    import numpy as np

    from PIL import Image

    from pipeline.formats import convert

    ex = Image.Exif()
    ex[0x0112] = 6
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        _photo(30, 40).save(tmp_path / "src" / c / "x.jpg", "JPEG", quality=95, exif=ex.tobytes())
    convert(tmp_path / "src", tmp_path / "out", format=fmt, progress=False, **extra)
    ds = pipeline.open_dataset(tmp_path / "out")
    h, w = (40, 30)                      # stored 30x40, shown 40x30
    if ds.shapes is not None:
        assert ds.shapes[:, :2].tolist() == [[h, w]] * 2
    want = np.asarray(_photo(30, 40).rotate(-90, expand=True), np.float32) / 255
    for backend in ("torch", "dali"):
        L = pipeline.Loader(ds, 2, keep=1.0, policy="full", backend=backend, device="cpu",
                            augment=None, num_workers=0)
        got = next(iter(L.epoch(0))).images
        L.close()
        assert got.shape == (2, 3, h, w), backend
        err = (got.permute(0, 2, 3, 1).numpy() - want).__abs__().mean()
        assert err < 0.03, (backend, err)
