"""Cheap validity checks of encoded images, run by the reader before any decoder sees them.

A decoder fed bytes that are not the image they claim to be can do worse than raise:
DALI's CPU image decoder has been seen to crash the whole process (SIGSEGV) on JPEGs
with damaged header segments, which no recovery can catch.  Samples whose checksum was
verified were decoded when the dataset was written, but third-party shards indexed in
place have no checksums, and a run may switch the check off.  So the reader looks at
what it can for the cost of a few dozen byte reads (no decoding, no hashing):

* JPEG: SOI; the marker segments up to the first SOS are a chain of known markers whose
  lengths stay inside the payload; the quantization and Huffman tables are well formed
  (ids, sizes, Huffman code lengths within the code space, DC symbols at most 15); the
  frame header (SOF: 8-bit baseline, extended or progressive) has a non-zero size and
  sampling factors a decoder can upsample; the scan header names frame components and
  defined tables, with a spectral selection that fits the frame type; EOI follows SOS.
* PNG: the signature; IHDR first, 13 bytes, a non-zero size and a valid colour type
  and bit depth; every chunk's CRC right; IEND; the image data inflates (zlib, in C) to
  exactly the scanlines IHDR implies, each with a valid filter type.  This one is not
  free (inflating is a good part of decoding a PNG) but it is what stops a damaged
  deflate stream with a correct CRC, on which torchvision's decoder crashes.
* Other formats DALI decodes (BMP, WebP, TIFF, JPEG 2000, PNM): the signature.

Bytes that fail (zeros, random bytes, a cut or damaged header, no known signature) get a
second opinion from PIL (:func:`pil_decodable`, a full decode: slow, but only for the
rare suspect), so an unusual but valid file (data after EOI, say) is not lost.
"""
from __future__ import annotations

import io
import operator
import zlib

__all__ = ["looks_decodable", "plausible_image", "plausible_structure", "pil_decodable",
           "PNG_SIGNATURE"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the frame types libjpeg-turbo decodes: baseline, extended, progressive (Huffman or
# arithmetic); lossless and hierarchical frames go to PIL for a second opinion
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC9, 0xCA))
# the other segments a decodable file has before its first scan: DHT, DQT, DRI, APPn, COM
# (DAC, arithmetic-coding conditioning, is rare enough to leave to PIL)
_SEGMENTS = frozenset((0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)))
# what PIL may confirm: the formats both backends decode (DALI: JPEG, PNG, BMP, TIFF,
# WebP, JPEG 2000, PNM)
_FORMATS = frozenset(("JPEG", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"))
_KRAFT = tuple(1 << (16 - n) for n in range(1, 17))  # code space of one code of length n
# (no GIF: DALI has no GIF decoder)
_OTHER_SIGNATURES = (b"BM", b"II*\x00", b"MM\x00*", b"\xff\x4f\xff\x51",
                     b"\x00\x00\x00\x0cjP  ", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


def _tables(b: bytes, i: int, end: int, kind: int, defined: set) -> bool:
    """The DQT or DHT segment body ``b[i:end]``: a whole number of well-formed tables (ids
    0..3; Huffman code lengths that fit the code space, at most 256 symbols)."""
    while i < end:
        cls, tid = b[i] >> 4, b[i] & 15
        if cls > 1 or tid > 3:
            return False
        if kind == 0xDB:                   # DQT: 64 entries of 1 or 2 bytes
            i += 1 + 64 * (cls + 1)
        else:                              # DHT: 16 code-length counts, then the symbols
            counts = b[i + 1:i + 17]
            total = sum(counts)
            # Kraft: the codes of each length must fit the binary code space
            if (len(counts) < 16 or not 0 < total <= 256
                    or sum(map(operator.mul, counts, _KRAFT)) > 1 << 16):
                return False
            if cls == 0 and max(b[i + 17:i + 17 + total], default=0) > 15:
                return False               # a DC symbol is a bit count (at most 15)
            i += 17 + total
        defined.add((kind, cls if kind == 0xC4 else 0, tid))
    return i == end


def _frame(b: bytes, i: int, seg: int) -> dict | None:
    """SOF: 8-bit samples, non-zero size, 1/3/4 components with sampling factors a decoder
    can upsample (each divides the largest, at most 10 blocks per MCU) -> ``{component id:
    quant table}``, or None."""
    h, w, nc = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8], b[i + 9]
    if seg < 8 or b[i + 4] != 8 or not (h and w) or nc not in (1, 3, 4) or seg != 8 + 3 * nc:
        return None
    comps, hv = {}, []
    for k in range(i + 10, i + 10 + 3 * nc, 3):
        fh, fv, tq = b[k + 1] >> 4, b[k + 1] & 15, b[k + 2]
        if not (1 <= fh <= 4 and 1 <= fv <= 4) or tq > 3:
            return None
        comps[b[k]] = tq
        hv.append((fh, fv))
    mh, mv = max(f[0] for f in hv), max(f[1] for f in hv)
    if any(mh % fh or mv % fv for fh, fv in hv) or (nc > 1 and sum(fh * fv for fh, fv in hv) > 10):
        return None
    return comps


def _scan(b: bytes, i: int, seg: int, comps: dict, sof: int, defined: set) -> bool:
    """SOS: its components exist in the frame, the tables they use were defined, and its
    spectral selection fits the frame type (sequential: 0..63; progressive: DC alone or one
    component's AC band)."""
    ns = b[i + 4]
    if not 1 <= ns <= 4 or seg != 6 + 2 * ns:
        return False
    huffman = sof < 0xC9                   # SOF9, SOF10: arithmetic coding, no DHT
    if any((0xDB, 0, tq) not in defined for tq in comps.values()):
        return False
    if not huffman and any(t[0] == 0xC4 for t in defined):
        return False                       # Huffman tables in an arithmetic-coded file
    for k in range(i + 5, i + 5 + 2 * ns, 2):
        td, ta = b[k + 1] >> 4, b[k + 1] & 15
        if b[k] not in comps or td > 3 or ta > 3:
            return False
        # a progressive scan may leave out the DC or AC table it does not use
        if huffman and (0xC4, 0, td) not in defined and (0xC4, 1, ta) not in defined:
            return False
    ss, se, a = b[i + 5 + 2 * ns], b[i + 6 + 2 * ns], b[i + 7 + 2 * ns]
    if sof in (0xC2, 0xCA):
        return (se == 0 if ss == 0 else ns == 1 and ss <= se <= 63) and a >> 4 <= 13
    return ss == 0 and se == 63 and a == 0


def _jpeg(b: bytes, deep: bool = True) -> bool:
    """The JPEG check; ``deep=False``: the marker chain, segment lengths, a frame before
    the scan and EOI only (no table, frame or scan contents)."""
    n, i, comps, sof, defined = len(b), 2, None, 0, set()
    while i + 4 <= n:
        if b[i] != 0xFF:
            return False
        m = b[i + 1]
        if m == 0xFF:                      # fill byte before a marker
            i += 1
            continue
        if 0xD0 <= m <= 0xD7 or m == 0x01:  # standalone markers (RSTn, TEM)
            i += 2
            continue
        if m not in _SEGMENTS and m not in _SOF and m != 0xDA:
            return False  # no marker, a second SOI, EOI before any scan, a rare frame type
        seg = (b[i + 2] << 8) | b[i + 3]
        if seg < 2 or i + 2 + seg > n:
            return False
        if m in (0xDB, 0xC4):
            if deep and not _tables(b, i + 4, i + 2 + seg, m, defined):
                return False
        elif m in _SOF:
            comps, sof = (_frame(b, i, seg) if deep else {}), m
            if comps is None:
                return False
        elif m == 0xDA:                    # SOS: the entropy-coded data follows
            if comps is None or (deep and not _scan(b, i, seg, comps, sof, defined)):
                return False
            end = i + 2 + seg
            return b.endswith(b"\xff\xd9") or b.rfind(b"\xff\xd9", end) >= 0
        i += 2 + seg
    return False


# PNG colour type -> (samples per pixel, allowed bit depths)
_PNG_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)),
              6: (4, (8, 16))}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


def _png_raw_size(w: int, h: int, bits: int, interlaced: bool) -> int:
    """Bytes of the filtered scanlines (one filter byte per line) the image data inflates to."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    size = 0
    for x0, y0, dx, dy in passes:
        pw, ph = -(-(w - x0) // dx), -(-(h - y0) // dy)
        if pw > 0 and ph > 0:
            size += ph * (1 + -(-pw * bits // 8))
    return size


def _png(b: bytes) -> bool:
    n, mv = len(b), memoryview(b)
    if n < 8 + 25 + 12 or b[12:16] != b"IHDR" or int.from_bytes(b[8:12], "big") != 13:
        return False
    w, h, depth, ctype = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big"), b[24], b[25]
    if not (w and h) or ctype not in _PNG_TYPES or depth not in _PNG_TYPES[ctype][1]:
        return False
    if b[26] != 0 or b[27] != 0 or b[28] > 1:  # compression, filter method, interlace
        return False
    idat, i = [], 8
    while i + 12 <= n:                     # length, type, data, crc (over type and data)
        length = int.from_bytes(b[i:i + 4], "big")
        if i + 12 + length > n or zlib.crc32(mv[i + 4:i + 8 + length]) != int.from_bytes(
                b[i + 8 + length:i + 12 + length], "big"):
            return False
        kind = b[i + 4:i + 8]
        if kind == b"IDAT":
            idat.append(mv[i + 8:i + 8 + length])
        elif kind == b"IEND":
            break
        i += 12 + length
    else:
        return False
    # the image data must inflate to exactly its scanlines (a damaged deflate stream whose
    # chunk CRC was written after the damage crashes torchvision's PNG decoder)
    expect = _png_raw_size(w, h, _PNG_TYPES[ctype][0] * depth, b[28] == 1)
    d = zlib.decompressobj()
    try:
        raw = d.decompress(b"".join(idat), expect + 1)
    except zlib.error:
        return False
    if len(raw) != expect or not d.eof:
        return False
    return b[28] == 1 or max(raw[::expect // h]) <= 4  # filter types 0..4 (non-interlaced)


def _check(data, deep: bool) -> bool:
    b = data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()
    if b.startswith(b"\xff\xd8"):
        return _jpeg(b, deep)
    head = b[:12]
    if head.startswith(PNG_SIGNATURE):
        return _png(b) if deep else True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head.startswith(_OTHER_SIGNATURES)


def plausible_image(data) -> bool:
    """The cheap structural check alone (see the module doc): True when ``data`` (bytes or
    a uint8 array) looks like a whole JPEG or PNG, or starts with another known image
    signature."""
    return _check(data, deep=True)


def plausible_structure(data) -> bool:
    """The check for payloads whose checksum passed (bytes stored damaged, before checks
    existed): a known image signature, and for JPEG the marker chain (a few byte reads per
    segment): DALI's CPU decoder crashes (SIGSEGV, which nothing can catch) on bytes with
    no signature and on a JPEG with a broken marker chain.  Deeper damage is left to the
    decoders, which raise (the DALI backend's recovery finds the sample)."""
    return _check(data, deep=False)


def pil_decodable(data) -> bool:
    """True when PIL decodes ``data`` completely and it is in a format every backend
    decodes (slow: for suspects only)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            return im.format in _FORMATS
    except Exception:  # noqa: BLE001 - any failure means "not an image we can use"
        return False


def looks_decodable(data) -> bool:
    """The reader's check: the cheap one, and PIL's full decode for what fails it."""
    return plausible_image(data) or pil_decodable(data)
