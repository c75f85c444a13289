"""A short overfit on a few real chest X-rays: Dice rises, cross-entropy falls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from multimix.config import Config
from multimix.engine import build_optimizer, eval_step, train_step
from multimix.model import create_model

SIZE = 64
pytestmark = pytest.mark.realdata


def _load(path, mask=False):
    im = Image.open(path).convert("L")
    im = im.resize((SIZE, SIZE), Image.NEAREST if mask else Image.BOX)
    return np.asarray(im, dtype=np.uint8)


def _u8(arrs):
    return torch.from_numpy(np.stack(arrs)[:, None].copy())


def _dice(prob, mask):
    p = prob[:, 0] >= 0.5
    g = mask[:, 0] > 0
    inter = (p & g).sum((1, 2))
    return float(np.mean((2 * inter + 1e-6) / (p.sum((1, 2)) + g.sum((1, 2)) + 1e-6)))


def _ce(prob, labels):
    return float(-np.mean(np.log(prob[np.arange(len(labels)), labels] + 1e-8)))


@pytest.mark.slow
def test_overfit_few_real_images(shared_data):
    v7 = shared_data / "v7-covid-lungs"
    names = sorted(p.name for p in (v7 / "masks").glob("*.png"))[:4]
    seg_img = _u8([_load(v7 / "images" / n) for n in names])
    seg_mask = _u8([(_load(v7 / "masks" / n, mask=True) > 127).astype(np.uint8) for n in names])
    k = shared_data / "kermany-cxr" / "train"
    normal = sorted((k / "NORMAL").glob("*.jpeg"))
    pneu = sorted((k / "PNEUMONIA").glob("*.jpeg"))
    cls_img = _u8([_load(p) for p in normal[:4] + pneu[:4]])
    cls_label = torch.tensor([0] * 4 + [1] * 4)
    unl = _u8([_load(p) for p in normal[4:6] + pneu[4:6]])
    batch = {
        "cls_img": cls_img, "cls_label": cls_label,
        "weak_img": unl, "strong_img": torch.flip(unl, dims=[3]),
        "seg_img": seg_img, "seg_mask": seg_mask,
        "seg_ignore": torch.zeros_like(seg_mask),
        "useg_img": unl,
    }

    cfg = Config()
    cfg.model.width = 0.25
    cfg.model.dropout = 0.0
    cfg.optim.lr = 3e-3
    torch.manual_seed(0)
    model = create_model(cfg.model)
    opt, _ = build_optimizer(model, cfg)

    def score():
        r = eval_step(model, {"cls_img": cls_img, "seg_img": seg_img}, "cpu")
        return _dice(r["seg_prob"], seg_mask.numpy()), _ce(r["cls_prob"], cls_label.numpy())

    dice0, ce0 = score()
    history = [train_step(model, batch, opt, cfg, "cpu") for _ in range(30)]
    dice1, ce1 = score()
    assert dice1 > max(dice0 + 0.2, 0.6), (dice0, dice1)
    assert ce1 < ce0 * 0.7, (ce0, ce1)
    first = np.mean([h["dice"] for h in history[:5]])
    last = np.mean([h["dice"] for h in history[-5:]])
    assert last < first
    assert all(np.isfinite(h["loss"]) for h in history)
