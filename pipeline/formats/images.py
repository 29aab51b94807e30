"""Image encode/decode helpers shared by the writers (PIL; deterministic output)."""
from __future__ import annotations

import io
import re

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


class UnsupportedPixels(ValueError):
    """An image whose pixel values have no unambiguous 8-bit reading (skipped, not guessed)."""


def check_pixels(img, fmt: str) -> None:
    """Raise UnsupportedPixels for pixels the converter would store wrong.

    Floating-point pixels (mode ``F``: 0..1, 0..255 or any range) and 32-bit integers
    (mode ``I`` of a TIFF) say nothing about their white level, and PIL's conversion clips
    them (a 0..1 float image becomes black): they are refused rather than guessed. Mode
    ``I`` of a PNG or PNM is 16-bit by those formats' definition and is scaled (``to_8bit``).
    """
    mode = img.mode
    if mode == "F":
        raise UnsupportedPixels("floating-point pixels (PIL mode F) have no defined 8-bit "
                                "scale: save the image with 8- or 16-bit integer samples")
    if mode == "I" and fmt.split(";")[0] not in ("PNG", "PPM"):
        raise UnsupportedPixels(f"32-bit integer pixels (PIL mode I, {fmt or 'unknown format'}) "
                                "have no defined 8-bit scale: save the image with 8- or "
                                "16-bit samples")
    if mode not in KNOWN_MODES:
        raise UnsupportedPixels(f"pixel mode {mode} is not one the converter can store "
                                "as 8 bits")


# 8-bit modes PIL converts to L / RGB, and the wide grayscale modes ``to_8bit`` scales
KNOWN_MODES = ("1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
               "YCbCr", "LAB", "HSV", *WIDE_MODES)


def channels_of_mode(mode: str) -> int:
    """Channels the loader's decoders deliver, and the converter stores, for a PIL mode: 1
    (grayscale, alpha dropped) or 3 (colour: palette, CMYK, ... decode to RGB, alpha
    dropped). The decoders produce only GRAY or RGB, so a channel count of 2 or 4 in a
    manifest would make every batch fail."""
    return 1 if mode in ("1", "L", "LA", "La", *WIDE_MODES) else 3


def probe_image(path: str) -> tuple[str, int, int, int]:
    """Fully decode one image file; return (PIL format, H, W, C). Raises on a corrupt file
    and on pixels with no unambiguous 8-bit reading (``check_pixels``).

    A 16-bit PNG reports the format "PNG;16": decoders disagree on such files (torchvision
    gives unscaled 16-bit values, DALI clips), so the converter re-encodes them as 8-bit PNG
    instead of storing them byte for byte (``to_8bit``)."""
    from PIL import Image
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()          # full decode: catches truncated and corrupt files
        fmt = img.format or ""
        check_pixels(img, fmt)
        if fmt == "PNG" and png_bit_depth(data) > 8:
            fmt = "PNG;16"
        h, w = oriented(img).size[::-1]
        return fmt, h, w, channels_of_mode(img.mode)


def unreadable_reason(e: Exception) -> str:
    """A skip reason that reads the same on every run: PIL names the file object it read
    (``<_io.BytesIO object at 0x7f...>``), a memory address that would make manifests differ."""
    from PIL import UnidentifiedImageError
    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can read"
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<file>", f"{type(e).__name__}: {e}")


def oriented(img):
    """``img`` turned as its EXIF orientation tag says (what the loader's decoders show, and
    what a re-encoded copy must hold: the re-encoded file carries no orientation tag)."""
    from PIL import ImageOps
    return ImageOps.exif_transpose(img)


def decode_bytes(data: bytes, channels: int | None = None,
                 resize: tuple[int, int] | None = None) -> np.ndarray:
    """Decode image bytes to uint8 (H,W,C), turned by its EXIF orientation; ``channels``
    1 -> L, 3 -> RGB (None: ``channels_of_mode``, alpha dropped), 4 -> RGBA. 16-bit
    grayscale is scaled to 8 bits (``to_8bit``), never clipped; pixels with no 8-bit
    reading raise UnsupportedPixels; ``resize`` (H, W) applies after the turn."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        check_pixels(img, img.format or "")
        img = oriented(img)
        if img.mode in WIDE_MODES:
            img = to_8bit(img)
        img = img.convert(_MODES[channels or channels_of_mode(img.mode)])
        if resize is not None and (img.height, img.width) != tuple(resize):
            img = img.resize((resize[1], resize[0]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
