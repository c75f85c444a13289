"""``multimix predict`` on images whose lungs are known, through a network whose outputs are known
(:mod:`known_model`: lung = grey level >= 128, saliency = the predicted lung in the left half,
P(PNEUMONIA) = mean grey / 255): the mask, the saliency and the overlay come back at the original
size, aligned, for odd sizes and aspect ratios, 8/16-bit, grey/RGB."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

import known_model as km
from multimix.config import load_config

MODEL_SIZE = 64
BG, LUNG = 30, 210


def _lungs(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) lung masks (H, W): two ellipses of different size and height, so a flip or a
    transposition moves them. The left one lies in columns < W/2, the right one in > W/2."""
    r, c = np.mgrid[0:h, 0:w]
    left = ((r - 0.50 * h) / (0.30 * h)) ** 2 + ((c - 0.28 * w) / (0.13 * w)) ** 2 <= 1
    right = ((r - 0.42 * h) / (0.20 * h)) ** 2 + ((c - 0.72 * w) / (0.10 * w)) ** 2 <= 1
    return left, right


def _far(mask: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels inside / outside ``mask`` farther than ``tol`` pixels from its boundary."""
    return (ndimage.distance_transform_edt(mask) > tol,
            ndimage.distance_transform_edt(~mask) > tol)


# (name, height, width, how it is stored)
CASES = [("grey8_wide", 301, 517, "L"), ("grey16_tall", 517, 203, "I;16"),
         ("rgb_odd", 259, 333, "RGB"), ("tiny_grey8", 45, 71, "L")]


def _write(tmp_path, name, h, w, mode):
    left, right = _lungs(h, w)
    grey = np.where(left | right, LUNG, BG).astype(np.uint8)
    path = tmp_path / f"{name}.png"
    if mode == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # full 16-bit range
    elif mode == "RGB":
        Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(path)
    else:
        Image.fromarray(grey).save(path)
    return path, grey, left, right


def test_predict_outputs_are_aligned_at_the_original_size(tmp_path, monkeypatch, capsys):
    from multimix.cli import main

    cfg = load_config("cpu-small", [f"data.image_size={MODEL_SIZE}"])
    ckpt = km.save_checkpoint(tmp_path / "ckpt", cfg, splits={})
    km.install(monkeypatch)
    cases = {name: _write(tmp_path, name, h, w, mode) for name, h, w, mode in CASES}
    assert Image.open(cases["grey16_tall"][0]).mode.startswith("I")
    out = tmp_path / "pred"
    code = main(["predict", "--checkpoint", str(ckpt), *(str(c[0]) for c in cases.values()),
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    preds = {p["image"]: p for p in json.loads((out / "predictions.json").read_text())}
    heat = colormaps["inferno"](1.0)[:3]
    for name, (path, grey, left, right) in cases.items():
        h, w = grey.shape
        lung = left | right
        p = preds[str(path)]
        # a model pixel covers (h/64) x (w/64) original pixels: decisions may differ within
        # about one model pixel of a boundary, nowhere else
        tol = 1.5 * max(h, w) / MODEL_SIZE + 1
        assert (p["height"], p["width"]) == (h, w)
        assert p["pneumonia_probability"] == pytest.approx(grey.mean() / 255, abs=0.01)
        assert p["probabilities"]["NORMAL"] == pytest.approx(1 - grey.mean() / 255, abs=0.01)

        mask = np.asarray(Image.open(p["mask"]))
        assert mask.shape == (h, w) and set(np.unique(mask)) == {0, 255}
        inside, outside = _far(lung, tol)
        assert (mask[inside] == 255).all() and (mask[outside] == 0).all(), name
        iou = np.sum((mask > 0) & lung) / np.sum((mask > 0) | lung)
        assert iou > 0.85, (name, iou)
        assert p["lung_fraction"] == pytest.approx(float(np.mean(mask > 0)))

        sal = np.asarray(Image.open(p["saliency"]))
        assert sal.shape == (h, w)
        left_in, _ = _far(left, tol)
        _, lung_out = _far(lung, tol)
        right_in, _ = _far(right, tol)
        assert (sal[left_in] == 255).all(), name  # the saliency is on the left lung
        assert (sal[right_in] == 0).all() and (sal[lung_out] == 0).all(), name

        ov = np.asarray(Image.open(p["overlay"]))
        assert ov.shape == (h, w, 3) and ov.dtype == np.uint8
        green = np.all(ov == (0, 255, 0), axis=-1)
        edge = ndimage.distance_transform_edt(~lung) + ndimage.distance_transform_edt(lung)
        assert green.sum() > 0.5 * np.sum(edge <= 1) / 2, name  # a boundary of about that length
        assert (edge[green] <= tol + 1).all(), name  # drawn at the lungs' boundary only
        plain = (right_in | lung_out) & ~green  # no saliency there: the image's own grey
        assert (ov[plain] == grey[plain][:, None]).all(), name
        tinted = np.round(0.4 * LUNG + 0.6 * 255 * np.asarray(heat))  # alpha 0.6 at saliency 1
        assert (np.abs(ov[left_in & ~green].astype(int) - tinted) <= 1).all(), name
