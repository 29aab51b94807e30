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


def decode_bytes(data: bytes, channels: int | None = None,
                 resize: tuple[int, int] | None = None) -> np.ndarray:
    """Decode image bytes to uint8 (H,W,C); ``channels`` 1 -> L, 3 -> RGB, 4 -> RGBA."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if channels is not None:
            img = img.convert(_MODES[channels])
        elif img.mode not in _MODES.values():
            img = img.convert("RGB")
        if resize is not None and (img.height, img.width) != tuple(resize):
            img = img.resize((resize[1], resize[0]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
