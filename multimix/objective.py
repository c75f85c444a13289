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

Class-balanced pseudo-labelling (all off by default = the paper; docs/RESULTS.md): a
:class:`PseudoLabeler` passed to :func:`multimix_loss` replaces :func:`pseudo_label` with

* distribution alignment (ReMixMatch, Berthelot et al., ICLR 2020, §3.2) of the weak-view
  probabilities toward a target class prior (the labeled split's, or uniform):
  ``q̃ = Normalize(q · p(y) / p̃(y))`` with ``p̃`` a running mean of the model's predictions on
  unlabeled images (:func:`distribution_align`);
* class-wise adaptive thresholds: FlexMatch (Zhang et al., NeurIPS 2021, Eq. 6–7, the warm-up
  form; :func:`flexmatch_thresholds`) or FreeMatch (Wang et al., ICLR 2023, Eq. 6–9;
  :func:`freematch_thresholds`), beside FixMatch's fixed ``t``.

With a labeler the terms also hold, per class k, ``pl_argmax_c{k}`` (fraction of the unlabeled
batch whose pseudo-label is k), ``pl_accept_c{k}`` (fraction accepted with label k; the sum over
k is ``accept_rate``) and ``pl_threshold_c{k}`` (the threshold in force);
:func:`class_rates` turns their epoch means into per-class accept rates.

Terms a variant does not use are reported as 0.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from multimix.metrics import collective_device
from multimix.model.net import variant_flags

__all__ = [
    "TERM_KEYS",
    "pseudo_label",
    "supervised_ce",
    "pseudo_label_ce",
    "soft_dice_loss",
    "bernoulli_kl",
    "multimix_loss",
    "distribution_align",
    "flexmatch_thresholds",
    "freematch_thresholds",
    "PseudoLabeler",
    "make_labeler",
    "class_term_keys",
    "class_rates",
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


# ---------------------------------------------------------------------------------------------
# class-balanced pseudo-labelling


def distribution_align(probs: torch.Tensor, target: torch.Tensor,
                       model_marginal: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ReMixMatch distribution alignment (Berthelot et al., ICLR 2020, §3.2).

    ``q̃_i = Normalize(q_i · p(y) / p̃(y))``: each row of ``probs`` (B, C) is multiplied by the
    ratio of the target prior ``target`` (C,) to the running model marginal ``model_marginal``
    (C,) and renormalised to sum 1. Where the model over-predicts a class (``p̃ > p``) that
    class's probability shrinks, so the batch marginal moves toward ``target``.
    """
    ratio = target.to(probs) / model_marginal.to(probs).clamp_min(eps)
    q = probs * ratio
    return q / q.sum(dim=1, keepdim=True).clamp_min(eps)


def flexmatch_thresholds(sigma: torch.Tensor, unused: torch.Tensor | float,
                         tau: float) -> torch.Tensor:
    """FlexMatch class-wise thresholds (Zhang et al., NeurIPS 2021, Eq. 6 and 7, warm-up form).

    ``β(c) = σ(c) / max(max_c σ, N − Σ_c σ)`` and ``T(c) = M(β(c)) · τ`` with the convex mapping
    ``M(x) = x / (2 − x)``. ``σ`` (C,) is the learning effect of each class (the number — here
    the fraction — of unlabeled samples predicted as c above τ), ``unused`` = ``N − Σσ`` (the
    fraction not yet above τ). A class the model does not learn yet gets a low threshold.
    """
    denom = torch.maximum(sigma.max(), torch.as_tensor(unused, dtype=sigma.dtype))
    beta = sigma / denom.clamp_min(1e-12)
    return beta / (2.0 - beta) * tau


def freematch_thresholds(tau_global: torch.Tensor, p_tilde: torch.Tensor) -> torch.Tensor:
    """FreeMatch self-adaptive class-wise thresholds (Wang et al., ICLR 2023, Eq. 6–9).

    ``τ_t(c) = MaxNorm(p̃_t)(c) · τ_t = p̃_t(c) / max_c p̃_t(c) · τ_t``, where ``τ_t`` (0-dim) is
    the EMA of the mean max-confidence and ``p̃_t`` (C,) the EMA of the mean class probability on
    unlabeled batches (updated by :meth:`PseudoLabeler.update_stats`).
    """
    return p_tilde / p_tilde.max().clamp_min(1e-12) * tau_global


def _reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over the DDP ranks (identity without a process group), so every rank keeps
    identical running statistics."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(collective_device())
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t


class PseudoLabeler:
    """Stateful pseudo-labelling: distribution alignment and/or class-wise thresholds.

    Args:
        num_classes: C.
        threshold: τ, FixMatch's fixed threshold (also FlexMatch's base threshold).
        mode: ``"fixed"`` (FixMatch: every class uses τ), ``"flexmatch"`` or ``"freematch"``.
        dist_align: ``"none"``, ``"labeled"`` (toward ``prior``, the labeled class distribution)
            or ``"uniform"``.
        prior: (C,) target class distribution for ``dist_align="labeled"``.
        momentum: m of every running statistic, ``s ← m·s + (1 − m)·batch value`` (FreeMatch's
            λ; ReMixMatch kept a 128-batch moving average, m = 0.99 is a ~100-batch horizon).
        reduce: maps a batch statistic to its mean over DDP ranks (default: all-reduce when a
            process group is up), so the state stays identical on every rank.

    State (:meth:`state_dict`, float64 CPU tensors): ``marginal`` (C,) running mean of the
    (unaligned) weak-view probabilities (FreeMatch's p̃_t); ``da_marginal`` (C,) the same for
    distribution alignment (ReMixMatch's p̃); ``tau`` (0-dim, FreeMatch τ_t); ``sigma`` (C,)
    running fraction predicted as c with confidence ≥ τ (FlexMatch's σ, normalised by the batch
    size); ``steps``. Initial values follow the papers: p̃_0 = 1/C and τ_0 = 1/C (FreeMatch),
    σ = 0 (FlexMatch: every threshold starts at 0, rising as classes are learnt); the alignment's
    p̃ starts at the first batch's mean (as USB's ``DistAlignEMAHook``: a uniform start would
    push the first ~1/(1−m) batches toward the prior's majority class).

    FlexMatch counts σ over the *whole* unlabeled set (each sample's latest prediction); the
    unlabeled stream here carries no stable sample index, so σ is the running mean of the
    per-batch fractions instead (the same quantity in expectation).
    """

    MODES = ("fixed", "flexmatch", "freematch")
    ALIGN = ("none", "labeled", "uniform")

    def __init__(self, num_classes: int, threshold: float, mode: str = "fixed",
                 dist_align: str = "none", prior: Optional[Sequence[float]] = None,
                 momentum: float = 0.99,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        if dist_align not in self.ALIGN:
            raise ValueError(f"dist_align: expected one of {self.ALIGN}, got {dist_align!r}")
        c = int(num_classes)
        self.num_classes, self.threshold, self.mode = c, float(threshold), mode
        self.dist_align, self.momentum = dist_align, float(momentum)
        if dist_align == "labeled":
            if prior is None or len(prior) != c:
                raise ValueError(f"dist_align='labeled' needs a prior of {c} class frequencies")
            p = torch.as_tensor(list(prior), dtype=torch.float64)
            self.target = p / p.sum()
        else:
            self.target = torch.full((c,), 1.0 / c, dtype=torch.float64)
        self.reduce = reduce or _reduce_mean
        self.marginal = torch.full((c,), 1.0 / c, dtype=torch.float64)
        self.da_marginal = self.marginal.clone()
        self.tau = torch.tensor(1.0 / c, dtype=torch.float64)
        self.sigma = torch.zeros(c, dtype=torch.float64)
        self.steps = 0

    @property
    def active(self) -> bool:
        """False when it behaves exactly like :func:`pseudo_label` (fixed t, no alignment)."""
        return self.mode != "fixed" or self.dist_align != "none"

    def state_dict(self) -> dict:
        return {"marginal": self.marginal.clone(), "da_marginal": self.da_marginal.clone(),
                "tau": self.tau.clone(),
                "sigma": self.sigma.clone(), "steps": int(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.marginal = state["marginal"].to(torch.float64).clone()
        self.da_marginal = state.get("da_marginal", state["marginal"]).to(torch.float64).clone()
        self.tau = state["tau"].to(torch.float64).clone()
        self.sigma = state["sigma"].to(torch.float64).clone()
        self.steps = int(state["steps"])

    def thresholds(self) -> torch.Tensor:
        """The per-class thresholds (C,) float64 in force now."""
        if self.mode == "freematch":
            return freematch_thresholds(self.tau, self.marginal)
        if self.mode == "flexmatch":
            return flexmatch_thresholds(self.sigma, 1.0 - self.sigma.sum(), self.threshold)
        return torch.full((self.num_classes,), self.threshold, dtype=torch.float64)

    def update_stats(self, probs: torch.Tensor) -> None:
        """Fold one batch of weak-view probabilities (B, C) into the running statistics (the
        batch means are averaged over DDP ranks first)."""
        p = probs.detach().to(torch.float64)
        conf, pred = p.max(dim=1)
        above = torch.zeros(self.num_classes, dtype=torch.float64, device=p.device)
        above.index_add_(0, pred, (conf >= self.threshold).to(torch.float64))
        n = max(p.shape[0], 1)
        stats = torch.cat([p.sum(0) / n, conf.sum().reshape(1) / n, above / n])
        stats = self.reduce(stats).cpu()
        c, m = self.num_classes, self.momentum
        self.marginal = m * self.marginal + (1 - m) * stats[:c]
        if self.steps == 0:
            self.da_marginal = stats[:c].clone()
        else:
            self.da_marginal = m * self.da_marginal + (1 - m) * stats[:c]
        self.tau = m * self.tau + (1 - m) * stats[c]
        self.sigma = m * self.sigma + (1 - m) * stats[c + 1:]
        self.steps += 1

    def __call__(self, weak_logits: torch.Tensor, update: bool = True):
        """``(targets (B,) int64, mask (B,) float 0/1, probs (B, C) float32, thr (C,))``.

        Updates the running statistics with this batch first (as ReMixMatch and FreeMatch do),
        then aligns, then accepts ``i`` where ``max q̃_i ≥ thr[argmax q̃_i]``. No gradient.
        """
        with torch.no_grad():
            probs = weak_logits.detach().float().softmax(dim=1)
            if update and self.active:  # fixed t without alignment needs no statistics
                self.update_stats(probs)
            if self.dist_align != "none":
                probs = distribution_align(probs, self.target.to(probs.device),
                                           self.da_marginal.to(probs.device)).float()
            thr = self.thresholds().to(device=probs.device, dtype=torch.float32)
            conf, targets = probs.max(dim=1)
            mask = (conf >= thr[targets]).to(torch.float32)
        return targets, mask, probs, thr


def make_labeler(objective, num_classes: int, labeled_labels=None) -> PseudoLabeler:
    """The :class:`PseudoLabeler` of an :class:`~multimix.config.ObjectiveConfig`; the labeled
    class prior (for ``dist_align="labeled"``) is counted from ``labeled_labels`` (N,) int."""
    prior = None
    if objective.dist_align == "labeled":
        if labeled_labels is None or len(labeled_labels) == 0:
            raise ValueError("objective.dist_align=labeled needs the labeled classification labels")
        labels = torch.tensor([int(v) for v in labeled_labels], dtype=torch.long)  # a copy
        counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
        prior = (counts + 1.0).tolist()  # +1: no class has prior 0 (it could never be predicted)
    return PseudoLabeler(num_classes, objective.threshold, mode=objective.pl_threshold,
                         dist_align=objective.dist_align, prior=prior,
                         momentum=objective.ssl_momentum)


def class_term_keys(num_classes: int) -> tuple[str, ...]:
    """The per-class term keys a :class:`PseudoLabeler` adds, in a fixed order."""
    return tuple(f"{name}_c{k}" for name in ("pl_argmax", "pl_accept", "pl_threshold")
                 for k in range(num_classes))


def class_rates(means: dict, prefix: str = "train_") -> dict:
    """Per-class accept rates from epoch means of the per-class terms: ``accept_rate_c{k} =
    pl_accept_c{k} / pl_argmax_c{k}`` (accepted / pseudo-labelled as k; NaN if none was), and
    ``pl_hist_c{k} = pl_accept_c{k} / Σ_j pl_accept_c{j}`` (class histogram of the accepted
    pseudo-labels; NaN if none). Equal batch sizes make the ratio of means the ratio of sums."""
    out = {}
    k = 0
    acc_total = sum(v for key, v in means.items() if key.startswith(f"{prefix}pl_accept_c"))
    while f"{prefix}pl_argmax_c{k}" in means:
        a, n = means[f"{prefix}pl_accept_c{k}"], means[f"{prefix}pl_argmax_c{k}"]
        out[f"{prefix}accept_rate_c{k}"] = a / n if n > 0 else float("nan")
        out[f"{prefix}pl_hist_c{k}"] = a / acc_total if acc_total > 0 else float("nan")
        k += 1
    return out


def multimix_loss(out: dict, batch: dict, cfg, variant: str,
                  labeler: Optional[PseudoLabeler] = None):
    """``(loss, terms)`` for the model outputs ``out`` (see :meth:`MultiMixNet.forward`).

    ``batch`` holds the targets on the outputs' device: ``cls_label`` (B_l,), ``seg_mask`` and
    optionally ``seg_ignore`` (B_s, 1, H, W) 0/1. ``cfg`` is an
    :class:`~multimix.config.ObjectiveConfig` (threshold, lambda_u, alpha, beta), or a Config.
    ``terms`` maps :data:`TERM_KEYS` to 0-dim float32 tensors (detached). With a ``labeler``
    (:class:`PseudoLabeler`) the pseudo-labels come from it and the per-class keys of
    :func:`class_term_keys` are added.
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
        if labeler is None:
            targets, mask = pseudo_label(out["weak_logits"], cfg.threshold)
        else:
            targets, mask, _, thr = labeler(out["weak_logits"])
            onehot = F.one_hot(targets, labeler.num_classes).to(torch.float32)
            for k in range(labeler.num_classes):
                terms[f"pl_argmax_c{k}"] = onehot[:, k].mean()
                terms[f"pl_accept_c{k}"] = (onehot[:, k] * mask).mean()
                terms[f"pl_threshold_c{k}"] = thr[k].detach().float()
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
