"""`multimix prepare` on damaged inputs: unknown labels (CSV typos, out-of-range
integers, stray class folders) are bad rows, fatal under --strict; non-binary masks are counted
and reported; messages name the real file. Through `multimix.cli.main`, Ray-free, tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from multimix.cli import main


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _img(path: Path, seed: int) -> Path:
    return _save(path, np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8))


def _csv(root: Path, labels: list[str]) -> Path:
    """root/imgs/i<k>.png and root/labels.csv with one row per label."""
    lines = ["path,label"]
    for k, lab in enumerate(labels):
        _img(root / "imgs" / f"i{k}.png", k)
        lines.append(f"imgs/i{k}.png,{lab}")
    csv = root / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["prepare", "--quiet", "--size", "16", "--workers", "1", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _last(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_csv_label_typo_is_a_bad_row_not_a_third_class(tmp_path, capsys):
    labels = ["NORMAL"] * 10 + ["PNEUMONIA"] * 10 + ["PNEUMONA"]
    csv = _csv(tmp_path / "src", labels)
    out = tmp_path / "out"
    code, stdout, _ = _run([str(csv), "--out", str(out)], capsys)
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["NORMAL", "PNEUMONIA"] and m["num_rows"] == 20 and m["skipped"] == 1
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == [{"path": "imgs/i20.png", "reason": (
        "unknown label 'PNEUMONA' (line 22; a typo of 'PNEUMONIA'? give --classes to set the "
        "class set)")}]
    assert "1 skipped" in stdout

    code, _, err = _run([str(csv), "--out", str(tmp_path / "strict"), "--strict"], capsys)
    assert code == 2
    assert _last(err) == (
        f"multimix prepare: error: {tmp_path}/src/imgs/i20.png: unknown label 'PNEUMONA' "
        "(line 22; a typo of 'PNEUMONIA'? give --classes to set the class set) (--strict; 1 "
        "such problem(s) in the layout)")
    assert not (tmp_path / "strict").exists()


def test_classes_flag_makes_integer_7_and_other_names_unknown(tmp_path, capsys):
    csv = _csv(tmp_path / "src", ["0", "1", "NORMAL", "PNEUMONIA", "7", "COVID"])
    out = tmp_path / "out"
    code, _, _ = _run([str(csv), "--out", str(out), "--classes", "NORMAL,PNEUMONIA"], capsys)
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["NORMAL", "PNEUMONIA"] and m["counts"]["cls"] == {
        "NORMAL": 2, "PNEUMONIA": 2}
    assert m["parameters"]["classes"] == ["NORMAL", "PNEUMONIA"]
    reasons = {s["path"]: s["reason"] for s in json.loads(
        (out / "report.json").read_text())["skipped"]}
    assert reasons == {
        "imgs/i4.png": "unknown label '7' (line 6; --classes NORMAL,PNEUMONIA)",
        "imgs/i5.png": "unknown label 'COVID' (line 7; --classes NORMAL,PNEUMONIA)"}
    code, _, err = _run([str(csv), "--out", str(tmp_path / "s"), "--classes",
                         "NORMAL,PNEUMONIA", "--strict"], capsys)
    assert code == 2 and "i4.png: unknown label '7'" in _last(err)
    code, _, err = _run([str(csv), "--out", str(tmp_path / "s"), "--classes", "NORMAL"], capsys)
    assert code == 2 and _last(err) == (
        "multimix prepare: error: --classes 'NORMAL': give two or more distinct, non-empty "
        "class names (e.g. --classes NORMAL,PNEUMONIA)")


def test_folder_outside_classes_is_unknown_and_strict_is_fatal(tmp_path, capsys):
    src = tmp_path / "src"
    for k, cls in enumerate(["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA", "COVID"]):
        _img(src / cls / f"x{k}.png", k)
    out = tmp_path / "out"
    code, _, _ = _run([str(src), "--out", str(out), "--classes", "NORMAL,PNEUMONIA"], capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == [{"path": "COVID/x4.png", "reason": (
        "unknown label 'COVID' (folder COVID/ is not in --classes NORMAL,PNEUMONIA)")}]
    code, _, err = _run([str(src), "--out", str(tmp_path / "s"), "--classes",
                         "NORMAL,PNEUMONIA", "--strict"], capsys)
    assert code == 2 and _last(err).startswith(
        f"multimix prepare: error: {src}/COVID/x4.png: unknown label 'COVID'")
    # without --classes the folders are the class set, as before
    code, _, _ = _run([str(src), "--out", str(tmp_path / "all")], capsys)
    m = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert code == 0 and m["classes"] == ["COVID", "NORMAL", "PNEUMONIA"]


def test_non_binary_masks_are_counted_reported_and_thresholded_as_told(tmp_path, capsys):
    src = tmp_path / "src"
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 32 grey levels 0..248
    for k in range(3):
        _img(src / "images" / f"c{k}.png", k)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        _save(src / "masks" / f"c{k}.png", ramp if k == 0 else mask)
    out = tmp_path / "out"
    code, stdout, _ = _run([str(src), "--out", str(out)], capsys)
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["non_binary_masks"] == 1 and m["parameters"]["mask_threshold"] == 127
    report = json.loads((out / "report.json").read_text())
    assert report["non_binary_masks"] == [{"path": "masks/c0.png", "kind": "mask", "levels": 32,
                                           "mid_fraction": 0.9375}]
    assert "1 non-binary mask(s) (more than two grey levels; binarised at > 127" in stdout

    from multimix.data.images import decode_mask_png
    from multimix.data.dataset import read_table

    def ramp_mask(path):
        t = read_table(str(path), ["id", "mask"]).to_pylist()
        return next(decode_mask_png(r["mask"]) for r in t if r["id"] == "c0")

    # 16 px columns: ramp value at column c is 16*c; > 127 from c = 8, > 200 from c = 13
    assert ramp_mask(out)[0].tolist() == [0] * 8 + [1] * 8
    code, _, _ = _run([str(src), "--out", str(tmp_path / "t200"), "--mask-threshold", "200"],
                      capsys)
    assert code == 0 and ramp_mask(tmp_path / "t200")[0].tolist() == [0] * 13 + [1] * 3
    code, _, err = _run([str(src), "--out", str(tmp_path / "x"), "--mask-threshold", "255"],
                        capsys)
    assert code == 2 and _last(err) == (
        "multimix prepare: error: --mask-threshold must be an integer from 0 to 254, got 255")


def test_messages_name_the_real_file(tmp_path, capsys):
    src = tmp_path / "src"
    csv = _csv(src, ["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"])
    (src / "imgs" / "i1.png").write_bytes(b"")  # zero bytes
    code, _, _ = _run([str(csv), "--out", str(tmp_path / "out")], capsys)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert code == 0 and report["skipped"] == [
        {"path": "imgs/i1.png", "reason": "image: empty file (0 bytes)"}]

    (src / "imgs" / "i1.png").write_bytes(b"garbage, not an image")
    code, _, _ = _run([str(csv), "--out", str(tmp_path / "out2")], capsys)
    reason = json.loads((tmp_path / "out2" / "report.json").read_text())["skipped"][0]["reason"]
    assert reason == "image: not a readable image (format not recognised)", reason

    (src / "imgs" / "i1.png").unlink()  # a path in the CSV that does not exist
    code, _, err = _run([str(csv), "--out", str(tmp_path / "s"), "--strict"], capsys)
    assert code == 2 and _last(err) == (
        f"multimix prepare: error: {src}/imgs/i1.png: image file not found (--strict)")
    assert "labels.csv/" not in err
