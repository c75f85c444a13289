"""A test-only network whose outputs are known in closed form, and a tiny prepared dataset writer.

:class:`KnownNet` has the interface :func:`multimix.engine.eval_step` uses (``flags``,
``encoder``, ``cls_head``, ``forward(seg=...)``, ``forward_all``, ``saliency``), so ``evaluate``
and ``predict`` run their real code paths on it. With ``x = u8 / 127.5 - 1`` (the engine's
normalisation) and ``gain = 1`` (the value the tests save in the checkpoint; a fresh KnownNet has
``gain = 0``, so a checkpoint that is not loaded gives p = 0.5 everywhere):

- classification: ``P(class 1) = (mean(x) + 1) / 2 = mean(u8) / 255``; ``P(class 0) = 1 - that``;
- segmentation: ``logit = 40 · x`` per pixel, so the predicted lung is exactly ``u8 >= 128``;
- saliency: 1 on predicted-lung pixels of the left half of the columns (``col < W / 2``), else 0.

:func:`install` makes :func:`multimix.model.create_model` (which ``checkpoint.load_model`` calls)
build a KnownNet, and :func:`save_checkpoint` writes a real checkpoint of it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from multimix.model import VARIANT_FLAGS


class _Encoder(nn.Module):
    def forward(self, x, dropout: bool = True):  # (B, 1, H, W) → [(B, 1, H, W)]
        return [x]


class _ClsHead(nn.Module):
    def __init__(self, gain: nn.Parameter):
        super().__init__()
        self.gain = gain

    def forward(self, feat):  # (B, 1, H, W) → logits (B, 2) = [0, gain · logit(p)]
        p = ((feat.float().mean(dim=(1, 2, 3)) + 1) / 2).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.zeros_like(p), self.gain * torch.log(p / (1 - p))], dim=1)


class KnownNet(nn.Module):
    variant = "multimix"
    flags = VARIANT_FLAGS["multimix"]

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(()))
        self.encoder = _Encoder()
        self.cls_head = _ClsHead(self.gain)
        self.decoder = None

    def seg_logits(self, x):  # (B, 1, H, W) → (B, 1, H, W)
        return self.gain * 40.0 * x.float()

    def saliency(self, x):  # (B, 1, H, W) → (B, 1, H, W) in {0, 1}
        cols = torch.arange(x.shape[-1], device=x.device)
        left = (cols < x.shape[-1] / 2).to(torch.float32)
        return (x > 0).to(torch.float32) * left * (self.gain != 0).float()

    def forward(self, cls=None, weak=None, strong=None, seg=None, useg=None):
        out = {}
        if cls is not None:
            out["cls_logits"] = self.cls_head(cls)
        if seg is not None:
            out["seg_logits"] = self.seg_logits(seg)
            out["seg_saliency"] = self.saliency(seg)
        return out

    def forward_all(self, x):
        return {"cls_logits": self.cls_head(x), "seg_logits": self.seg_logits(x),
                "saliency": self.saliency(x)}


def install(monkeypatch) -> None:
    """``create_model`` builds a :class:`KnownNet` for the rest of the test (where checkpoints
    are loaded: :func:`multimix.checkpoint.load_model`)."""
    from multimix import checkpoint

    monkeypatch.setattr(checkpoint, "create_model", lambda cfg: KnownNet())


def save_checkpoint(path: Path, cfg, splits: dict, classes=("NORMAL", "PNEUMONIA"),
                    epoch: int = 3) -> Path:
    """A real ``checkpoint.pt`` (``checkpoint.build_state`` / ``save``) of a KnownNet, gain 1."""
    from multimix import checkpoint

    net = KnownNet()
    with torch.no_grad():
        net.gain.fill_(1.0)
    path.mkdir(parents=True, exist_ok=True)
    state = checkpoint.build_state(model=net, optimizer=None, scheduler=None, epoch=epoch,
                                   config=cfg, splits=splits, classes=list(classes), history=[])
    checkpoint.save(state, str(path / checkpoint.FILENAME))
    return path


def write_prepared(uri: Path, task: str, rows: list[dict], size: int,
                   classes=("NORMAL", "PNEUMONIA"), source: str = "known") -> str:
    """A prepared dataset (the real :class:`DatasetWriter`) from rows ``{"id", "image"
    (size, size) uint8, "label"}`` (cls) or ``{"id", "image", "mask" {0,1}, "ignore" {0,1}|None}``
    (seg)."""
    from multimix.data.images import encode_png
    from multimix.data.prepare import DatasetWriter

    w = DatasetWriter(str(uri), None)
    for r in rows:
        png = encode_png(r["image"], 1)
        w.add({"id": r["id"], "source": source, "task": task, "image": png,
               "mask": encode_png(r["mask"] * np.uint8(255), 1) if task == "seg" else None,
               "ignore": (encode_png(r["ignore"] * np.uint8(255), 1)
                          if r.get("ignore") is not None else None),
               "label": r.get("label"), "hash": hashlib.sha256(png).hexdigest(),
               "path": r["id"] + ".png", "orig_height": size, "orig_width": size})
    w.finish(source=source, task=task, image_size=size,
             classes=list(classes) if task == "cls" else None, skipped=[], parameters={})
    return str(uri)
