"""Random-resized crops drawn in pixels from each image's header size, as torchvision does
(pipeline/decode/augment.py, pipeline/formats/imagesize.py)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.decode.augment import get_augment, rrc_pixels, sample_params
from pipeline.formats.imagesize import batch_hw, image_hw

SIZES = [(300, 500), (500, 375), (400, 400), (1, 1), (1, 7), (7, 1), (100, 1000), (37, 64)]  # (h, w)


def _jpeg(h: int, w: int, **kw) -> bytes:
    g = np.random.default_rng(h * 7919 + w)
    buf = io.BytesIO()
    Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _exif_after_frame_header(jpeg: bytes) -> bytes:
    """The same JPEG with its APP1 Exif segment moved after the frame header (SOF0):
    legal, and the decoders still apply its orientation."""
    segs, i = [], 2
    while jpeg[i + 1] != 0xDA:
        n = (jpeg[i + 2] << 8) | jpeg[i + 3]
        segs.append(jpeg[i:i + 2 + n])
        i += 2 + n
    app1 = [g for g in segs if g[1] == 0xE1]
    rest = [g for g in segs if g[1] != 0xE1]
    k = next(j for j, g in enumerate(rest) if g[1] == 0xC0) + 1
    return jpeg[:2] + b"".join(rest[:k] + app1 + rest[k:]) + jpeg[i:]


def test_header_sizes_match_pil_and_dali():
    from nvidia.dali import fn, pipeline_def

    samples = [_jpeg(h, w) for h, w in SIZES] + [_jpeg(120, 90, progressive=True)]
    ex = Image.Exif()
    ex[0x0112] = 6                                   # rotated 90 degrees: decoders swap h and w
    ex[0x010E] = "x" * 20000                         # a large APP1 before the frame header
    samples.append(_jpeg(50, 80, exif=ex.tobytes()))
    ex6 = Image.Exif()
    ex6[0x0112] = 6
    samples.append(_exif_after_frame_header(_jpeg(40, 70, exif=ex6.tobytes())))
    buf = io.BytesIO()
    Image.new("RGB", (33, 21)).save(buf, "PNG")
    samples.append(buf.getvalue())
    want = SIZES + [(120, 90), (80, 50), (70, 40), (21, 33)]
    assert [image_hw(s) for s in samples] == want
    assert [image_hw(np.frombuffer(s, np.uint8)) for s in samples] == want

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def peek():
        return fn.peek_image_shape(fn.external_source(lambda: [np.frombuffer(s, np.uint8) for s in samples],
                                                      batch=True))
    p = peek()
    p.build()
    dali = [tuple(int(v) for v in np.asarray(t)[:2]) for t in p.run()[0]]
    assert dali == want                              # DALI's view, EXIF orientation included
    for bad in (b"", b"not an image", b"\xff\xd8\xff\xda\x00\x02", _jpeg(8, 8)[:20]):
        assert image_hw(bad) is None
    hw = batch_hw([np.zeros((5, 7, 3), np.uint8), np.frombuffer(samples[0], np.uint8), b"junk"])
    assert hw.tolist() == [[5, 7], [300, 500], [0, 0]]


def test_sizes_of_other_formats_come_from_pil_as_dali_decodes_them():
    """Headers our parser does not read (BMP, TIFF, a rotated TIFF and WebP) get their size from PIL,
    EXIF orientation applied as DALI's decoders apply it: the DALI backend cuts the crop
    window in pixels from these sizes (no size read in its graph)."""
    from nvidia.dali import fn, pipeline_def

    def encoded(fmt: str, h: int, w: int, **kw) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, fmt, **kw)
        return buf.getvalue()
    ex = Image.Exif()
    ex[0x0112] = 8
    samples = [encoded("BMP", 30, 50), encoded("TIFF", 41, 23), encoded("TIFF", 20, 60, exif=ex.tobytes()),
               encoded("WEBP", 17, 29, exif=ex.tobytes())]
    assert [image_hw(s) for s in samples] == [None] * 4
    hw = batch_hw([np.frombuffer(s, np.uint8) for s in samples])

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def decode():
        return fn.decoders.image(fn.external_source(lambda: [np.frombuffer(s, np.uint8) for s in samples],
                                                    batch=True))
    p = decode()
    p.build()
    dali = [list(np.asarray(t).shape[:2]) for t in p.run()[0]]
    assert hw.tolist() == dali == [[30, 50], [41, 23], [60, 20], [29, 17]]


def _windows(hw: np.ndarray, seed: int = 0):
    spec = get_augment("imagenet", True, 3, None)
    p = sample_params(spec, len(hw), seed, 3, 0, 5, hw)
    (top, left), (h, w) = rrc_pixels(p.anchor.T, p.shape.T, hw.T.astype(np.float32))
    return p, top, left, h, w


def test_crops_follow_torchvisions_rule_in_pixels():
    from torchvision.transforms import RandomResizedCrop

    hw = np.array(SIZES * 500, np.int64)
    p, top, left, h, w = _windows(hw)
    H, W = hw[:, 0], hw[:, 1]
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    big = (H >= 300) & (W >= 300)                    # where rounding does not matter
    ratio = (w / h)[big]
    assert ratio.min() >= 3 / 4 - 0.01 and ratio.max() <= 4 / 3 + 0.01   # pixel aspect, not relative
    torch.manual_seed(0)
    for k, (hh, ww) in enumerate(SIZES):
        rows = slice(k, None, len(SIZES))
        ours = (h[rows] * w[rows]).mean() / (hh * ww)
        ref = np.mean([np.prod(RandomResizedCrop.get_params(torch.empty(1, hh, ww), (0.08, 1.0),
                                                            (3 / 4, 4 / 3))[2:]) for _ in range(2000)])
        assert abs(ours - ref / (hh * ww)) < 0.03, (hh, ww, ours, ref / (hh * ww))
    # no attempt fits a 1x1000 or a 1000x2 image: torchvision's fallback, centred
    for hh, ww in ((1, 1000), (1000, 2)):
        ref = RandomResizedCrop.get_params(torch.empty(1, hh, ww), (0.08, 1.0), (3 / 4, 4 / 3))
        _, t, le, ph, pw = _windows(np.array([[hh, ww]] * 3, np.int64))
        assert [(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(t, le, ph, pw)] == [tuple(ref)] * 3


def test_draws_are_deterministic_and_unknown_sizes_keep_relative_windows():
    hw = np.array(SIZES * 8, np.int64)
    a, b = _windows(hw)[0], _windows(hw)[0]
    assert np.array_equal(a.anchor, b.anchor) and np.array_equal(a.shape, b.shape)
    assert not np.array_equal(a.anchor, _windows(hw, seed=1)[0].anchor)
    unknown = hw.copy()
    unknown[::2] = 0                                  # headers that did not parse
    c = _windows(unknown)[0]
    assert np.array_equal(c.anchor[1::2], a.anchor[1::2])   # the others are untouched
    assert np.array_equal(c.flip, a.flip)
    assert ((c.anchor[::2] >= 0) & (c.anchor[::2] + c.shape[::2] <= 1 + 1e-6)).all()
    none = sample_params(get_augment("imagenet", True, 3, None), len(hw), 0, 3, 0, 5)
    assert np.array_equal(none.anchor[::2], c.anchor[::2])


@pytest.mark.parametrize("h, w", [(300, 500), (2, 9)])
def test_pixels_come_back_exactly(h, w):
    """Relative windows (float32) turn back into the drawn whole pixels in either backend."""
    hw = np.tile(np.array([[h, w]]), (4000, 1))
    p, top, left, ph, pw = _windows(hw)
    assert np.allclose(p.anchor[:, 0] * h, top, atol=1e-3) and np.allclose(p.shape[:, 1] * w, pw, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_cifar_preset_fits_other_sizes_before_its_pad_crop(tmp_path, backend):
    """augment="cifar" with image_size on larger, variable-size photos: training brings each
    image to the output size as evaluation does (shorter side, centre crop) before padding
    and cropping, so the centre of the photo is in every training crop (cutting the 32x32
    window straight from the photo would show its top-left corner: white here)."""
    import pipeline
    from pipeline.formats import convert

    for c, (h, w) in (("a", (200, 300)), ("b", (300, 200))):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            a = np.full((h, w, 3), 255, np.uint8)
            a[h // 2 - h // 8:h // 2 + h // 8, w // 2 - w // 8:w // 2 + w // 8] = 0  # dark centre
            Image.fromarray(a).save(tmp_path / "src" / c / f"{i}.png")
    convert(tmp_path / "src", tmp_path / "wds", format="wds", progress=False)
    ds = pipeline.open_dataset(tmp_path / "wds")
    opts = pipeline.LoaderOptions.of(image_size=32)
    kw = dict(backend=backend, device="cpu", augment="cifar", options=opts)
    train = pipeline.Loader(ds, 6, keep=1.0, policy="full", epochs=2, seed=3, **kw)
    evl = pipeline.Loader.for_eval(ds, 6, **kw)
    for e in range(2):
        t = next(iter(train.epoch(e))).images
        v = next(iter(evl.epoch(0))).images
        assert t.shape == v.shape == (6, 3, 32, 32)
        dark = lambda x: (x < 0).all(1).float()             # below the mean in every channel
        # the shift is at most 4 px, so the photo's dark centre (8x8 after the fit) stays
        # inside the crop's central 24x24, and no padding reaches there
        assert torch.allclose(dark(t)[:, 4:28, 4:28].sum((1, 2)), dark(v).sum((1, 2)), atol=6)
        assert (dark(v).sum((1, 2)) > 40).all()
    train.close()
    evl.close()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_no_preset_on_mixed_sizes_names_the_problem(tmp_path, backend):
    """augment=None keeps each image's size: on images of two sizes the first batch failed
    deep inside DALI (an IsDenseTensor assert) or torch.stack; now an error that says what
    to pass.  With image_size the same data loads."""
    import pipeline
    from pipeline.formats import convert

    for c, (h, w) in (("a", (20, 30)), ("b", (24, 24))):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
    convert(tmp_path / "src", tmp_path / "wds", format="wds", progress=False)
    ds = pipeline.open_dataset(tmp_path / "wds")
    kw = dict(keep=1.0, policy="full", backend=backend, device="cpu", augment=None, num_workers=0)
    with pipeline.Loader(ds, 6, **kw) as L:
        with pytest.raises(ValueError, match=r"different sizes .* pass image_size="):
            next(iter(L.epoch(0)))
    with pipeline.Loader(ds, 6, options=pipeline.LoaderOptions.of(image_size=16), **kw) as L:
        assert next(iter(L.epoch(0))).images.shape == (6, 3, 16, 16)


def test_eval_centre_crop_same_pixels_on_both_backends(tmp_path):
    """An odd margin (40x50 -> 20x25 -> centre 20x20): torchvision's centre crop rounds half
    to even and DALI's puts the extra pixel first, so the torch backend's eval images were
    one pixel off DALI's (4-10 levels apart on textured images).  Now the same window."""
    import pipeline
    from pipeline.formats import convert

    y, x = np.mgrid[0:40, 0:50]
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            a = (((x * (3 + i) + y * 2) % 17) * 15).astype(np.uint8)      # fine diagonal stripes
            Image.fromarray(np.stack([a, a[::-1], 255 - a], -1)).save(tmp_path / "src" / c / f"{i}.png")
    convert(tmp_path / "src", tmp_path / "wds", format="wds", progress=False)
    ds = pipeline.open_dataset(tmp_path / "wds")
    got = {}
    for backend in ("dali", "torch"):
        with pipeline.Loader.for_eval(ds, 6, augment=None, backend=backend, device="cpu",
                                      options=pipeline.LoaderOptions.of(image_size=20)) as L:
            b = next(iter(L.epoch(0)))
            got[backend] = b.images[b.ids.argsort()] * 255
    assert got["dali"].shape == (6, 3, 20, 20)
    diff = (got["dali"] - got["torch"]).abs().mean((1, 2, 3))
    assert (diff < 1.5).all(), diff
