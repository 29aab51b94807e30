"""An encoded image's height and width from its header, without decoding it.

The augmentation planner needs each image's size to draw a random-resized crop as
torchvision and DALI define it (an area and an aspect ratio in pixels, see
decode/augment.py); the reader has the bytes in hand, so a few byte reads give it:

* JPEG: the marker chain from SOI to the first scan (SOS): the frame header (SOF0-15 but
  DHT/JPG/DAC) gives height and width (bytes 5-8); an APP1 ``Exif`` segment's IFD0
  orientation tag (0x0112) values 5-8 swap them, before or after the frame header, as
  decoders that honour the orientation do (DALI's ``adjust_orientation`` default).
* PNG: IHDR's width and height (bytes 16-23).
* anything else, or a header that does not parse: ``None``; :func:`batch_hw` then asks
  PIL, which reads the header of every format it opens (no pixels decoded), and gives 0
  where PIL cannot either (the caller falls back to a size-free crop); a damaged image is
  the decoder's and the reader's business, not this module's.
"""
from __future__ import annotations

import io

import numpy as np

__all__ = ["image_hw", "batch_hw", "pil_hw"]

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG = b"\x89PNG\r\n\x1a\n"
FIRST = 1 << 13
HEAD = 1 << 18   # where to stop looking for a frame header (APPn segments can be large)


def _exif_swaps(b: bytes, i: int, end: int) -> bool:
    """True when the Exif block ``b[i:end]`` (after ``Exif\\0\\0``) says orientation 5-8."""
    order = b[i:i + 2]
    if order not in (b"II", b"MM") or end - i < 8:
        return False
    big = order == b"MM"

    def num(at: int, n: int) -> int:
        return int.from_bytes(b[i + at:i + at + n], "big" if big else "little")
    ifd = num(4, 4)
    if ifd + 2 > end - i:
        return False
    for k in range(min(num(ifd, 2), (end - i - ifd - 2) // 12)):
        e = ifd + 2 + 12 * k
        if num(e, 2) == 0x0112:
            return num(e + 8, 2) in (5, 6, 7, 8)
    return False


def image_hw(b) -> tuple[int, int] | None:
    """``(height, width)`` of the JPEG or PNG in ``b`` (bytes or a uint8 array), as it
    decodes (EXIF orientation applied); ``None`` when the header does not say (or lies
    beyond the first ``HEAD`` bytes)."""
    view = memoryview(b)
    hw = _parse(view[:FIRST].tobytes(), final=len(view) <= FIRST)  # nearly always enough
    if hw is None and len(view) > FIRST:
        hw = _parse(view[:HEAD].tobytes(), final=True)
    return hw


def _parse(b: bytes, final: bool) -> tuple[int, int] | None:
    """The size in the header bytes ``b``.  A JPEG's markers are followed up to its first
    scan (SOS), not only to its frame header: an Exif block after the frame header still
    turns the image for the decoders.  ``final``: ``b`` is all there is to look at (a JPEG
    whose scan does not start within ``b`` then gives the frame header's size as found)."""
    n = len(b)
    if n >= 24 and b[:8] == _PNG and b[12:16] == b"IHDR":
        w, h = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
        return (h, w) if h and w else None
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i, swap, hw = 2, False, None
    while i + 3 < n:
        if b[i] != 0xFF:
            return None
        m = b[i + 1]
        if m == 0xFF:                          # fill byte
            i += 1
            continue
        if 0xD0 <= m <= 0xD7 or m == 0x01:     # standalone markers
            i += 2
            continue
        if m in (0xDA, 0xD9):                  # the first scan (or the end): headers done
            break
        seg = (b[i + 2] << 8) | b[i + 3]
        if seg < 2:
            return None
        if m in _SOF and hw is None:
            if i + 9 > n:
                break
            h, w = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
            if not (h and w):
                return None
            hw = (h, w)
        elif m == 0xE1 and b[i + 4:i + 10] == b"Exif\0\0":
            swap = _exif_swaps(b, i + 10, min(n, i + 2 + seg))
        i += 2 + seg
    else:
        if not final:                          # the scan may start past these bytes
            return None
    if hw is None:
        return None
    return (hw[1], hw[0]) if swap else hw


def batch_hw(payloads) -> np.ndarray:
    """int64 ``[B, 2]``: each payload's ``(height, width)``; 0 where unknown.  A payload
    that is an array of pixels (ndim 3, raw/npy codecs) gives its own shape; a header
    :func:`image_hw` does not read (another format, a frame header past ``HEAD``) is
    asked of PIL (:func:`pil_hw`)."""
    out = np.zeros((len(payloads), 2), np.int64)
    for j, p in enumerate(payloads):
        if getattr(p, "ndim", 1) == 3:
            out[j] = p.shape[:2]
            continue
        hw = image_hw(p)
        out[j] = hw if hw is not None else pil_hw(p)
    return out


def pil_hw(b) -> tuple[int, int]:
    """``(height, width)`` as decoded (EXIF orientation 5-8 swaps them) from PIL's reading
    of the header (no pixels decoded); ``(0, 0)`` where PIL cannot read it.  PIL's TIFF
    reader already reports the oriented size; its other readers the stored one."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(memoryview(b).tobytes())) as im:
            w, h = im.size
            turned = im.format != "TIFF" and im.getexif().get(0x0112) in (5, 6, 7, 8)
            return (w, h) if turned else (h, w)
    except Exception:  # noqa: BLE001 - any failure means "size unknown"
        return 0, 0
