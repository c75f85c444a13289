"""multimix.data.images: decoding of any grey/colour/8/16-bit input, resizing, PNG round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from multimix.data.images import (
    binarize_mask,
    decode_mask_png,
    decode_png,
    encode_png,
    load_grey,
    resize_image,
    resize_mask,
)
from multimix.errors import DataError


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def grad() -> np.ndarray:
    """uint8 (20, 30) with many distinct values."""
    return (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)


def test_grey_png_round_trip_exact(grad, tmp_path):
    p = tmp_path / "g.png"
    p.write_bytes(_png(grad))
    for src in (p, str(p), p.read_bytes()):
        out = load_grey(src)
        assert out.dtype == np.uint8 and out.shape == (20, 30)
        np.testing.assert_array_equal(out, grad)


def test_rgb_with_grey_content_is_exact_and_colour_uses_luma(grad):
    rgb = np.stack([grad] * 3, axis=-1)
    np.testing.assert_array_equal(load_grey(_png(rgb)), grad)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200  # pure red → 601 luma ≈ 0.299 · 200
    assert load_grey(_png(colour))[0, 0] == round(0.299 * 200)


def test_rgba_alpha_is_dropped_and_palette_expanded(grad):
    rgba = np.dstack([grad, grad, grad, np.zeros_like(grad)])  # fully transparent
    np.testing.assert_array_equal(load_grey(_png(rgba, "RGBA")), grad)
    pal = Image.fromarray(np.stack([grad] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE,
                                                             colors=256)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    expect = np.asarray(pal.convert("L"))
    np.testing.assert_array_equal(load_grey(buf.getvalue()), expect)


def test_sixteen_bit_full_range_scaled_by_type_range():
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = load_grey(_png(a))  # Pillow writes uint16 arrays as 16-bit grey PNGs
    np.testing.assert_array_equal(out, [[0, 1, 128, 255]])


def test_sixteen_bit_twelve_bit_data_scaled_by_its_depth():
    a = np.array([[0, 1365, 2730, 4095]], dtype=np.uint16)  # 12-bit data in a 16-bit file
    np.testing.assert_array_equal(load_grey(_png(a)), [[0, 85, 170, 255]])


def test_sixteen_bit_container_with_eight_bit_values_unchanged():
    a = np.array([[0, 17, 200, 255]], dtype=np.uint16)
    np.testing.assert_array_equal(load_grey(_png(a)), [[0, 17, 200, 255]])


def test_float_tiff_min_max_scaled(tmp_path):
    a = np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)
    p = tmp_path / "f.tiff"
    Image.fromarray(a, mode="F").save(p)
    np.testing.assert_array_equal(load_grey(p), [[0, 128, 255]])


def test_truncated_jpeg_fails_with_the_name_even_if_pillow_was_told_to_tolerate_it(tmp_path):
    rng = np.random.default_rng(0)
    data = _jpeg(rng.integers(0, 255, (64, 64), dtype=np.uint8))
    p = tmp_path / "cut.jpeg"
    p.write_bytes(data[: len(data) // 2])
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # some other library flipped the global switch
    try:
        with pytest.raises(DataError, match="cut.jpeg.*not a readable image"):
            load_grey(p)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_garbage_missing_and_empty_inputs_raise_data_error(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="x.png: not a readable image"):
        load_grey(p)
    with pytest.raises(DataError, match="nope.png: no such file"):
        load_grey(tmp_path / "nope.png")
    with pytest.raises(DataError, match="<bytes>"):
        load_grey(b"")
    with pytest.raises(DataError, match="row 7"):
        load_grey(b"\x89PNG\r\n\x1a\n garbage", name="row 7")


def test_resize_image_shrinks_with_exact_area_average():
    a = np.zeros((8, 8), np.uint8)
    a[:4, :4] = 100
    a[:4, 4:] = np.array([[0, 40], [80, 120]], np.uint8).repeat(2, 0).repeat(2, 1)  # mean 60
    out = resize_image(a, 2)
    assert out.dtype == np.uint8 and out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[100, 60], [0, 0]])


def test_resize_image_enlarges_and_handles_mixed_axes():
    const = np.full((10, 40), 77, np.uint8)
    for size in (5, 20, 64):
        out = resize_image(const, size)
        assert out.shape == (size, size) and out.dtype == np.uint8
        assert (out == 77).all()  # no ringing/shift on a constant image, any filter
    ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    up = resize_image(ramp, 64)
    assert np.all(np.diff(up[32].astype(int)) >= -1)  # stays (nearly) monotone
    assert resize_image(ramp, 16) is not ramp and np.array_equal(resize_image(ramp, 16), ramp)
    with pytest.raises(ValueError):
        resize_image(ramp.astype(np.float32), 8)


def test_resize_mask_is_binary_nearest():
    m = np.array([[0, 255], [255, 0]], np.uint8)
    out = resize_mask(m, 4)
    np.testing.assert_array_equal(out, [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    big = np.random.default_rng(1).integers(0, 2, (37, 53)).astype(np.uint8)  # 0/1 mask
    for size in (8, 64):
        r = resize_mask(big, size)
        assert r.shape == (size, size) and set(np.unique(r)) <= {0, 1}
    noisy = np.array([[3, 250], [128, 127]], np.uint8)  # lossy-compressed 0/255 mask
    np.testing.assert_array_equal(binarize_mask(noisy), [[0, 1], [1, 0]])


def test_png_round_trip_and_decode_of_other_formats(grad):
    data = encode_png(grad)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_png(data), grad)
    np.testing.assert_array_equal(decode_png(_png(np.stack([grad] * 3, -1))), grad)
    mask = (grad > 100).astype(np.uint8)
    np.testing.assert_array_equal(decode_mask_png(encode_png(mask * 255)), mask)
    with pytest.raises(DataError, match="row x"):
        decode_png(b"nonsense", name="row x")
    with pytest.raises(DataError):
        decode_png(None)


# --- encode_png writes filter-0 PNGs; decode_png reads them without Pillow --------------------


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.mode == "L"
        return np.array(im)


@pytest.fixture(params=["isal", "zlib"])
def inflate_backend(request, monkeypatch):
    """The fast PNG path with each inflate implementation: ISA-L (the dependency) and the
    standard library's zlib (the fallback when isal cannot be imported)."""
    import zlib

    from multimix.data import images

    if request.param == "zlib":
        monkeypatch.setattr(images, "_inflate", zlib)
        monkeypatch.setattr(images, "_INFLATE_ERRORS", (zlib.error,))
    else:
        assert images._inflate.__name__ == "isal.isal_zlib"
    return request.param


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (20, 30), (64, 64), (33, 257)])
def test_encode_png_is_standard_filter0_grey_and_fast_path_is_bit_exact(shape, inflate_backend):
    import struct
    import zlib

    from multimix.data.images import _decode_png_fast

    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    for level in (0, 1, 6):
        data = encode_png(a, compress_level=level)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        # chunk structure and CRCs of every chunk
        pos, kinds = 8, []
        while pos < len(data):
            (n,) = struct.unpack(">I", data[pos:pos + 4])
            kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
            (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
            assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF
            kinds.append(kind)
            if kind == b"IDAT":
                raw = np.frombuffer(zlib.decompress(payload), np.uint8).reshape(shape[0], -1)
                assert not raw[:, 0].any()  # filter type 0 on every row
            pos += 12 + n
        assert kinds == [b"IHDR", b"IDAT", b"IEND"]
        assert np.array_equal(_pil_decode(data), a)  # any reader: Pillow
        fast = _decode_png_fast(data)
        assert fast is not None and np.array_equal(fast, a)
        out = decode_png(data)
        assert np.array_equal(out, a) and out.flags.writeable and out.flags.c_contiguous


def test_fast_path_reads_any_byte_buffer_in_place(grad):
    """Arrow buffers export signed bytes (format "b"): the decoder must still take its fast path
    on a zero-copy view, not fall back to Pillow (which was 2.7x slower)."""
    import pyarrow as pa

    from multimix.data.images import IMAGE_PNG_LEVEL, _decode_png_fast

    data = encode_png(grad, IMAGE_PNG_LEVEL)
    views = [memoryview(pa.py_buffer(data)), memoryview(bytearray(data)),
             memoryview(np.frombuffer(data, np.int8)), np.frombuffer(data, np.uint8)]
    assert memoryview(pa.py_buffer(data)).format == "b"
    for v in views:
        fast = _decode_png_fast(v)
        assert fast is not None and np.array_equal(fast, grad)
        assert np.array_equal(decode_png(v), grad)


def test_prepare_png_levels_decode_fast_and_masks_stay_compressed():
    from multimix.data.images import IMAGE_PNG_LEVEL, MASK_PNG_LEVEL, _decode_png_fast

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    stored = encode_png(a, IMAGE_PNG_LEVEL)
    assert IMAGE_PNG_LEVEL == 0 and len(stored) > 64 * 65  # uncompressed: >= the raw rows
    assert np.array_equal(_decode_png_fast(stored), a) and np.array_equal(_pil_decode(stored), a)
    m = np.zeros((64, 64), np.uint8)
    m[8:40, 4:60] = 255
    assert MASK_PNG_LEVEL >= 1 and len(encode_png(m, MASK_PNG_LEVEL)) < 64 * 64 // 8
    with pytest.raises(ValueError, match="compress_level must be 0..9"):
        encode_png(a, 10)


def test_masks_go_through_the_same_encoder():
    from multimix.data.images import _decode_png_fast

    m = np.zeros((40, 50), np.uint8)
    m[10:30, 5:45] = 1
    data = encode_png(m * 255)
    assert _decode_png_fast(data) is not None
    assert np.array_equal(_pil_decode(data), m * 255)
    assert np.array_equal(decode_mask_png(data), m)


def test_pillow_adaptive_png_uses_the_fallback_and_matches(grad):
    from multimix.data.images import _decode_png_fast

    rng = np.random.default_rng(3)
    smooth = np.clip(np.cumsum(rng.integers(-3, 4, size=(64, 64)), axis=1) + 128, 0,
                     255).astype(np.uint8)
    for a in (grad, smooth):
        data = _png(a)  # Pillow: adaptive filters (Paeth/Sub/Up rows)
        assert _decode_png_fast(data) is None
        assert np.array_equal(decode_png(data), a)
    # other PNG kinds also fall back: RGB, 16-bit, palette, interlaced
    assert _decode_png_fast(_png(np.stack([grad] * 3, -1))) is None
    assert _decode_png_fast(_png(grad.astype(np.uint16) * 257)) is None
    assert _decode_png_fast(_png(grad, mode="P")) is None
    buf = io.BytesIO()
    Image.fromarray(grad).save(buf, format="PNG", interlace=1)
    assert _decode_png_fast(buf.getvalue()) is None
    assert np.array_equal(decode_png(buf.getvalue()), grad)


def _no_addr(msg: str) -> str:
    import re

    return re.sub(r"0x[0-9a-f]+", "0x?", msg)  # Pillow names the BytesIO object


def _old_error(data: bytes, name=None) -> str:
    """What decode_png raised before the fast path: Pillow, then load_grey's DataError."""
    from multimix.data.images import load_grey

    with pytest.raises(DataError) as exc:
        load_grey(bytes(data), name=name)
    return str(exc.value)


def test_truncated_and_corrupt_filter0_png_raise_the_same_data_error(grad, inflate_backend):
    import zlib

    from multimix.data.images import _decode_png_fast

    data = encode_png(grad)
    idat = data.index(b"IDAT")
    bad = []
    for cut in (5, 20, 40, idat + 10, len(data) - 20):
        bad.append(data[:cut])
    corrupt = bytearray(data)  # flip bits inside the zlib stream (Adler-32 / inflate fails)
    corrupt[idat + 20] ^= 0xFF
    bad.append(bytes(corrupt))
    bad_ihdr = bytearray(data)  # IHDR CRC mismatch
    bad_ihdr[20] ^= 0x01
    bad.append(bytes(bad_ihdr))
    wrong_len = bytearray(data)  # stream inflates to fewer bytes than H*(W+1)
    short = encode_png(grad[:-1])
    wrong_len[:] = data[:33] + short[33:]
    bad.append(bytes(wrong_len))
    raised = 0
    for b in bad:
        assert _decode_png_fast(b) is None
        # the same outcome as Pillow alone (the decoder before the fast path): the same
        # DataError, or, where Pillow tolerates the damage (a stream cut inside its Adler-32,
        # a stream shorter than the header says), the same array
        try:
            want = _pil_decode(b)
        except Exception:  # noqa: BLE001
            want = None
        if want is None:
            raised += 1
            with pytest.raises(DataError) as exc:
                decode_png(b, name="x.png")
            assert _no_addr(str(exc.value)) == _no_addr(_old_error(b, name="x.png"))
        else:
            assert np.array_equal(decode_png(b), want)
    assert raised >= 6
    with pytest.raises(DataError, match="null"):
        decode_png(None)
    assert zlib  # used above
