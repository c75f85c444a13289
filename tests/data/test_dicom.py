"""DICOM in ``multimix prepare``: real radiographs (Kermany JPEGs) written as DICOM the way
archives store them (12-bit with a rescale and a window, MONOCHROME1 inverted storage, signed
16-bit without a window, a VOI LUT sequence, RLE / JPEG 2000 compressed) come out as the same
pixels as the JPEGs; laterals are left out under ``--views PA,AP`` and counted; planted patient
data appears in no output file; non-image, multi-frame and undecodable DICOMs are bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq

from multimix.data import dicom
from multimix.data.images import decode_png, load_grey, load_grey_bounded
from multimix.data.prepare import prepare
from multimix.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (UID, ExplicitVRLittleEndian, JPEG2000Lossless,  # noqa: E402
                         RLELossless, generate_uid)

SIZE = 64
PHI_NAME = "Zyxwvplanted^Quentina"
PHI_ID = "PHIID-99887766"
PHI = (PHI_NAME, PHI_ID, "Zyxwvplanted", "19010203", "ACC-PHI-5544", "Planted General Hospital")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def write_dicom(path: Path, stored: np.ndarray, *, photometric="MONOCHROME2", bits=8,
                signed=False, slope=None, intercept=None, window=None, voi_lut=None,
                view="PA", frames=1, syntax=ExplicitVRLittleEndian, sop=CT_IMAGE,
                pixels=True) -> Path:
    """A DICOM file with planted patient data (:data:`PHI`) and the given pixel encoding."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI_NAME, PHI_ID, PHI[3]
    ds.AccessionNumber, ds.InstitutionName = PHI[4], PHI[5]
    ds.Modality = "DX"
    if view is not None:
        ds.ViewPosition = view
    if pixels:
        ds.Rows, ds.Columns = stored.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated = 8 if bits <= 8 else 16
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.PixelRepresentation = int(signed)
        dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[
            (ds.BitsAllocated, signed)]
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if voi_lut is not None:
            item = Dataset()
            item.LUTDescriptor = [len(voi_lut), 0, 16]
            item.add_new((0x0028, 0x3006), "US", [int(v) for v in voi_lut])  # LUTData
            ds.VOILUTSequence = Sequence([item])
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless
                        else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _encodings(g: np.ndarray) -> dict:
    """name → (stored pixels, write_dicom keywords) that all display as ``g`` (uint8)."""
    g16 = g.astype(np.int64)
    return {
        "mono2_8bit": (g, {}),
        # 12-bit, rescaled to -1024.., window mapping it back exactly (PS3.3 LINEAR)
        "mono2_12bit_window": (g16 * 16, dict(bits=12, slope=1, intercept=-1024,
                                              window=(1016.5, 4081))),
        # MONOCHROME1: stored inverted (high = dark), 12-bit, with a window
        "mono1_12bit_window": (16 * (255 - g16), dict(photometric="MONOCHROME1", bits=12,
                                                      window=(2040.5, 4081))),
        # signed 16-bit, slope 2, no window: the stored bits' range
        "signed16_no_window": (g16 * 257 - 32768, dict(bits=16, signed=True, slope=2,
                                                       intercept=-1000)),
        # 12-bit without a window: the stored bits' range (0..4095), never clipped
        "mono2_12bit_range": (g16 * 16 + 8, dict(bits=12)),
        # a VOI LUT sequence (16-bit output) over 12-bit data
        "mono2_voi_lut": (g16 * 16, dict(bits=12, voi_lut=np.arange(4096) // 16 * 257)),
        "rle_12bit_window": (g16 * 16, dict(bits=12, slope=1, intercept=-1024,
                                            window=(1016.5, 4081), syntax=RLELossless)),
        "j2k_mono1": (16 * (255 - g16), dict(photometric="MONOCHROME1", bits=12,
                                             window=(2040.5, 4081), syntax=JPEG2000Lossless)),
    }


@pytest.fixture(scope="module")
def radiographs(shared_data) -> dict:
    """Four real Kermany radiographs (two per class): path → grey pixels."""
    root = shared_data / "kermany-cxr" / "train"
    files = [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((root / cls).glob("*.jpeg"))[:2]]
    return {p: load_grey(p) for p in files}


@pytest.mark.realdata
def test_every_encoding_decodes_to_the_jpegs_pixels(radiographs, tmp_path):
    g = next(iter(radiographs.values()))
    for name, (stored, kw) in _encodings(g).items():
        path = write_dicom(tmp_path / f"{name}.dcm", stored, **kw)
        got = load_grey(path)
        assert got.shape == g.shape, name
        diff = np.abs(got.astype(int) - g.astype(int))
        assert diff.max() <= 1, (name, diff.max())  # lossless and exact up to rounding
        # the same from bytes, and through predict's bounded loader (no reduction at 224 px)
        assert np.array_equal(load_grey(path.read_bytes(), name="x"), got), name
        bounded, orig = load_grey_bounded(path, 2048, 32)
        assert np.array_equal(bounded, got) and orig == g.shape, name
    # the bounded loader reduces a large DICOM (outputs at the reduced size)
    big = np.kron(g, np.ones((10, 10), np.uint8))  # 2240 px
    red, orig = load_grey_bounded(write_dicom(tmp_path / "big.dcm", big), 2048, 32)
    assert orig == big.shape and red.shape == (1120, 1120)
    assert np.abs(red.astype(int) - np.kron(g, np.ones((5, 5), np.uint8))).max() <= 1


def test_window_functions_and_inversion_on_synthetic_pixels(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.int64), (40, 1))  # 40 x 256, 12-bit
    # a narrow window saturates outside it: below -> 0, above -> 255, linear inside
    p = write_dicom(tmp_path / "narrow.dcm", ramp, bits=12, window=(2048, 1024))
    got = load_grey(p)[0].astype(int)
    assert got[ramp[0] <= 1536].max() == 0 and got[ramp[0] >= 2560].min() == 255
    inside = (ramp[0] > 1600) & (ramp[0] < 2500)
    assert np.all(np.diff(got[inside]) >= 0) and got[ramp[0] == 2048][0] in (127, 128)
    # the same as MONOCHROME1: the exact complement (bone bright)
    p1 = write_dicom(tmp_path / "narrow1.dcm", ramp, bits=12, window=(2048, 1024),
                     photometric="MONOCHROME1")
    assert np.array_equal(load_grey(p1)[0].astype(int), 255 - got)
    # a window of width <= 0 is unusable: the stored bits' range applies
    p0 = write_dicom(tmp_path / "w0.dcm", ramp, bits=12, window=(2048, 0))
    assert np.abs(load_grey(p0)[0].astype(int) - ramp[0] * 255 / 4095).max() <= 0.5 + 1e-9


def test_bad_dicoms_are_one_line_errors_naming_the_reason(tmp_path):
    img = np.zeros((40, 40), np.uint8)
    cases = {
        "sr.dcm": (dict(sop=BASIC_TEXT_SR, pixels=False), "without an image (SOP class Basic "
                                                           "Text SR"),
        "multi.dcm": (dict(frames=2), "multi-frame DICOM (2 frames)"),
        "colour.dcm": (dict(photometric="PALETTE COLOR"), "PALETTE COLOR is not read"),
    }
    for name, (kw, expect) in cases.items():
        stored = np.zeros((2, 40, 40), np.uint8) if kw.get("frames") else img
        p = write_dicom(tmp_path / name, stored, **kw)
        with pytest.raises(DataError) as e:
            load_grey(p)
        assert str(e.value).startswith(f"{p}: ") and expect in str(e.value), str(e.value)
        assert "\n" not in str(e.value) and PHI_ID not in str(e.value)
    # a transfer syntax no installed decoder reads: named, with its UID
    p = write_dicom(tmp_path / "mpeg.dcm", img)
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 MP@ML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(DataError, match=r"compressed as MPEG2 Main Profile / Main Level "
                                        r"\(1\.2\.840\.10008\.1\.2\.4\.100\), which no installed"):
        load_grey(p)
    # truncated pixel data
    data = write_dicom(tmp_path / "t.dcm", img).read_bytes()
    (tmp_path / "t.dcm").write_bytes(data[:-500])
    with pytest.raises(DataError, match="t.dcm: "):
        load_grey(tmp_path / "t.dcm")
    # a view is read from the header, upper-cased; absent -> NONE
    assert dicom.read_dicom(write_dicom(tmp_path / "v.dcm", img, view="LL ")).view == "LL"
    assert dicom.read_dicom(write_dicom(tmp_path / "n.dcm", img, view=None)).view == "NONE"


@pytest.mark.realdata
def test_prepare_dicom_same_pixels_views_and_no_phi(radiographs, tmp_path, capsys):
    """The issue's acceptance: DICOMs (MONOCHROME1 and 2, 12-bit windowed, compressed, planted
    PHI, one lateral, one without a view, a structured report, a multi-frame file) prepare to
    the JPEGs' pixels (MAD <= 3 at 64 px); the lateral is left out under --views PA,AP and
    counted; the bad files are rows of report.json; no planted PHI in any output file."""
    jpeg_root, dcm_root = tmp_path / "jpeg", tmp_path / "dcm"
    names = list(_encodings(next(iter(radiographs.values()))))
    expected = {}
    for i, (src, g) in enumerate(radiographs.items()):
        cls = src.parent.name
        enc = names[i * 2:(i * 2) + 2] if i < 3 else names[6:]
        for name in enc:
            stored, kw = _encodings(g)[name]
            write_dicom(dcm_root / cls / f"{src.stem}-{name}.dcm", stored, **kw)
            (jpeg_root / cls).mkdir(parents=True, exist_ok=True)
            (jpeg_root / cls / f"{src.stem}-{name}.jpeg").write_bytes(src.read_bytes())
            expected[f"{cls}/{src.stem}-{name}"] = name
    g = next(iter(radiographs.values()))
    write_dicom(dcm_root / "NORMAL" / "lateral.dcm", g, view="LL")
    write_dicom(dcm_root / "NORMAL" / "noview.dcm", g, view=None)
    write_dicom(dcm_root / "NORMAL" / "report.dcm", g, sop=BASIC_TEXT_SR, pixels=False)
    write_dicom(dcm_root / "PNEUMONIA" / "cine.dcm", np.stack([g, g]), frames=2)
    # in the same folder as the JPEGs (one tree of mixed files) and alone
    mj = prepare(str(jpeg_root), str(tmp_path / "out-jpeg"), image_size=SIZE, progress=False,
                 workers=1)
    md = prepare(str(dcm_root), str(tmp_path / "out-dcm"), image_size=SIZE, progress=False,
                 workers=2, views=["pa", "AP"])
    assert mj["num_rows"] == md["num_rows"] == len(expected) == 8
    rows = {}
    for out in ("out-jpeg", "out-dcm"):
        t = pq.read_table(tmp_path / out / "data").to_pylist()
        rows[out] = {r["id"]: decode_png(r["image"]).astype(int) for r in t}
    assert set(rows["out-dcm"]) == set(expected)
    for rid, name in expected.items():
        mad = np.abs(rows["out-dcm"][rid] - rows["out-jpeg"][rid]).mean()
        assert mad <= 3, (name, mad)
    rep = json.loads((tmp_path / "out-dcm" / "report.json").read_text())
    assert rep["views"]["left_out"] == {"LL": 1, "NONE": 1}
    assert rep["views"]["kept"] == {"PA": 8} and rep["views"]["filter"] == ["AP", "PA"]
    assert {f["path"] for f in rep["views"]["left_out_files"]} == {"NORMAL/lateral.dcm",
                                                                   "NORMAL/noview.dcm"}
    reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert set(reasons) == {"NORMAL/report.dcm", "PNEUMONIA/cine.dcm"}
    assert "without an image" in reasons["NORMAL/report.dcm"]
    assert "multi-frame" in reasons["PNEUMONIA/cine.dcm"]
    assert md["views_left_out"] == 2 and md["skipped"] == 2
    assert md["parameters"]["views"] == ["AP", "PA"]
    assert "2 DICOM file(s) of other views left out" in capsys.readouterr().err
    # NONE keeps the file without the tag; the lateral is still left out
    m2 = prepare(str(dcm_root), str(tmp_path / "out-none"), image_size=SIZE, progress=False,
                 workers=1, views=["PA", "NONE"])
    assert m2["num_rows"] == 9 and m2["views_left_out"] == 1
    # without --views every single-frame image is a row (the lateral too)
    assert prepare(str(dcm_root), str(tmp_path / "out-all"), image_size=SIZE, progress=False,
                   workers=1)["num_rows"] == 10
    # no planted patient data in any output file (manifest, report, shards), in any form
    for out in ("out-dcm", "out-none", "out-all"):
        for f in (tmp_path / out).rglob("*"):
            if f.is_file():
                body = f.read_bytes()
                for s in PHI:
                    assert s.encode() not in body, (f, s)
                    assert s.replace("^", " ").encode() not in body, (f, s)
