"""Building blocks of the MultiMix U-Net: double-conv, encoder, classification head, decoder.

Every block is per-sample (InstanceNorm, no BatchNorm), so concatenating streams along the batch
dimension and running them together gives exactly the per-stream results.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BASE_WIDTHS = (16, 32, 64, 128, 256)


def scaled_widths(width: float) -> list[int]:
    """``round(width * [16, 32, 64, 128, 256])`` (at least 1 channel each)."""
    return [max(1, int(round(width * c))) for c in BASE_WIDTHS]


class DoubleConv(nn.Module):
    """(3×3 conv → InstanceNorm(affine) → LeakyReLU(0.2)) × 2, then dropout.

    ``forward(x, dropout=None)``: ``dropout=None`` follows ``self.training``; ``False`` turns it off
    whatever the mode (used by the saliency pass, "encoder in eval mode", without flipping the
    module's mode — which would not be safe under DDP or with other threads).
    The LeakyReLUs are in-place: InstanceNorm's backward needs its input, not its output, so this
    saves one activation per conv without changing any value.
    """

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm1 = nn.InstanceNorm2d(out_ch, affine=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(out_ch, affine=True)
        self.p = float(dropout)

    def forward(self, x: torch.Tensor, dropout: Optional[bool] = None) -> torch.Tensor:
        x = F.leaky_relu(self.norm1(self.conv1(x)), 0.2, inplace=True)
        x = F.leaky_relu(self.norm2(self.conv2(x)), 0.2, inplace=True)
        active = self.training if dropout is None else bool(dropout)
        if self.p > 0 and active:
            x = F.dropout(x, self.p, training=True)
        return x


class Encoder(nn.Module):
    """Five double-conv blocks with 2×2 max-pool between; returns the five feature maps.

    Feature ``k`` has ``widths[k]`` channels at ``H / 2**k``; the last is the bottleneck (H/16).
    """

    def __init__(self, in_ch: int, widths: Sequence[int], dropout: float):
        super().__init__()
        chans = [in_ch, *widths]
        self.blocks = nn.ModuleList(
            DoubleConv(chans[i], chans[i + 1], dropout) for i in range(len(widths))
        )

    def forward(self, x: torch.Tensor, dropout: Optional[bool] = None) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x, dropout)
            feats.append(x)
        return feats


class ClsHead(nn.Module):
    """Global average pool → linear → class logits."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.fc(bottleneck.mean(dim=(2, 3)))


class Decoder(nn.Module):
    """Bilinear ×2 up, concat skip, double-conv (out = skip width), ×4; then 1×1 conv → 1 logit.

    ``extra`` channels (the saliency bridge) are concatenated to the bottleneck before the first
    stage.
    """

    def __init__(self, widths: Sequence[int], dropout: float, extra: int = 0, out_ch: int = 1):
        super().__init__()
        self.extra = int(extra)
        stages = []
        cur = widths[-1] + self.extra
        for skip in reversed(widths[:-1]):
            stages.append(DoubleConv(cur + skip, skip, dropout))
            cur = skip
        self.stages = nn.ModuleList(stages)
        self.out = nn.Conv2d(widths[0], out_ch, 1)

    def forward(self, feats: Sequence[torch.Tensor],
                bridge: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = feats[-1]
        if self.extra:
            if bridge is None:
                raise ValueError("this decoder expects a saliency bridge tensor")
            x = torch.cat([x, bridge.to(x.dtype)], dim=1)
        for stage, skip in zip(self.stages, reversed(feats[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return self.out(x)
