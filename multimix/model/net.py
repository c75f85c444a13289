"""The MultiMix network: a shared encoder, a classification head, a decoder with a saliency bridge.

Which modules exist depends on the variant (:data:`multimix.variants.VARIANT_FLAGS`): a variant
builds only what it uses, so DistributedDataParallel never sees an unused parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from multimix.model.blocks import ClsHead, Decoder, Encoder, scaled_widths
from multimix.model.saliency import saliency_map
from multimix.variants import VARIANT_FLAGS, VariantFlags, variant_flags  # noqa: F401


class MultiMixNet(nn.Module):
    """U-Net encoder shared by a classification head and a segmentation decoder.

    Inputs are normalised float images ``(B, in_channels, H, W)`` (see
    :func:`multimix.engine.to_input`) with H, W multiples of 16 (32 recommended).
    """

    def __init__(self, variant: str = "multimix", width: float = 1.0, dropout: float = 0.25,
                 num_classes: int = 2, in_channels: int = 1):
        super().__init__()
        self.variant = variant
        self.flags = variant_flags(variant)
        self.widths = scaled_widths(width)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.encoder = Encoder(in_channels, self.widths, dropout)
        # The saliency bridge needs the classification head (saliency of the predicted class).
        self.cls_head = ClsHead(self.widths[-1], num_classes) if self.flags.has_cls else None
        if self.flags.has_seg:
            extra = 2 * in_channels if self.flags.bridge else 0  # cat(x, saliency)
            self.decoder = Decoder(self.widths, dropout, extra=extra)
        else:
            self.decoder = None

    # ------------------------------------------------------------------------------------------

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """``|∂ max_c logit_c / ∂x|`` per image (encoder as in eval mode), detached, float32."""
        if self.cls_head is None:
            raise RuntimeError(f"variant {self.variant!r} has no classification head")
        return saliency_map(self.encoder, self.cls_head, x)

    @staticmethod
    def bridge_input(x: torch.Tensor, sal: torch.Tensor, size) -> torch.Tensor:
        """``cat(x, saliency)`` area-downsampled to the bottleneck ``size``.

        The saliency is scaled per image to max 1 first: raw input gradients are ~1e-3 and drift
        with training, which would make the bridge channel vanish next to the image channel.
        """
        peak = sal.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        both = torch.cat([x.float(), sal / peak], dim=1)
        return F.adaptive_avg_pool2d(both, size)  # == interpolate(mode="area")

    def _decode(self, feats, x: torch.Tensor, sal: Optional[torch.Tensor] = None):
        bridge = None
        if self.flags.bridge:
            if sal is None:
                sal = self.saliency(x)
            bridge = self.bridge_input(x, sal, feats[-1].shape[-2:])
        return self.decoder(feats, bridge), sal

    # ------------------------------------------------------------------------------------------

    def forward(self, cls: Optional[torch.Tensor] = None, weak: Optional[torch.Tensor] = None,
                strong: Optional[torch.Tensor] = None, seg: Optional[torch.Tensor] = None,
                useg: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """All streams of one training step in one call (one DDP forward per backward).

        Streams the variant does not use are ignored. The encoder runs once over
        ``cat(cls, strong, seg, useg)`` with gradients; ``weak`` runs under ``no_grad`` (its
        logits only make pseudo-labels); saliency and the decoder run on ``seg``/``useg`` only.

        Returns whichever apply: ``cls_logits (B_l, C)``, ``weak_logits``, ``strong_logits``,
        ``seg_logits (B_s, 1, H, W)``, ``useg_logits``, ``seg_saliency``, ``useg_saliency``.
        """
        f = self.flags
        out: dict[str, torch.Tensor] = {}
        if not f.has_cls:
            cls = weak = strong = None
        if not f.ssl:
            weak = strong = None
        if not f.has_seg:
            seg = useg = None

        if weak is not None:
            with torch.no_grad():
                out["weak_logits"] = self.cls_head(self.encoder(weak)[-1])

        cls_parts = [(k, t) for k, t in (("cls", cls), ("strong", strong)) if t is not None]
        seg_parts = [(k, t) for k, t in (("seg", seg), ("useg", useg)) if t is not None]
        parts = cls_parts + seg_parts
        if not parts:
            return out
        x = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts], dim=0)
        n_cls = sum(t.shape[0] for _, t in cls_parts)
        # Saliency first: its transient graph is freed before the main pass saves activations.
        sal = self.saliency(x[n_cls:]) if (seg_parts and f.bridge) else None
        feats = self.encoder(x)

        if cls_parts:
            logits = self.cls_head(feats[-1][:n_cls])
            start = 0
            for k, t in cls_parts:
                out[f"{k}_logits"] = logits[start:start + t.shape[0]]
                start += t.shape[0]
        if seg_parts:
            seg_feats = [ft[n_cls:] for ft in feats] if n_cls else feats
            seg_x = x[n_cls:] if n_cls else x
            seg_logits, sal = self._decode(seg_feats, seg_x, sal)
            start = 0
            for k, t in seg_parts:
                n = t.shape[0]
                out[f"{k}_logits"] = seg_logits[start:start + n]
                if sal is not None:
                    out[f"{k}_saliency"] = sal[start:start + n]
                start += n
        return out

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output for the same images: ``cls_logits``, ``seg_logits``, ``saliency``.

        For prediction/evaluation (and the naive benchmark baseline); not for DDP training.
        """
        sal = self.saliency(x) if self.flags.bridge else None
        feats = self.encoder(x)
        out: dict[str, torch.Tensor] = {}
        if self.cls_head is not None:
            out["cls_logits"] = self.cls_head(feats[-1])
        if self.decoder is not None:
            out["seg_logits"], sal = self._decode(feats, x, sal)
            if sal is not None:
                out["saliency"] = sal
        return out
