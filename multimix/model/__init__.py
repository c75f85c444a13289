"""MultiMix model (pure torch, no Ray): :func:`create_model`, :class:`MultiMixNet`, variant flags.

Checkpoints store ``unwrap(model).state_dict()`` (the bare :class:`MultiMixNet`, never the DDP or
``torch.compile`` wrapper) plus the :class:`~multimix.config.ModelConfig` needed to rebuild it with
:func:`create_model`.
"""

from __future__ import annotations

from torch import nn

from multimix.model.blocks import BASE_WIDTHS, scaled_widths
from multimix.model.net import VARIANT_FLAGS, MultiMixNet, VariantFlags, variant_flags
from multimix.model.saliency import saliency_map

__all__ = [
    "BASE_WIDTHS",
    "VARIANT_FLAGS",
    "MultiMixNet",
    "VariantFlags",
    "create_model",
    "saliency_map",
    "scaled_widths",
    "unwrap",
    "variant_flags",
]


def create_model(cfg) -> MultiMixNet:
    """Build the network for ``cfg`` (a :class:`~multimix.config.ModelConfig`, or a full Config)."""
    mcfg = getattr(cfg, "model", cfg)
    return MultiMixNet(
        variant=mcfg.variant,
        width=mcfg.width,
        dropout=mcfg.dropout,
        num_classes=mcfg.num_classes,
        in_channels=mcfg.in_channels,
    )


def unwrap(model: nn.Module) -> MultiMixNet:
    """The bare network inside DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
