"""`multimix predict` on awkward inputs: directories (recursive, counted), images
under 32 px refused with one line, missing paths named once, huge images decoded reduced.
Ray-free: a real (untrained) model at 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimix.cli import main
from multimix.data.images import load_grey, load_grey_bounded
from multimix.errors import DataError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from multimix import checkpoint
    from multimix.config import load_config
    from multimix.model import create_model

    cfg = load_config("cpu-small", ["data.image_size=32"])
    path = tmp_path_factory.mktemp("ckpt") / checkpoint.FILENAME
    state = checkpoint.build_state(model=create_model(cfg.model), optimizer=None,
                                   scheduler=None, epoch=0, config=cfg, splits={},
                                   classes=["NORMAL", "PNEUMONIA"], history=[])
    checkpoint.save(state, str(path))
    return path


def _img(path: Path, h: int, w: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w), np.uint8)).save(
        path, **kw)
    return path


def _predict(ckpt: Path, out: Path, *images, capsys) -> tuple[int, str, list[str]]:
    code = main(["predict", "--checkpoint", str(ckpt), *map(str, images), "--out", str(out)])
    o, e = capsys.readouterr()
    return code, o, e.strip().splitlines()


def test_a_directory_is_searched_recursively_and_counted(ckpt, tmp_path, capsys):
    d = tmp_path / "imgs"
    _img(d / "a.png", 40, 48)
    _img(d / "sub" / "a.png", 36, 36)  # same name in a subfolder: its outputs are a-2_*
    _img(d / "sub" / "b.jpg", 64, 50)
    (d / "notes.txt").write_text("not an image")
    _img(d / ".hidden" / "c.png", 40, 40)
    out = tmp_path / "out"
    code, stdout, err = _predict(ckpt, out, d, capsys=capsys)
    assert code == 0, err
    assert stdout.splitlines()[0] == f"{d}: 3 image(s)"
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["image"] for p in preds] == [str(d / "a.png"), str(d / "sub" / "a.png"),
                                           str(d / "sub" / "b.jpg")]
    assert {(p["height"], p["width"]) for p in preds} == {(40, 48), (36, 36), (64, 50)}
    for stem in ("a", "a-2", "b"):
        assert (out / f"{stem}_overlay.png").exists()
    assert Image.open(out / "a-2_mask.png").size == (36, 36)
    assert "wrote 3 prediction(s)" in stdout


def test_tiny_images_and_missing_paths_are_one_line_each(ckpt, tmp_path, capsys):
    one = _img(tmp_path / "one.png", 1, 1)
    thin = _img(tmp_path / "thin.png", 16, 80)
    ok = _img(tmp_path / "ok.png", 32, 32)
    missing = tmp_path / "pimg"
    code, stdout, err = _predict(ckpt, tmp_path / "out", one, thin, missing, ok, capsys=capsys)
    assert code == 1
    assert err == [f"multimix predict: error: {missing}: no such file or directory",
                   f"multimix predict: error: {one}: image is 1x1 pixels, smaller than the "
                   "32-pixel minimum",
                   f"multimix predict: error: {thin}: image is 80x16 pixels, smaller than the "
                   "32-pixel minimum"]
    assert [ln.split(":")[0] for ln in stdout.splitlines() if "lung area" in ln] == [str(ok)]
    assert "wrote 1 prediction(s)" in stdout and "3 file(s) failed" in stdout

    code, stdout, err = _predict(ckpt, tmp_path / "out2", missing, capsys=capsys)
    assert (code, err) == (2, [f"multimix predict: error: {missing}: no such file or directory"])
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _predict(ckpt, tmp_path / "out3", empty, capsys=capsys)
    assert code == 2 and err[-1].startswith(
        f"multimix predict: error: {empty}: directory holds no images (.png,")


def test_large_images_are_decoded_reduced_and_small_ones_unchanged(tmp_path):
    jpg = _img(tmp_path / "big.jpg", 2500, 3000, quality=90)
    grey, size = load_grey_bounded(jpg, 1024, 32)
    assert size == (2500, 3000)
    assert max(grey.shape) <= 1024 and min(grey.shape) >= 1024 // 4
    png = _img(tmp_path / "big.png", 1100, 2100)
    grey, size = load_grey_bounded(png, 1024, 32)
    assert size == (1100, 2100) and grey.shape == (367, 700)  # reduce(3)
    full = load_grey(png)
    assert abs(float(grey.mean()) - float(full.mean())) < 1.0
    small = _img(tmp_path / "small.png", 300, 200)
    grey, size = load_grey_bounded(small, 1024, 32)
    assert size == (300, 200) and np.array_equal(grey, load_grey(small))
    with pytest.raises(DataError, match=r"empty file \(0 bytes\)"):
        (tmp_path / "z.png").write_bytes(b"")
        load_grey_bounded(tmp_path / "z.png", 1024, 32)
