"""multimix.data.sources: layout discovery on tiny folders made in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimix.data.sources import detect_layout, discover
from multimix.errors import DataError


def _img(path: Path, value: int = 100, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _classes(root: Path, spec: dict[str, int], ext: str = ".png") -> Path:
    for cls, n in spec.items():
        for i in range(n):
            _img(root / cls / f"im{i}{ext}", 10 * i)
    return root


def test_class_folders_sorted_labels_ids_and_ignored_files(tmp_path):
    root = _classes(tmp_path / "ds", {"b_sick": 2, "a_well": 3})
    (root / "a_well" / "notes.txt").write_text("x")
    (root / "a_well" / ".DS_Store").write_text("x")
    _img(root / "b_sick" / "sub" / "deep.jpg")
    src = discover(str(root))
    assert (src.layout, src.task, src.name, src.split) == ("folders", "cls", "ds", None)
    assert src.classes == ["a_well", "b_sick"]
    assert [r.id for r in src.records] == ["a_well/im0", "a_well/im1", "a_well/im2",
                                          "b_sick/im0", "b_sick/im1", "b_sick/sub/deep"]
    assert [r.label for r in src.records] == [0, 0, 0, 1, 1, 1]
    assert src.records[0].path == "a_well/im0.png"
    assert Path(src.records[0].image_file) == root / "a_well" / "im0.png"
    assert src.other_files == ["a_well/notes.txt"]  # reported; hidden files are not
    assert src.problems == []


def test_split_level_auto_detected_when_single_and_selectable(tmp_path):
    root = tmp_path / "kermany-like"
    _classes(root / "train", {"NORMAL": 2, "PNEUMONIA": 1}, ".jpeg")
    src = discover(str(root))
    assert src.split == "train" and src.name == "kermany-like"
    assert [r.id for r in src.records] == ["NORMAL/im0", "NORMAL/im1", "PNEUMONIA/im0"]
    assert src.records[0].path == "train/NORMAL/im0.jpeg"
    # the same ids when the split folder itself is given
    assert [r.id for r in discover(str(root / "train")).records] == [r.id for r in src.records]
    assert discover(str(root / "train")).name == "kermany-like"

    _classes(root / "test", {"NORMAL": 1, "PNEUMONIA": 1}, ".jpeg")
    with pytest.raises(DataError, match="splits test, train; choose one with --split"):
        discover(str(root))
    assert len(discover(str(root), split="test").records) == 2
    with pytest.raises(DataError, match="no split 'val'"):
        discover(str(root), split="val")
    with pytest.raises(DataError, match="no split level"):
        discover(str(root / "train"), split="train")


def test_bad_class_layouts_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files"):
        discover(str(tmp_path / "empty"))
    one = _classes(tmp_path / "one", {"ONLY": 2})
    with pytest.raises(DataError, match="only one class folder \\(ONLY\\)"):
        discover(str(one))
    gap = _classes(tmp_path / "gap", {"A": 1, "C": 1})
    (gap / "B").mkdir()
    with pytest.raises(DataError, match="class folder B holds no images"):
        discover(str(gap))
    clash = _classes(tmp_path / "clash", {"A": 1, "B": 1})
    _img(clash / "A" / "im0.jpg")
    with pytest.raises(DataError, match="same id 'A/im0'"):
        discover(str(clash))
    with pytest.raises(DataError, match="no such file or directory"):
        discover(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="unknown layout"):
        discover(str(clash), layout="zip")


def test_loose_image_beside_class_folders_is_reported(tmp_path):
    root = _classes(tmp_path / "ds", {"A": 1, "B": 1})
    _img(root / "stray.png")
    src = discover(str(root))
    assert [p["path"] for p in src.problems] == ["stray.png"]
    assert "not inside a class folder" in src.problems[0]["reason"]


def test_pairs_layout_matches_by_id_and_reports_orphans(tmp_path):
    root = tmp_path / "lungs"
    for i in ("a", "b", "c"):
        _img(root / "images" / f"{i}.png")
    _img(root / "masks" / "a.png")
    _img(root / "masks" / "b.png")
    _img(root / "masks" / "zz.png")  # mask without image
    _img(root / "ignore" / "b.png")
    (root / "meta.csv").write_text("id\n")
    assert detect_layout(str(root)) == "pairs"
    src = discover(str(root))
    assert (src.layout, src.task) == ("pairs", "seg")
    assert [r.id for r in src.records] == ["a", "b"]
    assert src.records[0].ignore_file is None and src.records[1].ignore_path == "ignore/b.png"
    assert src.records[1].mask_path == "masks/b.png"
    reasons = {p["path"]: p["reason"] for p in src.problems}
    assert set(reasons) == {"images/c.png", "masks/zz.png"}
    assert "image without mask" in reasons["images/c.png"]
    assert "mask without image" in reasons["masks/zz.png"]
    assert src.other_files == ["meta.csv"]


def test_csv_layouts(tmp_path):
    _img(tmp_path / "imgs" / "x.png")
    _img(tmp_path / "imgs" / "y.png")
    cls_csv = tmp_path / "labels.csv"
    cls_csv.write_text("path,label\nimgs/y.png,PNEUMONIA\nimgs/x.png,NORMAL\n")
    assert detect_layout(str(cls_csv)) == "csv"
    src = discover(str(cls_csv))
    assert (src.layout, src.task, src.classes) == ("csv", "cls", ["NORMAL", "PNEUMONIA"])
    assert [(r.id, r.label) for r in src.records] == [("imgs/x", 0), ("imgs/y", 1)]
    assert Path(src.records[0].image_file) == tmp_path / "imgs" / "x.png"

    ints = tmp_path / "ints.csv"
    ints.write_text("label,path\n1,imgs/x.png\n0,imgs/y.png\n")
    src = discover(str(ints))
    assert src.classes == ["0", "1"] and [r.label for r in src.records] == [1, 0]
    # a gap: the label after it is unknown (a bad row), not a new class with empty ones between
    ints.write_text("label,path\n1,imgs/x.png\n0,imgs/y.png\n7,imgs/z.png\n")
    src = discover(str(ints))
    assert src.classes == ["0", "1"] and [r.label for r in src.records] == [1, 0]
    assert src.problems == [{"path": "imgs/z.png", "reason": "unknown label '7' (line 4; "
                                                             "classes 0,1; give --classes to "
                                                             "set the class set)"}]
    ints.write_text("label,path\n2,imgs/x.png\n0,imgs/y.png\n")
    with pytest.raises(DataError, match="integer labels 0, 2 do not start with 0, 1"):
        discover(str(ints))

    seg = tmp_path / "seg.csv"
    seg.write_text("path,mask_path,ignore_path\nimgs/x.png,m/x.png,\nimgs/y.png,m/y.png,i/y.png\n"
                   "imgs/z.png,,\n")
    src = discover(str(seg))
    assert src.task == "seg" and [r.id for r in src.records] == ["imgs/x", "imgs/y"]
    assert src.records[0].ignore_file is None
    assert Path(src.records[1].ignore_file) == tmp_path / "i" / "y.png"
    assert src.problems == [{"path": "imgs/z.png", "reason": "image without mask (empty "
                                                             "mask_path)"}]


@pytest.mark.parametrize("text,match", [
    ("path,label,weight\na.png,A\n", "unknown column 'weight'"),
    ("label\nA\n", "no 'path' column"),
    ("path,label,mask_path\na.png,A,m.png\n", "exactly one of the columns"),
    ("path,ignore_path,label\na.png,i.png,A\n", "'ignore_path' needs a 'mask_path'"),
    ("path,label\n", "no rows"),
    ("", "empty CSV"),
    ("path,label\na.png,\n", "line 2: empty label"),
    ("path,label\na.png,A\nb.png,A\n", "only one class"),
    ("path,label\na.png,A\na.jpg,B\n", "same id 'a'"),
])
def test_bad_csv_is_a_data_error_naming_the_file(tmp_path, text, match):
    p = tmp_path / "m.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        discover(str(p))
    assert "m.csv" in str(err.value)
