"""The MultiMix objective (pure torch): ``CE_sup + λ·CE_pseudo + α·Dice + β·KL``.

Every term is a mean of per-sample values, so under DDP (equal local batch sizes, gradients
averaged over ranks) the gradient equals the single-process gradient of the global batch.

* ``ce_sup`` — cross-entropy on labeled classification images.
* ``ce_pseudo`` — FixMatch: the weak view's softmax gives a hard pseudo-label where its maximum is
  ≥ the threshold t; cross-entropy of the strong view against it, masked, **divided by the
  unlabeled batch size** (not by the number accepted). No gradient through the weak view.
* ``dice`` — soft Dice loss per image on labeled masks, ignore pixels left out (weight 0),
  averaged over images.
* ``kl`` — segmentation consistency: per-pixel Bernoulli KL(σ(s_i) ‖ σ(u_i)) between the sigmoid
  lung probabilities of labeled seg image i and unlabeled image i, for pairs
  ``i < min(B_s, B_us)``, mean over pairs and pixels; gradient flows into both predictions.
  The official notebook applied ``softmax`` over the single output channel, which is identically 1,
  so its KL term was always zero; this one is not (see tests/core/test_objective.py).
* ``accept_rate`` — fraction of unlabeled images whose pseudo-label was accepted (no gradient).

Terms a variant does not use are reported as 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from multimix.model.net import variant_flags

__all__ = [
    "TERM_KEYS",
    "pseudo_label",
    "supervised_ce",
    "pseudo_label_ce",
    "soft_dice_loss",
    "bernoulli_kl",
    "multimix_loss",
]

#: keys of the ``terms`` dict, in a fixed order (the engine stacks them for one host sync)
TERM_KEYS = ("loss", "ce_sup", "ce_pseudo", "dice", "kl", "accept_rate")


def pseudo_label(weak_logits: torch.Tensor, threshold: float):
    """FixMatch pseudo-labels: ``(targets (B,) int64, mask (B,) float 0/1)``.

    ``mask[i] = 1`` where ``max softmax(weak_logits[i]) >= threshold``. Computed without gradient.
    """
    with torch.no_grad():
        probs = weak_logits.detach().float().softmax(dim=1)
        conf, targets = probs.max(dim=1)
        mask = (conf >= threshold).to(torch.float32)
    return targets, mask


def supervised_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (float32)."""
    return F.cross_entropy(logits.float(), labels.long())


def pseudo_label_ce(strong_logits: torch.Tensor, targets: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """``mean_i(mask_i · CE(strong_i, target_i))`` — divided by the unlabeled batch size."""
    ce = F.cross_entropy(strong_logits.float(), targets.long(), reduction="none")
    return (ce * mask.to(ce.dtype)).mean()


def soft_dice_loss(seg_logits: torch.Tensor, mask: torch.Tensor,
                   ignore: Optional[torch.Tensor] = None, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, per image, averaged over images.

    ``1 - (2·Σ p·g·w + s) / (Σ p·w + Σ g·w + s)`` with ``p = σ(logits)``, ``g`` the 0/1 mask,
    ``w = 1 - ignore`` and smoothing ``s`` (keeps empty-mask images defined: predicting nothing
    there gives loss 0).
    """
    p = torch.sigmoid(seg_logits.float())
    g = mask.to(p.dtype)
    dims = tuple(range(1, p.dim()))
    if ignore is not None:
        w = 1.0 - ignore.to(p.dtype)
        p = p * w
        g = g * w
    inter = (p * g).sum(dims)
    denom = p.sum(dims) + g.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return (1.0 - dice).mean()


def bernoulli_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``KL(Bern(σ(p)) ‖ Bern(σ(q)))``, mean over samples and pixels (float32).

    Computed from log-sigmoids, stable for large logits.
    """
    a = p_logits.float()
    b = q_logits.float()
    p = torch.sigmoid(a)
    kl = p * (F.logsigmoid(a) - F.logsigmoid(b)) + (1.0 - p) * (F.logsigmoid(-a) - F.logsigmoid(-b))
    return kl.mean()


def multimix_loss(out: dict, batch: dict, cfg, variant: str):
    """``(loss, terms)`` for the model outputs ``out`` (see :meth:`MultiMixNet.forward`).

    ``batch`` holds the targets on the outputs' device: ``cls_label`` (B_l,), ``seg_mask`` and
    optionally ``seg_ignore`` (B_s, 1, H, W) 0/1. ``cfg`` is an
    :class:`~multimix.config.ObjectiveConfig` (threshold, lambda_u, alpha, beta), or a Config.
    ``terms`` maps :data:`TERM_KEYS` to 0-dim float32 tensors (detached).
    """
    cfg = getattr(cfg, "objective", cfg)
    f = variant_flags(variant)
    ref = next(iter(out.values()))
    zero = torch.zeros((), dtype=torch.float32, device=ref.device)
    terms = {k: zero for k in TERM_KEYS}
    loss = zero

    if f.has_cls:
        terms["ce_sup"] = supervised_ce(out["cls_logits"], batch["cls_label"])
        loss = loss + terms["ce_sup"]
    if f.ssl:
        targets, mask = pseudo_label(out["weak_logits"], cfg.threshold)
        terms["ce_pseudo"] = pseudo_label_ce(out["strong_logits"], targets, mask)
        terms["accept_rate"] = mask.mean()
        loss = loss + cfg.lambda_u * terms["ce_pseudo"]
    if f.has_seg:
        terms["dice"] = soft_dice_loss(out["seg_logits"], batch["seg_mask"],
                                       batch.get("seg_ignore"))
        loss = loss + cfg.alpha * terms["dice"]
    if f.seg_kl:
        n = min(out["seg_logits"].shape[0], out["useg_logits"].shape[0])
        if n > 0:
            terms["kl"] = bernoulli_kl(out["seg_logits"][:n], out["useg_logits"][:n])
            loss = loss + cfg.beta * terms["kl"]
    terms["loss"] = loss
    return loss, {k: v.detach() for k, v in terms.items()}
