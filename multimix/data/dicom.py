"""DICOM radiographs → 8-bit grey, the way a viewer displays them (pydicom; no Ray, no torch).

Used through :mod:`multimix.data.images` (``load_grey`` and ``load_grey_bounded`` recognise a
DICOM file by its ``DICM`` marker or a ``.dcm``/``.dicom`` name) by ``multimix prepare`` and
``multimix predict``. The pixel pipeline, in the order of DICOM PS3.3 C.11:

1. **Stored values** (``pixel_array``): 8–16 bits allocated, any ``BitsStored``, unsigned or
   signed (``PixelRepresentation``); uncompressed, deflated, or compressed with RLE (pydicom),
   JPEG baseline/extended/lossless and JPEG-LS (pylibjpeg-libjpeg), JPEG 2000 and HTJ2K
   (pylibjpeg-openjpeg). Any other transfer syntax (MPEG/H.264/HEVC video, JPEG 2000 Part 2,
   JPIP, or a plugin missing) is a :class:`DataError` naming it.
2. **Modality LUT**: ``RescaleSlope``/``RescaleIntercept``, or a ``ModalityLUTSequence``.
3. **VOI LUT**: a ``VOILUTSequence`` (its first LUT; output scaled from its bit depth), else the
   first ``WindowCenter``/``WindowWidth`` with its ``VOILUTFunction`` (``LINEAR``,
   ``LINEAR_EXACT``, ``SIGMOID``) mapped to 0..255, else (no window, or a width ≤ 0) **the
   stored bits' range** — ``0 .. 2^BitsStored − 1`` (signed: ``−2^(BitsStored−1) ..
   2^(BitsStored−1) − 1``) through the modality LUT — linearly to 0..255. So an 8-bit image
   without a window keeps its grey levels, and 12-bit data is never clipped at 255.
4. **MONOCHROME1** (minimum = white) is inverted, so bone is bright as in every other image.
   RGB/YBR images become ITU-R 601 luma as other colour images do; ``PALETTE COLOR`` and other
   photometric interpretations are refused.

Refused with a one-line reason (``prepare`` reports the file as a bad row): files without pixel
data (structured reports, presentation states, key-object selections: the SOP class is named),
multi-frame images (``NumberOfFrames`` > 1: tomosynthesis, cine), undecodable pixel data.

Nothing but the pixels and :data:`PIXEL_TAGS` is read into what this module returns; the one
other header value it hands out is the view (``ViewPosition``, :func:`view_position`). Error
messages name tags and UIDs, never a header value that could identify a patient.
"""

from __future__ import annotations

import io
import os
import posixpath
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from multimix.errors import DataError

__all__ = ["DICOM_EXTENSIONS", "PIXEL_TAGS", "DicomImage", "is_dicom", "read_dicom",
           "view_position", "NO_VIEW"]

#: file extensions (lower case) that name DICOM files (others are recognised by their marker)
DICOM_EXTENSIONS = (".dcm", ".dicom")

#: the header tags the pixels are computed from (nothing else of the header is used)
PIXEL_TAGS = ("TransferSyntaxUID", "SOPClassUID", "Rows", "Columns", "SamplesPerPixel",
              "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
              "PixelRepresentation", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
              "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
              "VOILUTSequence", "PixelData", "ViewPosition")

#: the view of a DICOM file without a (non-empty) ``ViewPosition`` (``prepare --views``)
NO_VIEW = "NONE"

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


@dataclass(frozen=True)
class DicomImage:
    """A decoded radiograph: ``pixels`` ``uint8 (H, W)`` (bone bright; None when its view was
    not asked for), ``view`` the ``ViewPosition`` upper-cased (``PA``, ``AP``, ``LL`` …;
    :data:`NO_VIEW` when absent)."""

    pixels: Optional[np.ndarray]
    view: str


def is_dicom(data: Union[bytes, bytearray, memoryview], name: Optional[str] = None) -> bool:
    """A DICOM file: the ``DICM`` marker at byte 128 (Part 10 files), or a ``.dcm``/``.dicom``
    name (files written without the 128-byte preamble)."""
    if len(data) >= 132 and bytes(data[128:132]) == b"DICM":
        return True
    return bool(name) and posixpath.splitext(str(name))[1].lower() in DICOM_EXTENSIONS


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401 - the LUT functions
    except ImportError:  # pragma: no cover - a core dependency
        raise DataError("reading DICOM needs pydicom: pip install pydicom pylibjpeg "
                        "pylibjpeg-libjpeg pylibjpeg-openjpeg") from None
    # no validation of header values on read: its warnings and log lines quote the values
    # (a malformed PatientName would be printed) and nothing here uses them
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def _open(data: bytes, label: str):
    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():  # pydicom's warnings can quote header values
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom's parse errors are of many kinds
        raise DataError(f"{label}: not a readable DICOM file ({type(exc).__name__})") from None


def view_position(ds) -> str:
    """``ViewPosition`` (0018,5101) stripped and upper-cased; :data:`NO_VIEW` when the tag is
    absent or empty."""
    v = ds.get("ViewPosition", None)
    v = str(v).strip().upper() if v is not None and v != "" else ""
    return v or NO_VIEW


def _sop_class(ds) -> str:
    uid = ds.get("SOPClassUID", None)
    if uid is None:
        return "no SOP class"
    name = getattr(uid, "name", "") or ""
    return f"SOP class {name} ({uid})" if name and name != str(uid) else f"SOP class {uid}"


def read_dicom(src: Source, name: Optional[str] = None,
               views: Optional[frozenset] = None) -> DicomImage:
    """Decode a DICOM radiograph (module docstring: the LUTs, MONOCHROME1, what is refused).

    Args:
        src: a path or the file's bytes.
        name: how errors name the file.
        views: when given, a file whose :func:`view_position` is not in it is not decoded:
            its ``pixels`` are None.

    Raises:
        DataError: ``<name>: <reason>`` (no pixel data, multi-frame, unsupported transfer
            syntax or photometric interpretation, damaged pixel data).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        label, data = name or "<bytes>", bytes(src)
    else:
        label = name or os.fspath(src)
        with open(src, "rb") as f:
            data = f.read()
    ds = _open(data, label)
    view = view_position(ds)
    if views is not None and view not in views:
        return DicomImage(None, view)
    if "PixelData" not in ds:
        raise DataError(f"{label}: a DICOM without an image ({_sop_class(ds)}); "
                        "only radiographs are read")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise DataError(f"{label}: multi-frame DICOM ({frames} frames); only single-frame "
                        "radiographs are read")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB") and \
            not photometric.startswith("YBR"):
        raise DataError(f"{label}: photometric interpretation {photometric or '(missing)'} is "
                        "not read (MONOCHROME1, MONOCHROME2, RGB, YBR_*)")
    arr = _stored(ds, label)
    if arr.ndim == 3:  # colour: pydicom converts YBR to RGB; ITU-R 601 luma as Pillow's "L"
        if arr.shape[-1] != 3:
            raise DataError(f"{label}: {arr.shape[-1]} samples per pixel; 1 or 3 are read")
        a = arr.astype(np.int64)
        if int(ds.get("BitsStored", 8)) > 8:
            a = a >> (int(ds.BitsStored) - 8)
        luma = (19595 * a[..., 0] + 38470 * a[..., 1] + 7471 * a[..., 2] + (1 << 15)) >> 16
        return DicomImage(np.clip(luma, 0, 255).astype(np.uint8), view)
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{label}: pixel data of shape {arr.shape}, not one 2-D image")
    grey = _display(ds, arr, label)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return DicomImage(grey, view)


def _stored(ds, label: str) -> np.ndarray:
    """The stored values, decoded; a missing decoder is named by its transfer syntax."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        if ts is not None and ("transfer syntax" in str(exc).lower()
                               or "plugin" in str(exc).lower()):
            tname = getattr(ts, "name", "") or str(ts)
            raise DataError(f"{label}: DICOM pixel data compressed as {tname} ({ts}), which no "
                            "installed decoder reads (read: uncompressed, deflated, RLE, JPEG, "
                            "JPEG-LS, JPEG 2000, HTJ2K)") from None
        raise DataError(f"{label}: DICOM pixel data cannot be decoded "
                        f"({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - truncated/damaged data: many kinds
        raise DataError(f"{label}: DICOM pixel data cannot be decoded "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None


def _display(ds, arr: np.ndarray, label: str) -> np.ndarray:
    """Modality LUT, then VOI LUT (or window, or the stored bits' range) → ``uint8``."""
    import pydicom.pixels as px

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = px.apply_modality_lut(arr, ds)
        except Exception as exc:  # noqa: BLE001 - a malformed LUT
            raise DataError(f"{label}: the modality LUT cannot be applied "
                            f"({type(exc).__name__})") from None
    mod = np.asarray(mod, dtype=np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = np.asarray(px.apply_voi(np.rint(mod).astype(np.int64), ds, index=0),
                                 dtype=np.float64)
            desc = item.LUTDescriptor
            lut_max = float(np.max(np.asarray(item.LUTData)))
            bits = max(int(desc[2]), int(lut_max).bit_length(), 1)
        except Exception as exc:  # noqa: BLE001 - a malformed LUT
            raise DataError(f"{label}: the VOI LUT sequence cannot be applied "
                            f"({type(exc).__name__})") from None
        y = out * (255.0 / ((1 << bits) - 1))
    else:
        window = _window(ds)
        if window is not None:
            y = _apply_window(mod, *window)
        else:
            lo, hi = _stored_range(ds)
            y = (mod - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(mod)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _first(v) -> Optional[float]:
    """The first value of a (possibly multi-valued) numeric tag; None when absent or not a
    number."""
    if v is None or isinstance(v, (str, bytes)) and not str(v).strip():
        return None
    try:
        if not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):
            v = v[0] if len(v) else None
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _window(ds) -> Optional[tuple[float, float, str]]:
    """``(center, width, function)`` of the first window; None when absent or unusable."""
    c, w = _first(ds.get("WindowCenter", None)), _first(ds.get("WindowWidth", None))
    if c is None or w is None or not np.isfinite(c) or not np.isfinite(w):
        return None
    fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if fn not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        fn = "LINEAR"
    if w <= 0 or (fn == "LINEAR" and w < 1):
        return None
    return c, w, fn


def _apply_window(x: np.ndarray, c: float, w: float, fn: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 onto 0..255."""
    if fn == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if fn == "LINEAR_EXACT":
        return np.clip(((x - c) / w + 0.5) * 255.0, 0, 255)
    if w == 1:
        return np.where(x <= c - 0.5, 0.0, 255.0)
    return np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0, 255)


def _stored_range(ds) -> tuple[float, float]:
    """The range of values the stored bits can hold, through the modality LUT."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        lut = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        return float(lut.min()), float(lut.max())
    slope = _first(ds.get("RescaleSlope", None))
    icpt = _first(ds.get("RescaleIntercept", None))
    slope = 1.0 if slope is None else slope
    icpt = 0.0 if icpt is None else icpt
    a, b = lo * slope + icpt, hi * slope + icpt
    return min(a, b), max(a, b)
