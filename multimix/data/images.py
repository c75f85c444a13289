"""Image decoding, resizing and PNG (de)serialisation: pure numpy + Pillow, no Ray.

Used by ``multimix prepare`` (source files → stored PNG bytes), by the Ray Data pipeline (stored
PNG bytes → arrays) and by ``multimix predict`` (any user image → the model's input size), so every
function takes any size, grey or colour, 8- or 16-bit, and fails with a :class:`DataError` that
names the file instead of a Pillow traceback. DICOM files (the ``DICM`` marker, or a
``.dcm``/``.dicom`` name) are decoded by :mod:`multimix.data.dicom` (modality and VOI LUTs,
MONOCHROME1 inverted) into the same 8-bit grey.

Conventions: an *image* is a 2-D ``numpy.uint8`` array ``(H, W)`` of grey levels 0..255; a *mask*
is a 2-D ``numpy.uint8`` array ``(H, W)`` with values {0, 1} in memory and {0, 255} when stored
as PNG (see ``docs/DESIGN.md`` §1).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from multimix.data import dicom
from multimix.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_grey",
    "load_grey_bounded",
    "to_grey",
    "resize_image",
    "resize_mask",
    "binarize_mask",
    "mask_levels",
    "encode_png",
    "decode_png",
    "decode_mask_png",
    "perceptual_hash",
    "PHASH_THUMB",
    "PHASH_BITS",
]

#: file extensions (lower case) that :mod:`multimix.data.sources` treats as images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + dicom.DICOM_EXTENSIONS

#: what Pillow raises for a file that is not an image, or a damaged one
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,  # "image file is truncated", broken data stream, bad PNG chunk
    SyntaxError,  # Pillow's parsers raise it for malformed headers
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


def load_grey(src: Source, name: str | None = None) -> np.ndarray:
    """Decode an image file (path or raw bytes) into grey levels.

    Args:
        src: a file path, or the file's bytes.
        name: how to name the file in errors (defaults to the path, or ``"<bytes>"``).

    Returns:
        ``numpy.uint8`` array ``(H, W)``. Only the first frame of multi-frame files is used;
        EXIF orientation is *not* applied (masks rarely carry it and must stay aligned).

    Conversion rules (see :func:`to_grey`): colour → ITU-R 601 luma (exact for grey content
    stored as RGB), alpha dropped, palette expanded, 16-bit and 32-bit integer images scaled by
    their bit depth (the smallest of 8/10/12/14/16 bits that holds the maximum), float images
    scaled by their min/max.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    return _open_grey(src, name, None)


def load_grey_bounded(src: Source, max_side: int, min_side: int = 1,
                      name: str | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_grey` with bounded memory for huge images (``multimix predict``).

    Images whose longer side exceeds ``max_side`` are decoded reduced by the smallest integer
    factor that brings it to ``max_side`` or below: JPEGs by the decoder itself
    (``Image.draft``: 1/2, 1/4 or 1/8 scale, the full-size pixels are never held), other
    formats with ``Image.reduce`` (a box filter) right after decoding, before any conversion.

    Returns:
        ``(grey uint8 (h, w), (H, W))``: the (possibly reduced) image and the file's size.

    Raises:
        DataError: as :func:`load_grey`; also when the image is smaller than ``min_side`` pixels
            on a side (``<name>: image is 1x1 pixels, smaller than the 32-pixel minimum``).
    """
    return _open_grey(src, name, (max_side, min_side))


def _open_grey(src: Source, name: str | None, bounds: Optional[tuple[int, int]]):
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(src) == 0:
            raise DataError(f"{label}: empty file (0 bytes)")
        fp: object = io.BytesIO(bytes(src))
    else:
        label = name or os.fspath(src)
        fp = Path(src)
        if not fp.is_file():
            raise DataError(f"{label}: no such file")
        if fp.stat().st_size == 0:
            raise DataError(f"{label}: empty file (0 bytes)")
    if _dicom_source(src, fp, label):
        return _open_dicom(src, label, bounds)
    # Truncated files must fail, not decode into a half-grey image (Pillow's global switch).
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(fp) as im:  # type: ignore[arg-type]
            if bounds is None:
                im.load()
                return to_grey(im)
            return _bounded(im, label, *bounds)
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not a readable image (format not recognised)") from None
    except _DECODE_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DataError(f"{label}: not a readable image ({reason})") from None


def _dicom_source(src: Source, fp, label: str) -> bool:
    """A DICOM file: its marker (the first 132 bytes) or its name (:func:`dicom.is_dicom`)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return dicom.is_dicom(bytes(memoryview(src)[:132]), label)
    with open(fp, "rb") as f:
        return dicom.is_dicom(f.read(132), label)


def _open_dicom(src: Source, label: str, bounds: Optional[tuple[int, int]]):
    """:func:`dicom.read_dicom`'s pixels; with ``bounds``, reduced as :func:`_bounded` does
    (after decoding: DICOM codecs have no reduced decode)."""
    grey = dicom.read_dicom(src, name=label).pixels
    if bounds is None:
        return grey
    max_side, min_side = bounds
    H, W = grey.shape
    if min(W, H) < min_side:
        raise DataError(f"{label}: image is {W}x{H} pixels, smaller than the {min_side}-pixel "
                        "minimum")
    factor = -(-max(W, H) // max_side)
    if factor > 1:
        grey = np.array(Image.fromarray(grey, mode="L").reduce(factor), dtype=np.uint8)
    return grey, (H, W)


def _bounded(im: Image.Image, label: str, max_side: int,
             min_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``im`` (opened, not loaded) reduced so its longer side is ``<= max_side``."""
    W, H = im.size
    if min(W, H) < min_side:
        raise DataError(f"image is {W}x{H} pixels, smaller than the {min_side}-pixel minimum")
    factor = -(-max(W, H) // max_side)  # ceil
    if factor > 1 and im.format == "JPEG":
        # the decoder scales by 1/2, 1/4 or 1/8 while decoding (never below the size asked)
        im.draft(None, (max(1, W // factor), max(1, H // factor)))  # None: keep the mode
    im.load()
    left = -(-max(im.size) // max_side)
    if left > 1:
        im = im.reduce(left)
    return to_grey(im), (H, W)


def to_grey(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to a ``uint8 (H, W)`` grey array.

    - ``L``: as is; ``1``: 0/255; ``P``/``PA``: palette expanded, then luma.
    - ``RGB``/``RGBA``/``LA``/``CMYK``/``YCbCr``/…: alpha dropped, ITU-R 601 luma
      (``L = (19595 R + 38470 G + 7471 B + 2**15) >> 16``, exact when R = G = B).
    - ``I;16*`` (16-bit grey) and ``I`` (32-bit int): divided by ``2**b - 1`` where ``b`` is the
      smallest of 8, 10, 12, 14, 16 bits holding the image's maximum (so 12-bit data stored in
      16-bit containers uses the whole 0..255 range, and 8-bit data in a 16-bit file is
      unchanged). Integers outside 0..65535 fall back to min/max scaling.
    - ``F`` (32-bit float): min/max scaled to 0..255 (a constant image gives zeros).
    """
    if im.width == 0 or im.height == 0:
        raise DataError("empty image (0 pixels)")
    mode = im.mode
    if mode == "L":
        return np.array(im, dtype=np.uint8)
    if mode == "1":
        return np.array(im.convert("L"), dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 0xFFFF:
            bits = next(b for b in (8, 10, 12, 14, 16) if hi < (1 << b))
            scale = 255.0 / ((1 << bits) - 1)
            return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return _minmax_u8(a.astype(np.float64))
    if mode == "F":
        return _minmax_u8(np.asarray(im, dtype=np.float64))
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
    if mode in ("LA", "La"):
        return np.array(im.getchannel(0), dtype=np.uint8)
    if im.mode in ("RGBA", "RGBa", "RGBX"):
        im = im.convert("RGB")
    return np.array(im.convert("L"), dtype=np.uint8)


def _minmax_u8(a: np.ndarray) -> np.ndarray:
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(finite, a, lo)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _check_2d_u8(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"{what}: expected a uint8 array (H, W), got {a.dtype} {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what}: empty array {a.shape}")
    return np.ascontiguousarray(a)


def resize_image(a: np.ndarray, size: int) -> np.ndarray:
    """Resize a grey image to ``(size, size)`` (aspect ratio not kept, as in the paper).

    Per axis: the area filter (``Image.BOX``, an exact pixel-area average) when shrinking, bicubic
    when enlarging; when one axis shrinks and the other grows, the two axes are resized in two
    passes with their own filter.

    Args:
        a: ``uint8 (H, W)`` (a trailing channel axis of 1 is accepted).
        size: output side length, ``>= 1``.

    Returns:
        ``uint8 (size, size)``, a new array.
    """
    a = _check_2d_u8(a, "resize_image")
    if size < 1:
        raise ValueError(f"resize_image: size must be >= 1, got {size}")
    h, w = a.shape
    if h == size and w == size:
        return a.copy()
    im = Image.fromarray(a, mode="L")

    def filt(src: int) -> int:
        return Image.Resampling.BOX if src > size else Image.Resampling.BICUBIC

    if (h >= size and w >= size) or (h <= size and w <= size):
        # one pass; the filter only matters on axes that change
        f = Image.Resampling.BOX if max(h, w) > size else Image.Resampling.BICUBIC
        im = im.resize((size, size), resample=f)
    else:
        im = im.resize((size, h), resample=filt(w))
        im = im.resize((size, size), resample=filt(h))
    return np.array(im, dtype=np.uint8)


#: side of the grey thumbnail :func:`perceptual_hash` works on (independent of the stored size)
PHASH_THUMB = 64
#: bits of :func:`perceptual_hash` (16 x 16 DCT coefficients)
PHASH_BITS = 256
_DCT: Optional[np.ndarray] = None


def perceptual_hash(a: np.ndarray) -> bytes:
    """256-bit perceptual hash (a pHash) of a grey image: similar pictures, near hashes.

    The image is area-resized to a ``64 x 64`` thumbnail (:func:`resize_image`) and transformed
    with an orthonormal 2-D DCT-II; the 16 x 16 coefficients of frequencies 1..16 on both axes
    (the DC row and column left out: every chest X-ray shares them) are compared with their
    median, bit ``16 * u + v`` (most significant bit of byte 0 first) is 1 where the
    coefficient is above it. Measured on Kermany (docs/BENCHMARKS.md, "Near duplicates"): resized,
    re-encoded (JPEG q30-90) and gamma-changed copies land <= 24 bits from the original;
    distinct images >= 44 bits (mean 121). A 64-bit hash (8 x 8 coefficients) separates chest
    X-rays poorly: 1.3e-5 of distinct Kermany pairs within 4 bits.

    Args:
        a: ``uint8 (H, W)``, any size (the original decoded image, not the prepared one).

    Returns:
        32 bytes (the ``phash`` column; Hamming distance: :mod:`multimix.data.overlap`).
    """
    global _DCT
    if _DCT is None:
        n = PHASH_THUMB
        k = np.arange(n)[:, None]
        m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
        m[0] /= np.sqrt(2.0)
        _DCT = m[1:17]  # only the rows of frequencies 1..16 are needed
    t = resize_image(a, PHASH_THUMB).astype(np.float64)
    c = _DCT @ t @ _DCT.T
    return np.packbits((c > np.median(c)).reshape(-1)).tobytes()


#: default of :func:`binarize_mask` (``prepare --mask-threshold``): a pixel > 127 is foreground
MASK_THRESHOLD = 127


def binarize_mask(a: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Mask of any 8-bit encoding → ``uint8`` {0, 1}.

    0/1 masks (maximum ≤ 1) are kept; anything else is thresholded: a pixel is foreground when
    its value is ``> threshold`` (default 127, the middle of the 8-bit range), so 0/255 masks and
    lossy-compressed masks with values near 0 and 255 both come out clean.
    """
    a = _check_2d_u8(a, "binarize_mask")
    if a.max(initial=0) <= 1:
        return a.copy()
    return (a > threshold).astype(np.uint8)


def mask_levels(a: np.ndarray) -> Optional[dict]:
    """``None`` for a binary mask (at most two grey levels, the lower one 0, or one level);
    else ``{"levels": distinct values, "mid_fraction": share of pixels strictly between the
    lowest and highest level}`` (a grey-level gradient, an anti-aliased or soft mask).

    Args:
        a: ``uint8 (H, W)`` as read from the file.
    """
    counts = np.bincount(np.asarray(a, np.uint8).ravel(), minlength=256)
    levels = np.flatnonzero(counts)
    if len(levels) <= 1 or (len(levels) == 2 and levels[0] == 0):
        return None
    mid = counts[levels[0] + 1:levels[-1]].sum()
    return {"levels": int(len(levels)), "mid_fraction": round(float(mid / counts.sum()), 4)}


def resize_mask(a: np.ndarray, size: int, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Binarise (see :func:`binarize_mask`) and resize a mask to ``(size, size)``, nearest neighbour.

    Returns:
        ``uint8 (size, size)`` with values in {0, 1}.
    """
    m = binarize_mask(a, threshold)
    if size < 1:
        raise ValueError(f"resize_mask: size must be >= 1, got {size}")
    if m.shape == (size, size):
        return m
    im = Image.fromarray(m, mode="L").resize((size, size), resample=Image.Resampling.NEAREST)
    return np.array(im, dtype=np.uint8)


#: zlib level of :func:`encode_png` (256² Kermany X-rays stored with filter 0, measured here):
#: level 0 ("stored" deflate blocks) writes 64 KB per image and inflates in ~0.09 ms, levels 1-9
#: give ~46 KB (within 2 % of each other) and take ~0.24-0.29 ms to inflate; level 1 encodes 2x
#: faster than 6. Images are decoded for every row of every epoch, so ``multimix prepare``
#: stores them at :data:`IMAGE_PNG_LEVEL` unless told otherwise (``--png-level``).
PNG_LEVEL = 1

#: ``multimix prepare``'s default level for images: decoding 3-7x faster for 1.4x the bytes
IMAGE_PNG_LEVEL = 0

#: level for masks (0/255): ~2 KB at level 1 against 64 KB stored, and faster to inflate
#: (0.06 ms against 0.12 ms), so masks are always compressed
MASK_PNG_LEVEL = 1

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_U32 = struct.Struct(">I")
_IHDR = struct.Struct(">IIBBBBB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return b"".join((_U32.pack(len(payload)), kind, payload,
                     _U32.pack(zlib.crc32(payload, zlib.crc32(kind)) & 0xFFFFFFFF)))


def encode_png(a: np.ndarray, compress_level: int = PNG_LEVEL) -> bytes:
    """``uint8 (H, W)`` → 8-bit grey PNG bytes (lossless). Store masks as 0/255 (``m * 255``).

    A standard PNG (signature, IHDR, one IDAT, IEND; any reader opens it) written with filter
    type 0 (None) on every row: Pillow's adaptive filters (mostly Paeth) shrink X-rays by ~40 %
    but make decoding ~2x slower, and decoding runs for every row of every epoch while the
    bytes are written once. :func:`decode_png` reads these files without Pillow (inflate + a
    numpy view).
    """
    a = _check_2d_u8(a, "encode_png")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"encode_png: compress_level must be 0..9, got {compress_level}")
    h, w = a.shape
    raw = np.empty((h, w + 1), np.uint8)
    raw[:, 0] = 0  # filter type None on every scanline
    raw[:, 1:] = a
    return b"".join((
        _PNG_SIGNATURE,
        _png_chunk(b"IHDR", _IHDR.pack(w, h, 8, 0, 0, 0, 0)),  # 8-bit grey, no interlace
        _png_chunk(b"IDAT", zlib.compress(raw.data, compress_level)),
        _png_chunk(b"IEND", b""),
    ))


try:  # Intel ISA-L's inflate (python-isal): same zlib format, ~1.6x faster here than zlib
    from isal import isal_zlib as _inflate

    _INFLATE_ERRORS: tuple = (zlib.error, _inflate.error)
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate = zlib
    _INFLATE_ERRORS = (zlib.error,)


def _decode_png_fast(data) -> Optional[np.ndarray]:
    """The pixels of an 8-bit grey, non-interlaced PNG whose rows all use filter 0, as a
    read-only ``(H, W)`` view of the inflated scanlines; ``None`` for anything else (other
    PNGs, damaged or truncated data: Pillow then decodes it or names the problem).

    Checks what Pillow checks: the signature, in-bounds chunks, the IHDR CRC, an IEND, and the
    zlib stream (its Adler-32 and exact length). IDAT CRCs are not checked (Pillow does not
    either; the zlib checksum covers the pixels).
    """
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:  # e.g. Arrow buffers export signed bytes ("b")
        mv = mv.cast("B")
    n = len(mv)
    if n < 8 + 25 + 12 or mv[:8] != _PNG_SIGNATURE:
        return None
    if mv[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    if _U32.unpack_from(mv, 29)[0] != zlib.crc32(mv[12:29]) & 0xFFFFFFFF:
        return None
    w, h, depth, colour, comp, filt, interlace = _IHDR.unpack_from(mv, 16)
    if depth != 8 or colour != 0 or comp or filt or interlace or not w or not h:
        return None
    pos, idat, ended, after_idat = 33, [], False, False
    while pos + 12 <= n:
        length = _U32.unpack_from(mv, pos)[0]
        kind = bytes(mv[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > n:
            return None
        if kind == b"IDAT":
            if after_idat:
                return None
            idat.append(mv[pos + 8:end - 4])
        elif kind == b"IEND":
            ended = True
            break
        else:
            if idat:
                after_idat = True
            if not 65 <= kind[0] <= 122 or kind[0] <= 90:  # a critical chunk (PLTE, ...)
                return None
        pos = end
    if not ended or not idat:
        return None
    expected = h * (w + 1)
    try:
        d = _inflate.decompressobj()
        raw = d.decompress(idat[0] if len(idat) == 1 else b"".join(idat), expected)
        if not d.eof or d.unconsumed_tail or len(raw) != expected:
            return None
    except _INFLATE_ERRORS:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(h, w + 1)
    if rows[:, 0].any():
        return None  # some row uses a real filter: Pillow undoes it
    return rows[:, 1:]


def decode_png(data: bytes, name: str | None = None) -> np.ndarray:
    """Stored image bytes (normally from :func:`encode_png`) → ``uint8 (H, W)``.

    Fast path (no Pillow) for 8-bit grey, non-interlaced PNGs with filter 0 on every row (what
    :func:`encode_png` writes); other 8-bit grey PNGs through Pillow; any other image through
    :func:`load_grey`. The result is the same, bit for bit, on every path.

    Raises:
        DataError: the bytes are not a decodable image (named by ``name`` when given).
    """
    if data is None:
        raise DataError(f"{name or '<bytes>'}: no image data (null)")
    try:
        fast = _decode_png_fast(data)
    except (TypeError, ValueError, struct.error):
        fast = None
    if fast is not None:
        return np.array(fast)  # contiguous, writable
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "L":
                im.load()
                return np.array(im, dtype=np.uint8)
    except _DECODE_ERRORS:
        pass  # load_grey names the problem
    return load_grey(bytes(data), name=name)


def decode_mask_png(data: bytes, name: str | None = None) -> np.ndarray:
    """Stored mask bytes (0/255 PNG) → ``uint8 (H, W)`` with values {0, 1}."""
    return binarize_mask(decode_png(data, name=name))
