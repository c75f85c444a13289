"""multimix.data.prepare: layouts → Parquet + manifest + report; skips, duplicates, strictness,
the CLI, and the real data (Kermany and V7, prepared once per session in conftest)."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from multimix.data import dataset
from multimix.data import prepare as prep
from multimix.data.images import decode_png
from multimix.errors import DataError, UserError

SIZE = 16


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _noise(seed: int, shape=(24, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def run_cli(module, argv: list[str]) -> int:
    """Run one subcommand the way ``multimix.cli.main`` does (parser → run; UserError → 2),
    without importing the other subcommands' modules."""
    p = argparse.ArgumentParser(prog=f"multimix {module.__name__.rsplit('.', 1)[-1]}")
    module.add_arguments(p)
    args = p.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}")
        return 2


@pytest.fixture
def cls_folder(tmp_path) -> Path:
    """ROOT/train/{NORMAL,PNEUMONIA}: grey PNG, RGB JPEG, 16-bit PNG, one duplicate, one corrupt
    and one truncated file, one non-image file."""
    root = tmp_path / "src"
    t = root / "train"
    _save(t / "NORMAL" / "n0.png", _noise(0))
    _save(t / "NORMAL" / "n1.jpeg", np.stack([_noise(1)] * 3, -1), quality=95)
    _save(t / "NORMAL" / "n2.png", (_noise(2).astype(np.uint16) * 257))  # 16-bit
    _save(t / "PNEUMONIA" / "p0.png", _noise(3, (30, 40)))
    shutil.copy(t / "NORMAL" / "n0.png", t / "PNEUMONIA" / "p1_copy.png")  # byte-identical
    (t / "PNEUMONIA" / "bad.png").write_bytes(b"definitely not a png")
    full = (t / "NORMAL" / "n1.jpeg").read_bytes()
    (t / "PNEUMONIA" / "cut.jpeg").write_bytes(full[: len(full) // 2])
    (t / "PNEUMONIA" / "readme.txt").write_text("hello")
    return root


def _rows(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return dataset.read_table(str(out)).to_pylist() if m else []


def test_class_folders_end_to_end(cls_folder, tmp_path):
    out = tmp_path / "out"
    m = prep.prepare(str(cls_folder), str(out), image_size=SIZE, workers=1, progress=False)
    # manifest
    assert m["format"] == dataset.FORMAT and m["task"] == "cls" and m["source"] == "src"
    assert m["classes"] == ["NORMAL", "PNEUMONIA"] and m["image_size"] == SIZE
    assert m["counts"] == {"cls": {"NORMAL": 3, "PNEUMONIA": 2}} and m["num_rows"] == 5
    assert m["skipped"] == 2 and m["synthetic"] is False
    assert m["duplicate_groups"] == [["NORMAL/n0", "PNEUMONIA/p1_copy"]]
    assert m["parameters"]["split"] == "train"
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m == dataset.read_manifest(str(out))
    # report: every file that is not a row, with a reason
    rep = json.loads((out / "report.json").read_text())
    skipped = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert set(skipped) == {"train/PNEUMONIA/bad.png", "train/PNEUMONIA/cut.jpeg"}
    assert all("not a readable image" in r for r in skipped.values())
    assert rep["ignored_files"] == ["train/PNEUMONIA/readme.txt"]
    assert rep["duplicates"][0]["labels"] == ["NORMAL", "PNEUMONIA"]
    assert rep["duplicates"][0]["conflicting_labels"] is True
    # rows
    table = pq.read_table(out / m["shards"][0])
    assert table.schema.equals(dataset.SCHEMA, check_metadata=False)
    rows = {r["id"]: r for r in _rows(out)}
    # stored in the hashed row order (classes mixed, reproducible), recorded in the manifest
    assert list(rows) == sorted(rows, key=prep.row_order_key) != sorted(rows)
    assert m["row_order"] == prep.ROW_ORDER
    for rid, r in rows.items():
        src_file = cls_folder / r["path"]
        assert r["hash"] == hashlib.sha256(src_file.read_bytes()).hexdigest()
        assert r["task"] == "cls" and r["source"] == "src" and r["mask"] is None
        assert r["label"] == (0 if rid.startswith("NORMAL/") else 1)
        img = decode_png(r["image"])
        assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
    assert (rows["PNEUMONIA/p0"]["orig_height"], rows["PNEUMONIA/p0"]["orig_width"]) == (30, 40)
    # the 16-bit file (v·257) is the 8-bit noise n2 after scaling by the type's range
    from multimix.data.images import resize_image

    np.testing.assert_array_equal(decode_png(rows["NORMAL/n2"]["image"]),
                                  resize_image(_noise(2), SIZE))


def test_png_level_is_applied_recorded_and_checked(cls_folder, tmp_path):
    from multimix.data.images import IMAGE_PNG_LEVEL

    a = prep.prepare(str(cls_folder), str(tmp_path / "a"), image_size=SIZE, workers=1,
                     progress=False)
    b = prep.prepare(str(cls_folder), str(tmp_path / "b"), image_size=SIZE, workers=1,
                     progress=False, png_level=9)
    assert a["parameters"]["png_level"] == IMAGE_PNG_LEVEL == 0
    assert b["parameters"]["png_level"] == 9
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["id"] for r in ra] == [r["id"] for r in rb]
    for x, y in zip(ra, rb):  # same pixels, stored uncompressed (0) or deflated (9)
        np.testing.assert_array_equal(decode_png(x["image"]), decode_png(y["image"]))
        assert len(x["image"]) >= SIZE * (SIZE + 1)  # stored: at least the raw scanlines
        # the zlib header of the IDAT (after signature, IHDR, length, "IDAT") names the level
        assert x["image"][37:41] == y["image"][37:41] == b"IDAT"
        assert (x["image"][42] >> 6, y["image"][42] >> 6) == (0, 3)  # FLEVEL: fastest, max
    # images are not compressed again by Parquet (PNG bytes are stored as they are)
    meta = pq.ParquetFile(tmp_path / "a" / a["shards"][0]).metadata
    names = meta.schema.names
    assert meta.row_group(0).column(names.index("image")).compression == "UNCOMPRESSED"
    for bad in (-1, 10, 1.5, True):
        with pytest.raises(UserError, match="--png-level must be an integer from 0 to 9"):
            prep.prepare(str(cls_folder), str(tmp_path / "c"), image_size=SIZE, workers=1,
                         progress=False, png_level=bad)
    assert not (tmp_path / "c").exists()


def test_strict_fails_at_the_first_bad_file_and_leaves_no_dataset(cls_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"(bad\.png|cut\.jpeg).*--strict"):
        prep.prepare(str(cls_folder), str(out), image_size=SIZE, strict=True, workers=1,
                     shard_rows=1, progress=False)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("data/*.parquet"))
    with pytest.raises(DataError, match="not a prepared dataset: .*manifest.json missing"):
        dataset.read_manifest(str(out))


def test_pool_output_equals_in_process_output_and_shards_split(tmp_path):
    root = tmp_path / "many"
    for i in range(70):  # > 2 chunks of 32, so the process pool is used
        _save(root / ("A" if i % 3 else "B") / f"im{i:03d}.png", _noise(100 + i))
    a = prep.prepare(str(root), str(tmp_path / "a"), image_size=SIZE, workers=1,
                     shard_rows=1000, progress=False)
    b = prep.prepare(str(root), str(tmp_path / "b"), image_size=SIZE, workers=2,
                     shard_rows=16, progress=False)
    assert len(a["shards"]) == 1 and len(b["shards"]) == 5
    assert dataset.read_table(str(tmp_path / "a")).equals(dataset.read_table(str(tmp_path / "b")))
    assert a["counts"] == b["counts"] == {"cls": {"A": 46, "B": 24}}


def test_pairs_mask_size_mismatch_binary_masks_and_ignore(tmp_path):
    root = tmp_path / "lungs"
    for i in range(3):
        _save(root / "images" / f"c{i}.png", _noise(i, (32, 32)))
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 4 + i:20] = 255
        _save(root / "masks" / f"c{i}.png", mask)
    _save(root / "masks" / "c2.png", np.zeros((30, 32), np.uint8))  # wrong size
    _save(root / "ignore" / "c1.png", (np.eye(32) * 255).astype(np.uint8))
    _save(root / "images" / "lonely.png", _noise(9, (32, 32)))  # no mask
    out = tmp_path / "out"
    m = prep.prepare(str(root), str(out), image_size=SIZE, workers=1, progress=False)
    assert m["task"] == "seg" and "classes" not in m
    assert m["counts"] == {"seg": 2, "with_ignore": 1} and m["skipped"] == 2
    skipped = {s["path"]: s["reason"] for s in json.loads((out / "report.json").read_text())[
        "skipped"]}
    assert "mask masks/c2.png is 32x30 but the image is 32x32" in skipped["images/c2.png"]
    assert "image without mask" in skipped["images/lonely.png"]
    rows = {r["id"]: r for r in _rows(out)}
    assert set(rows) == {"c0", "c1"} and rows["c0"]["label"] is None
    for r in rows.values():
        mask = decode_png(r["mask"])
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
    assert rows["c0"]["ignore"] is None
    assert set(np.unique(decode_png(rows["c1"]["ignore"]))) == {0, 255}
    with pytest.raises(DataError, match="lonely.png: image without mask"):
        prep.prepare(str(root), str(tmp_path / "strict"), image_size=SIZE, strict=True,
                     progress=False)


def test_csv_layout_prepares(tmp_path):
    _save(tmp_path / "d" / "one.png", _noise(1))
    _save(tmp_path / "d" / "two.png", _noise(2))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nd/one.png,healthy\nd/two.png,sick\nd/gone.png,sick\n")
    m = prep.prepare(str(csv), str(tmp_path / "out"), image_size=SIZE, workers=1,
                     progress=False, source_name="mini")
    assert m["classes"] == ["healthy", "sick"] and m["source"] == "mini"
    assert m["counts"]["cls"] == {"healthy": 1, "sick": 1} and m["skipped"] == 1
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["skipped"] == [{"path": "d/gone.png", "reason": "image file not found"}]


def test_existing_dataset_needs_overwrite(cls_folder, tmp_path):
    out = tmp_path / "out"
    prep.prepare(str(cls_folder), str(out), image_size=SIZE, workers=1, progress=False)
    (out / "splits").mkdir()
    (out / "splits" / "old.json").write_text("{}")
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prep.prepare(str(cls_folder), str(out), image_size=SIZE, workers=1, progress=False)
    m = prep.prepare(str(cls_folder), str(out), image_size=8, workers=1, progress=False,
                     overwrite=True)
    assert m["image_size"] == 8 and not (out / "splits").exists()
    assert decode_png(_rows(out)[0]["image"]).shape == (8, 8)


def test_everything_skipped_is_an_error(tmp_path):
    for c in ("A", "B"):
        (tmp_path / "s" / c).mkdir(parents=True)
        (tmp_path / "s" / c / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="every file was skipped"):
        prep.prepare(str(tmp_path / "s"), str(tmp_path / "o"), image_size=SIZE, progress=False)


def test_cli_prepare_prints_a_summary_and_progress(cls_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = run_cli(prep, [str(cls_folder), "--out", str(out), "--size", "16", "--workers", "1"])
    io = capsys.readouterr()
    assert rc == 0
    assert "5 rows (NORMAL 3, PNEUMONIA 2)" in io.out and "1 duplicate group(s)" in io.out
    assert "2 skipped" in io.out and str(out / "report.json") in io.out
    assert "prepare src: 7/7 images" in io.err  # the final progress line
    assert dataset.read_manifest(str(out))["parameters"]["png_level"] == 0
    rc = run_cli(prep, [str(cls_folder), "--out", str(tmp_path / "l6"), "--size", "16",
                        "--workers", "1", "--png-level", "6", "--quiet"])
    assert rc == 0 and dataset.read_manifest(str(tmp_path / "l6"))["parameters"]["png_level"] == 6
    capsys.readouterr()
    assert run_cli(prep, [str(cls_folder), "--out", str(tmp_path / "l12"), "--png-level", "12"]) == 2
    assert "--png-level must be an integer from 0 to 9, got 12" in capsys.readouterr().out
    assert run_cli(prep, ["--out", str(out)]) == 2
    assert "missing SOURCE" in capsys.readouterr().out
    assert run_cli(prep, [str(cls_folder), "--out", str(tmp_path / "x"), "--layout", "pairs"]) == 2
    assert "no image-mask pairs" in capsys.readouterr().out


def test_cli_prepare_demo(tmp_path, capsys):
    rc = run_cli(prep, ["--demo", "--out", str(tmp_path / "demo"), "--demo-count", "12",
                        "--size", "32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "12 rows (NORMAL 6, PNEUMONIA 6)" in out and "16 image-mask pairs" in out
    cls_m = dataset.read_manifest(str(tmp_path / "demo" / "cls"))
    seg_m = dataset.read_manifest(str(tmp_path / "demo" / "seg"))
    assert cls_m["synthetic"] and seg_m["synthetic"]
    assert cls_m["source"] == seg_m["source"] == "synthetic-demo"
    rows = dataset.read_table(str(tmp_path / "demo" / "seg")).to_pylist()
    assert {decode_png(r["image"]).shape for r in rows} == {(32, 32)}
    assert all(set(np.unique(decode_png(r["mask"]))) == {0, 255} for r in rows)


# ---------------------------------------------------------------------------------------------
# real data (MULTIMIX_DATA); the session fixtures live in tests/conftest.py


def _source_hash_groups(root: Path) -> list[list[str]]:
    by_hash = defaultdict(list)
    for f in sorted(root.rglob("*.jpeg")):
        by_hash[hashlib.sha256(f.read_bytes()).hexdigest()].append(
            f.relative_to(root).with_suffix("").as_posix())
    return sorted((sorted(g) for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])


@pytest.mark.realdata
def test_kermany_train(kermany_prepared, shared_data):
    m = dataset.read_manifest(str(kermany_prepared))
    assert m["num_rows"] == 5216 and m["skipped"] == 0
    assert m["counts"]["cls"] == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert m["classes"] == ["NORMAL", "PNEUMONIA"] and m["source"] == "kermany-cxr"
    # duplicates: exactly the byte-identical groups found by hashing the files independently.
    # (../shared/data/README.md says 30 groups; the files hold 24 — 22 pairs and 2 triples.)
    expected = _source_hash_groups(shared_data / "kermany-cxr" / "train")
    assert m["duplicate_groups"] == expected
    assert len(expected) == 24 and Counter(map(len, expected)) == {2: 22, 3: 2}
    t = dataset.read_table(str(kermany_prepared), ["id", "label", "orig_height", "orig_width"])
    labels = Counter(zip((i.split("/")[0] for i in t.column("id").to_pylist()),
                         t.column("label").to_pylist()))
    assert labels == {("NORMAL", 0): 1341, ("PNEUMONIA", 1): 3875}
    assert set(t.column("orig_height").to_pylist()) == {224}
    all_rows = dataset.read_table(str(kermany_prepared))
    first = all_rows.slice(t.column("id").to_pylist().index("NORMAL/IM-0115-0001"), 1
                           ).to_pylist()[0]
    # hashed row order: every row group mixes the classes (class folders are sorted)
    for shard in m["shards"]:
        f = pq.ParquetFile(kermany_prepared / shard)
        for g in range(f.num_row_groups):
            assert set(f.read_row_group(g, columns=["label"]).column("label").to_pylist()) == {0, 1}
    assert first["path"] == "train/NORMAL/IM-0115-0001.jpeg"
    assert decode_png(first["image"]).shape == (64, 64)


@pytest.mark.realdata
def test_v7_pairs_keep_masks_binary(v7_prepared, shared_data):
    m = dataset.read_manifest(str(v7_prepared))
    assert m["task"] == "seg" and m["skipped"] == 0
    assert m["counts"] == {"seg": 418, "with_ignore": 50}
    n_ignore_files = len(list((shared_data / "v7-covid-lungs" / "ignore").glob("*.png")))
    assert m["counts"]["with_ignore"] == n_ignore_files
    rows = dataset.read_table(str(v7_prepared), ["id", "mask", "ignore"]).to_pylist()
    for r in rows:
        vals = set(np.unique(decode_png(r["mask"])))
        assert vals <= {0, 255} and 255 in vals, r["id"]
        if r["ignore"] is not None:
            assert set(np.unique(decode_png(r["ignore"]))) <= {0, 255}


@pytest.mark.realdata
def test_real_files_made_corrupt_are_reported_and_skipped(shared_data, tmp_path):
    src = shared_data / "kermany-cxr" / "train"
    root = tmp_path / "copy"
    picked = {c: sorted((src / c).glob("*.jpeg"))[:3] for c in ("NORMAL", "PNEUMONIA")}
    for c, files in picked.items():
        (root / c).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / c / f.name)
    trunc = root / "NORMAL" / picked["NORMAL"][1].name
    trunc.write_bytes(trunc.read_bytes()[:1500])
    garbage = root / "PNEUMONIA" / picked["PNEUMONIA"][2].name
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    m = prep.prepare(str(root), str(tmp_path / "out"), image_size=32, workers=1,
                     progress=False)
    assert m["num_rows"] == 4 and m["skipped"] == 2
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(s["path"] for s in rep["skipped"]) == sorted(
        [f"NORMAL/{trunc.name}", f"PNEUMONIA/{garbage.name}"])
    assert all("not a readable image" in s["reason"] for s in rep["skipped"])
