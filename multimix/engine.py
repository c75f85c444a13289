"""One training step, one evaluation step, the optimizer (pure torch, no Ray).

Everything that trains or scores the model — the Ray Train loop, ``evaluate``, ``predict``, the
benchmark — goes through :func:`to_input`, :func:`train_step` and :func:`eval_step`, so the input
normalisation is the same everywhere (the official code normalised train and validation images
differently).

Typical use (one worker)::

    model = prepare_model(create_model(cfg.model), cfg, device)   # device, channels_last, compile
    ddp = DistributedDataParallel(model) if distributed else model
    optimizer, scheduler = build_optimizer(ddp, cfg)
    for epoch ...:
        for batch in batches:                 # dict of uint8/int64 CPU tensors, DESIGN §3
            terms = train_step(ddp, batch, optimizer, cfg, device)
        scheduler.step()
    torch.save(unwrap(ddp).state_dict(), ...)  # the bare MultiMixNet's state_dict
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from multimix.config import ObjectiveConfig, OptimConfig
from multimix.model import unwrap
from multimix.objective import TERM_KEYS, multimix_loss
from multimix.variants import STREAMS, batch_key, streams_for, variant_flags

__all__ = [
    "to_input",
    "autocast",
    "prepare_model",
    "build_optimizer",
    "train_step",
    "eval_step",
    "move_batch",
]

#: batch keys holding images (uint8) → model stream name (``<stream>_img`` → ``<stream>``)
IMAGE_STREAMS = {batch_key(s): s for s in STREAMS}


def to_input(u8: torch.Tensor, device: Union[str, torch.device, None] = None,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 images (B, C, H, W) → normalised float32 on ``device``: ``(x/255 - 0.5) / 0.5``.

    The one normalisation used in training, validation, evaluation and prediction. A floating
    input is taken to be on the same 0..255 scale.
    """
    x = u8.to(device, non_blocking=True) if device is not None else u8
    x = x.to(torch.float32) * (1.0 / 127.5) - 1.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(device: Union[str, torch.device], precision: str = "none"):
    """``torch.autocast(device_type, bfloat16)`` for ``precision == "bf16"``, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if precision not in ("none", None):
        raise ValueError(f"optim.precision: expected 'none' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


def _split_cfg(cfg) -> tuple[OptimConfig, ObjectiveConfig]:
    """``(cfg.optim, cfg.objective)`` of a :class:`~multimix.config.Config`."""
    if not (isinstance(getattr(cfg, "optim", None), OptimConfig)
            and isinstance(getattr(cfg, "objective", None), ObjectiveConfig)):
        raise TypeError(f"cfg: expected a multimix.config.Config, got {type(cfg).__name__}")
    return cfg.optim, cfg.objective


def prepare_model(model: nn.Module, cfg, device) -> nn.Module:
    """Move to ``device``; channels_last and in-place ``Module.compile()`` of the sub-networks
    as ``cfg.optim`` asks. Call once, before wrapping in DDP. State-dict keys stay unchanged."""
    optim, _ = _split_cfg(cfg)
    model = model.to(device)
    if optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if optim.compile:
        from torch import _dynamo

        # a part that fails to compile runs eagerly (dynamo logs why) instead of failing the run
        _dynamo.config.suppress_errors = True
        # graphs per compiled forward: train / no_grad weak / saliency / eval modes × shapes
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 32)
        net = unwrap(model)
        # The saliency pass calls autograd.grad inside MultiMixNet.forward: compile the encoder
        # and the decoder, not forward. Whole modules, not their blocks: dynamo caches graphs per
        # code object, so nine blocks sharing DoubleConv.forward hit its recompile limit (8)
        # and ran eagerly (seen with backend="aot_eager" here).
        net.encoder.compile()
        if net.decoder is not None:
            net.decoder.compile()
    return model


def build_optimizer(model: nn.Module, cfg):
    """``(Adam(lr, weight_decay), StepLR(step_size, gamma))`` from ``cfg.optim``.

    Step the scheduler once per epoch.
    """
    optim, _ = _split_cfg(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=optim.step_size, gamma=optim.gamma)
    return opt, sched


def move_batch(batch: dict, device, keys) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def _needed_streams(variant: str) -> list[str]:
    """The image batch keys ``variant`` consumes (:func:`multimix.variants.streams_for`)."""
    return [batch_key(s) for s in streams_for(variant)]


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, cfg,
               device: Union[str, torch.device], variant: Optional[str] = None,
               teacher: Optional[nn.Module] = None, labeler=None) -> dict[str, float]:
    """One optimizer step on one batch (DESIGN §3); returns ``{loss, ce_sup, ce_pseudo, dice,
    kl, accept_rate}`` as floats.

    ``model`` may be the bare :class:`MultiMixNet` or its DDP wrapper; ``variant`` defaults to the
    network's own. ``cfg`` is the run's :class:`~multimix.config.Config` (``.optim``,
    ``.objective``). bf16 autocast and channels_last follow ``cfg.optim``. The
    streams go through one forward call (weak branch under no_grad, saliency and decoder on the
    segmentation images only); the loss is computed in float32 outside autocast. One host sync,
    at the end.

    Stable-SSL hooks: ``teacher`` (e.g. :attr:`multimix.ema.ModelEMA.module`) makes the weak-view
    logits in eval mode instead of the student; ``labeler``
    (:class:`multimix.objective.PseudoLabeler`) turns them into pseudo-labels and adds per-class
    terms to the result.
    """
    optim_cfg, obj_cfg = _split_cfg(cfg)
    variant = variant or unwrap(model).variant
    f = variant_flags(variant)
    missing = [k for k in _needed_streams(variant) if k not in batch]
    if f.has_cls and "cls_label" not in batch:
        missing.append("cls_label")
    if f.has_seg and "seg_mask" not in batch:
        missing.append("seg_mask")
    if missing:
        raise KeyError(f"train_step({variant}): batch lacks {', '.join(missing)}")

    model.train()
    streams = {
        IMAGE_STREAMS[k]: to_input(batch[k], device, optim_cfg.channels_last)
        for k in _needed_streams(variant)
    }
    targets = move_batch(batch, device, ("cls_label", "seg_mask", "seg_ignore"))
    weak = streams.pop("weak", None) if teacher is not None else None
    with autocast(device, optim_cfg.precision):
        out = model(**streams)
        if weak is not None:
            out["weak_logits"] = _teacher_logits(teacher, weak)
    loss, terms = multimix_loss(out, targets, obj_cfg, variant, labeler=labeler)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    keys = list(TERM_KEYS) + [k for k in terms if k not in TERM_KEYS]
    values = torch.stack([terms[k] for k in keys]).tolist()
    return dict(zip(keys, values))


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Classification logits (B, C) of the teacher network in eval mode (no dropout)."""
    net = unwrap(teacher)
    net.eval()
    return net.cls_head(net.encoder(x)[-1])


@torch.no_grad()
def eval_step(model: nn.Module, batch: dict, device: Union[str, torch.device],
              channels_last: bool = False, precision: str = "none",
              saliency: bool = False) -> dict[str, np.ndarray]:
    """Probabilities for an evaluation/prediction batch, as float32 numpy arrays.

    * ``cls_img`` → ``cls_prob (B, C)`` (softmax), for variants with a classification head;
    * ``seg_img`` → ``seg_prob (B, 1, H, W)`` (sigmoid), for variants with a decoder, and
      ``seg_saliency`` when ``saliency=True`` and the variant has the bridge;
    * ``img`` → all of ``cls_prob``, ``seg_prob`` and ``saliency`` for the same images (predict).

    Runs the bare network in eval mode (dropout off) under ``no_grad`` (the saliency pass enables
    grad locally for the input only). Not under ``inference_mode``.
    """
    net = unwrap(model)
    net.eval()
    f = net.flags
    res: dict[str, np.ndarray] = {}

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    with autocast(device, precision):
        if "cls_img" in batch and f.has_cls:
            x = to_input(batch["cls_img"], device, channels_last)
            res["cls_prob"] = np32(net.cls_head(net.encoder(x)[-1]).float().softmax(1))
        if "seg_img" in batch and f.has_seg:
            x = to_input(batch["seg_img"], device, channels_last)
            out = net(seg=x)
            res["seg_prob"] = np32(torch.sigmoid(out["seg_logits"].float()))
            if saliency and "seg_saliency" in out:
                res["seg_saliency"] = np32(out["seg_saliency"])
        if "img" in batch:
            x = to_input(batch["img"], device, channels_last)
            out = net.forward_all(x)
            if "cls_logits" in out:
                res["cls_prob"] = np32(out["cls_logits"].float().softmax(1))
            if "seg_logits" in out:
                res["seg_prob"] = np32(torch.sigmoid(out["seg_logits"].float()))
            if "saliency" in out:
                res["saliency"] = np32(out["saliency"])
            elif saliency and f.has_cls:
                res["saliency"] = np32(net.saliency(x))
    return res
