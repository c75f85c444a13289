"""Saliency maps ``|∂ max_c score_c / ∂x|`` (Simonyan et al.), as MultiMix's bridge uses them.

The official notebook ran ``loss.backward()`` on the max score, read ``x.grad`` and then zeroed the
optimizer's gradients — which accumulates into every parameter's ``.grad``, needs an optimizer at
inference and breaks DistributedDataParallel (a second backward per forward). Here the pass runs
through *detached* copies of the parameters (``torch.func.functional_call``) and asks
``torch.autograd.grad`` for the input gradient only: no parameter is part of the graph, no
``.grad`` is touched, no weight gradient is computed, nothing DDP hooks on fires.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def _detached(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p.detach() for name, p in module.named_parameters()}
    out.update({name: b for name, b in module.named_buffers()})
    return out


def saliency_map(encoder: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|∂ max_c logit_c(x_i) / ∂x_i|`` per image, shape of ``x``, float32, detached.

    The encoder runs as in eval mode (dropout off), as in the paper. Images are independent
    (InstanceNorm is per sample), so the gradient of the summed per-image max scores w.r.t. the
    batch is each image's own gradient. Works under ``torch.no_grad()`` (grad mode is enabled
    locally) but not under ``torch.inference_mode()``.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        feats = functional_call(encoder, _detached(encoder), (xg,), {"dropout": False})
        logits = functional_call(head, _detached(head), (feats[-1],))
        score = logits.float().max(dim=1).values.sum()
        (grad,) = torch.autograd.grad(score, xg)
    return grad.detach().float().abs()
