"""``prepare --layout images``: unlabeled folder trees → task ``unlabeled``; the
perceptual hash column (``phash``) of every prepared row."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from multimix.data import dataset
from multimix.data import prepare as prep
from multimix.data.overlap import NEAR_THRESHOLD
from multimix.data.images import decode_png, load_grey, perceptual_hash, resize_image
from multimix.data.splits import ensure_split
from multimix.errors import DataError

SIZE = 16


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _smooth(seed: int, shape=(48, 40)) -> np.ndarray:
    """A smooth random picture with detail at the frequencies the perceptual hash uses (pure
    noise or a nearly flat picture would make it meaningless)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize(shape[::-1], Image.Resampling.BICUBIC))


def _hamming(a: bytes, b: bytes) -> int:
    return bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1")


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """Nested folders: grey PNG, RGB JPEG, 16-bit PNG, RGBA PNG; a byte-identical copy, a corrupt
    and a truncated file, a non-image file."""
    root = tmp_path / "corpus"
    _save(root / "a.png", _smooth(0))
    _save(root / "site1" / "b.jpg", np.stack([_smooth(1)] * 3, -1), quality=95)
    _save(root / "site1" / "deep" / "c16.png", _smooth(2).astype(np.uint16) * 257)
    _save(root / "site2" / "d.png", np.dstack([_smooth(3)] * 3 + [np.full((48, 40), 255,
                                                                           np.uint8)]))
    shutil.copy(root / "a.png", root / "site2" / "a_copy.png")
    (root / "site2" / "bad.png").write_bytes(b"not an image")
    full = (root / "site1" / "b.jpg").read_bytes()
    (root / "site1" / "cut.jpg").write_bytes(full[: len(full) // 2])
    (root / "notes.txt").write_text("hello")
    return root


def test_image_tree_becomes_an_unlabeled_dataset(image_tree, tmp_path):
    out = tmp_path / "out"
    m = prep.prepare(str(image_tree), str(out), layout="images", image_size=SIZE, workers=1,
                     progress=False)
    assert m["task"] == "unlabeled" and m["source"] == "corpus" and "classes" not in m
    assert m["counts"] == {"unlabeled": 5} and m["num_rows"] == 5 and m["skipped"] == 2
    assert m["parameters"]["layout"] == "images"
    assert m["duplicate_groups"] == [["a", "site2/a_copy"]]
    rep = json.loads((out / "report.json").read_text())
    assert {s["path"] for s in rep["skipped"]} == {"site2/bad.png", "site1/cut.jpg"}
    assert rep["ignored_files"] == ["notes.txt"]
    assert "labels" not in rep["duplicates"][0]
    assert pq.read_table(out / m["shards"][0]).schema.equals(dataset.SCHEMA, check_metadata=False)
    rows = {r["id"]: r for r in dataset.read_table(str(out)).to_pylist()}
    assert set(rows) == {"a", "site2/a_copy", "site1/b", "site1/deep/c16", "site2/d"}
    for rid, r in rows.items():
        assert r["task"] == "unlabeled" and r["label"] is None and r["mask"] is None
        assert r["hash"] == hashlib.sha256((image_tree / r["path"]).read_bytes()).hexdigest()
        assert decode_png(r["image"]).shape == (SIZE, SIZE)
        # the perceptual hash is of the original decoded image, not of the stored 16 px one
        assert r["phash"] == perceptual_hash(load_grey(image_tree / r["path"]))
    np.testing.assert_array_equal(decode_png(rows["site1/deep/c16"]["image"]),
                                  resize_image(_smooth(2), SIZE))
    assert rows["a"]["phash"] == rows["site2/a_copy"]["phash"]
    # an unlabeled dataset has no labels to split
    with pytest.raises(DataError, match="unlabeled dataset .* no labels to split"):
        ensure_split(str(out), 2, 0.1, 0)


def test_images_layout_is_never_auto_and_refuses_classes(image_tree, tmp_path):
    m = prep.prepare(str(image_tree), str(tmp_path / "auto"), image_size=SIZE, workers=1,
                     progress=False)
    assert m["task"] == "cls"  # auto: class folders site1, site2 (a.png reported)
    with pytest.raises(DataError, match="--classes applies"):
        prep.prepare(str(image_tree), str(tmp_path / "x"), layout="images", classes=["a", "b"],
                     progress=False)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        prep.prepare(str(tmp_path / "empty"), str(tmp_path / "y"), layout="images",
                     progress=False)


def test_phash_is_independent_of_size_and_encoding_and_tells_images_apart():
    a, b = _smooth(10, (200, 180)), _smooth(11, (200, 180))
    buf = io.BytesIO()
    Image.fromarray(resize_image(a, 96)).save(buf, "JPEG", quality=60)
    small_jpeg = load_grey(buf.getvalue())
    assert len(perceptual_hash(a)) == 32 and perceptual_hash(a) == perceptual_hash(a.copy())
    assert _hamming(perceptual_hash(a), perceptual_hash(small_jpeg)) <= NEAR_THRESHOLD
    assert _hamming(perceptual_hash(a), perceptual_hash(b)) > 2 * NEAR_THRESHOLD


@pytest.mark.realdata
def test_real_images_prepare_as_an_unlabeled_pool(shared_data, tmp_path):
    """A few real Kermany JPEGs and V7/GB PNGs in a nested tree, plus a resized re-encoded copy."""
    root = tmp_path / "real"
    picks = sorted((shared_data / "kermany-cxr" / "train" / "NORMAL").glob("*.jpeg"))[:3]
    picks += sorted((shared_data / "v7-covid-lungs" / "images").glob("*.png"))[:2]
    picks += sorted((shared_data / "gb-covid-lungs" / "images").glob("*.png"))[:1]
    for i, p in enumerate(picks):
        (root / f"g{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / f"g{i % 2}" / p.name)
    Image.fromarray(resize_image(load_grey(picks[0]), 150)).save(root / "copy.jpg", quality=70)
    m = prep.prepare(str(root), str(tmp_path / "out"), layout="images", image_size=32,
                     workers=1, progress=False)
    assert m["num_rows"] == len(picks) + 1 and m["skipped"] == 0
    rows = {r["id"]: r for r in dataset.read_table(str(tmp_path / "out")).to_pylist()}
    orig = rows[f"g0/{picks[0].stem}"]
    assert _hamming(orig["phash"], rows["copy"]["phash"]) <= NEAR_THRESHOLD
    others = [r["phash"] for k, r in rows.items() if k not in (f"g0/{picks[0].stem}", "copy")]
    assert min(_hamming(orig["phash"], h) for h in others) > NEAR_THRESHOLD
