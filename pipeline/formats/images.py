"""Image encode/decode helpers shared by the writers (PIL; deterministic output)."""
from __future__ import annotations

import io

import numpy as np

_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png"}
CODEC_OF_EXT = {"jpg": "jpeg", "png": "png", "npy": "npy"}


def encode_array(pixels: np.ndarray, encode: str, quality: int = 95) -> tuple[bytes, str]:
    """Encode uint8 (H,W,C) pixels as ``png`` (lossless), ``jpeg`` or ``npy``; return (bytes, ext)."""
    if encode == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(pixels), allow_pickle=False)
        return buf.getvalue(), "npy"
    from PIL import Image
    c = pixels.shape[-1]
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode=_MODES[c])
    buf = io.BytesIO()
    if encode == "png":
        img.save(buf, format="PNG", compress_level=6)
        return buf.getvalue(), "png"
    if encode == "jpeg":
        if c in (2, 4):          # JPEG has no alpha channel
            img = img.convert("L" if c == 2 else "RGB")
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    raise ValueError(f"unknown encoding {encode!r} (png, jpeg or npy)")


# PIL modes of single-channel images wider than 8 bits (16-bit PNG/TIFF grayscale)
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8bit(img):
    """A 16-bit grayscale PIL image scaled (not clipped) to 8-bit "L": round(v * 255 / 65535).

    PIL itself clips such values at 255 when converting; 16-bit RGB(A) PNGs need nothing
    here: PIL loads them as 8-bit, keeping the high byte (v >> 8, the same scaling up to
    rounding)."""
    from PIL import Image
    v = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def png_bit_depth(data: bytes) -> int:
    """Bit depth of a PNG's IHDR chunk (8 for anything that is not a PNG)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return 8


def channels_of_mode(mode: str) -> int:
    """Channels a decoder yields for a PIL mode (palette and CMYK decode to RGB)."""
    if mode in ("1", "L", "F", *WIDE_MODES):
        return 1
    if mode in ("LA", "La"):
        return 2
    if mode in ("RGBA", "PA", "RGBa"):
        return 4
    return 3


def probe_image(path: str) -> tuple[str, int, int, int]:
    """Fully decode one image file; return (PIL format, H, W, C). Raises on a corrupt file.

    A 16-bit PNG reports the format "PNG;16": decoders disagree on such files (torchvision
    gives unscaled 16-bit values, DALI clips), so the converter re-encodes them as 8-bit PNG
    instead of storing them byte for byte (``to_8bit``)."""
    from PIL import Image
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()          # full decode: catches truncated and corrupt files
        fmt = img.format or ""
        if fmt == "PNG" and png_bit_depth(data) > 8:
            fmt = "PNG;16"
        h, w = oriented(img).size[::-1]
        return fmt, h, w, channels_of_mode(img.mode)


def oriented(img):
    """``img`` turned as its EXIF orientation tag says (what the loader's decoders show, and
    what a re-encoded copy must hold: the re-encoded file carries no orientation tag)."""
    from PIL import ImageOps
    return ImageOps.exif_transpose(img)


def decode_bytes(data: bytes, channels: int | None = None,
                 resize: tuple[int, int] | None = None) -> np.ndarray:
    """Decode image bytes to uint8 (H,W,C), turned by its EXIF orientation; ``channels``
    1 -> L, 3 -> RGB, 4 -> RGBA.  16-bit grayscale is scaled to 8 bits (``to_8bit``), never
    clipped; ``resize`` (H, W) applies after the turn."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = oriented(img)
        if img.mode in WIDE_MODES:
            img = to_8bit(img)
        if channels is not None:
            img = img.convert(_MODES[channels])
        elif img.mode not in _MODES.values():
            img = img.convert("RGB")
        if resize is not None and (img.height, img.width) != tuple(resize):
            img = img.resize((resize[1], resize[0]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
