"""multimix.plots: valid PNGs of the documented size, boundary colours, overlay contents."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimix import metrics as M
from multimix import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path, size):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        return np.asarray(im.convert("RGB"))


def _disc(hw, cy, cx, r):
    yy, xx = np.mgrid[:hw, :hw]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2).astype(np.uint8)


def _images(n, hw=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(40, 200, size=(n, hw, hw), dtype=np.uint8)


def _has_colour(rgb, colour, tol=40):
    return bool(np.any(np.all(np.abs(rgb.astype(int) - np.array(colour)) <= tol, axis=-1)))


def test_plot_roc(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = np.clip(y * 0.4 + rng.random(50) * 0.6, 0, 1)
    fpr, tpr, _ = M.roc_curve(s, y)
    curves = {"multimix": (fpr, tpr, M.roc_auc(s, y)),
              "one-class": (*M.roc_curve([0.2, 0.3], [1, 1])[:2], float("nan"))}
    out = P.plot_roc(curves, tmp_path / "sub" / "roc.png")
    assert out == tmp_path / "sub" / "roc.png"
    _png(out, (5 * P.DPI, 5 * P.DPI))


def test_plot_dice_box(tmp_path):
    rng = np.random.default_rng(2)
    out = P.plot_dice_box({"v7": rng.random(20), "gb": rng.random(5), "empty": np.zeros(0)},
                          tmp_path / "dice.png")
    _png(out, (6 * P.DPI, 4 * P.DPI))


def test_boundary_overlay_colours():
    img = np.full((20, 20), 100, dtype=np.uint8)
    ref = _disc(20, 10, 10, 6)
    pred = _disc(20, 10, 12, 6)
    rgb = P.boundary_overlay(img, ref, pred)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    green = np.all(rgb == P.REF_COLOUR, axis=-1)
    red = np.all(rgb == P.PRED_COLOUR, axis=-1)
    assert green.any() and red.any()
    # coloured pixels are mask pixels; interior and background stay grey
    assert np.all(ref[green] == 1) and np.all(pred[red] == 1)
    assert np.all(rgb[10, 10] == 100) and np.all(rgb[0, 0] == 100)
    # identical masks: one yellow boundary, no green or red
    same = P.boundary_overlay(img, ref, ref)
    assert np.all(same[np.all(same != 100, axis=-1)] == P.BOTH_COLOUR)


@pytest.mark.parametrize("n,rows,cols", [(1, 1, 1), (3, 1, 3), (6, 2, 4)])
def test_plot_boundaries(tmp_path, n, rows, cols):
    imgs = _images(n)
    refs = np.stack([_disc(32, 16, 16, 9)] * n)
    preds = np.stack([_disc(32, 15, 19, 8)] * n)[:, None]  # (N, 1, H, W) accepted too
    assert P.grid_shape(n) == (rows, cols)
    titles = [f"img{i} Dice 0.9" for i in range(n)]
    out = P.plot_boundaries(imgs, refs, preds, tmp_path / f"b{n}.png", titles=titles)
    rgb = _png(out, (int(cols * P.CELL_IN * P.DPI), int(rows * P.CELL_IN * P.DPI)))
    assert _has_colour(rgb, P.REF_COLOUR, tol=10) and _has_colour(rgb, P.PRED_COLOUR, tol=10)


def test_plot_boundaries_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        P.plot_boundaries(_images(2), np.zeros((2, 16, 16)), np.zeros((2, 32, 32)),
                          tmp_path / "x.png")
    with pytest.raises(ValueError, match="titles"):
        P.plot_boundaries(_images(2), np.zeros((2, 32, 32)), np.zeros((2, 32, 32)),
                          tmp_path / "x.png", titles=["one"])


def test_plot_saliency(tmp_path):
    imgs = _images(5)
    sal = np.zeros((5, 32, 32))
    sal[:, 8:16, 8:16] = 1.0
    probs = np.array([[0.2, 0.8]] * 5)
    out = P.plot_saliency(imgs, sal, tmp_path / "sal.png", probs=probs,
                          class_names=M.KERMANY_CLASSES)
    _png(out, (int(4 * P.CELL_IN * P.DPI), int(2 * P.CELL_IN * P.DPI)))
    out = P.plot_saliency(imgs[:2, None], sal[:2, None], tmp_path / "sal2.png",
                          probs=np.array([0.3, 0.9]))
    _png(out, (int(2 * P.CELL_IN * P.DPI), int(P.CELL_IN * P.DPI)))


def test_overlay_png():
    img = np.full((24, 24), 80, dtype=np.uint8)
    mask = _disc(24, 12, 12, 7)
    sal = np.zeros((24, 24))
    sal[2:6, 2:6] = 5.0
    out = P.overlay_png(img, mask, sal)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    boundary = np.all(out == P.MASK_COLOUR, axis=-1)
    assert boundary.any() and np.all(mask[boundary] == 1)
    assert not np.all(out[3, 3] == 80)  # saliency tinted
    assert np.all(out[20, 2] == 80)  # no saliency, no mask: untouched grey
    # image only: grey to RGB unchanged
    plain = P.overlay_png(img)
    assert np.all(plain == 80)
    # probabilities are binarised at 0.5; zero saliency leaves the image alone
    out2 = P.overlay_png(img, mask * 0.9, np.zeros((24, 24)))
    assert np.array_equal(np.all(out2 == P.MASK_COLOUR, axis=-1), boundary)
    with pytest.raises(ValueError, match="saliency"):
        P.overlay_png(img, None, np.zeros((5, 5)))
    # the array can be written as a PNG by PIL directly
    assert Image.fromarray(out).mode == "RGB"


def test_plots_use_agg_without_pyplot(tmp_path):
    # even with a GUI backend requested, plotting neither imports pyplot nor needs a display
    code = (
        "import sys, numpy as np\n"
        "from multimix import plots as P\n"
        f"P.plot_dice_box({{'a': np.ones(3)}}, {str(tmp_path / 'd.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {**os.environ, "MPLBACKEND": "TkAgg", "DISPLAY": ""}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env,
                   cwd=Path(__file__).resolve().parents[2])
    _png(tmp_path / "d.png", (6 * P.DPI, 4 * P.DPI))
