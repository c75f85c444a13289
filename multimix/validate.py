"""The one evaluation path (pure torch + numpy, no Ray): score a model on labeled pools.

Used by the training loop after every epoch (held-out validation ids, on every Train worker) and
by ``multimix evaluate`` (any labeled set, one process), so both report the same numbers for the
same images::

    res = validate(model, device, cls=cls_pool, seg=seg_pool, classes=classes,
                   batch_size=cfg.data.eval_batch, rank=rank, world_size=world)
    res.flat()                  # {"val_cls_auc": ..., "val_seg_dice_mean": ..., "val_score": ...}
    res.cls.probs, res.cls.labels, res.cls.ids   # (N, C), (N,), N ids: per-image results
    res.seg.per_image["dice"]                    # (N,) per-image segmentation scores

What it does: each rank scores every ``world_size``-th image of each pool
(:func:`multimix.data.pools.eval_batches`: decoded images, no augmentation) through
:func:`multimix.engine.eval_step` (the one normalisation; eval mode, no grad) and keeps the
per-image results in a :class:`~multimix.metrics.ClsAccumulator` /
:class:`~multimix.metrics.SegAccumulator`; the states are gathered over the ranks (a collective
when a process group is initialised: every rank must call :func:`validate`), so every rank gets
the numbers one process scoring all images would get. Classification metrics are
:func:`multimix.metrics.classification_metrics` of all probabilities (softmax) and labels;
segmentation metrics :func:`multimix.metrics.summarize` of the per-image scores (threshold 0.5,
SSIM included); ``val_score`` is :func:`multimix.metrics.val_score` (checkpoint selection).

To add a metric, extend :func:`~multimix.metrics.classification_metrics` /
:func:`~multimix.metrics.segmentation_metrics` (both paths get it), or compute it here from
``ClsScores.probs``/``labels`` (e.g. a decision threshold calibrated on the validation set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from multimix.data.pools import eval_batches
from multimix.metrics import ClsAccumulator, SegAccumulator, all_gather_state, val_score

__all__ = ["ClsScores", "SegScores", "Validation", "validate"]


@dataclass
class ClsScores:
    """Classification results of one pool, gathered over the ranks.

    ``ids``: the N scored row ids (pool order with one rank; rank after rank otherwise);
    ``probs``: ``float64 (N, C)`` softmax probabilities; ``labels``: ``int64 (N,)``;
    ``metrics``: :func:`~multimix.metrics.classification_metrics` of them (class names,
    confusion matrix and scalars: ``accuracy``, ``auc``, ``f1_<class>``, ``n``, ...).
    """

    ids: list
    probs: np.ndarray
    labels: np.ndarray
    metrics: dict


@dataclass
class SegScores:
    """Segmentation results of one pool, gathered over the ranks.

    ``ids``: the N scored row ids; ``per_image``: ``{score: float64 (N,)}`` of
    :func:`~multimix.metrics.segmentation_metrics` (``dice``, ``jaccard``, ``hausdorff``, ...);
    ``metrics``: :func:`~multimix.metrics.summarize` of them (``dice_mean``, ``dice_std``, ...).
    """

    ids: list
    per_image: dict
    metrics: dict


@dataclass
class Validation:
    """What :func:`validate` returns: the results of each task scored (None when not)."""

    cls: Optional[ClsScores] = None
    seg: Optional[SegScores] = None
    extra: dict = field(default_factory=dict)

    def flat(self, prefix: str = "val_") -> dict[str, float]:
        """The scalar metrics as one flat dict, as the training loop reports them:
        ``<prefix>cls_<metric>``, ``<prefix>seg_<metric>``, ``extra`` (as given) and
        ``<prefix>score`` (:func:`~multimix.metrics.val_score`; NaN when nothing was scored)."""
        out: dict[str, float] = {}
        for task, res in (("cls", self.cls), ("seg", self.seg)):
            if res is not None:
                out.update({f"{prefix}{task}_{k}": float(v) for k, v in res.metrics.items()
                            if np.isscalar(v) and not isinstance(v, str)})
        out.update(self.extra)
        out[f"{prefix}score"] = float(val_score(
            {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}))
        return out


def _gather_ids(ids: list) -> list:
    return [i for st in all_gather_state({"ids": list(ids)}) for i in st["ids"]]


def validate(model, device, *, cls=None, seg=None, classes: Optional[Sequence[str]] = None,
             batch_size: int = 32, rank: int = 0, world_size: int = 1,
             channels_last: bool = False, precision: str = "none") -> Validation:
    """Score ``model`` on a classification pool ``cls`` and/or a segmentation pool ``seg``.

    Args:
        model: a :class:`~multimix.model.MultiMixNet` or its DDP / compiled wrapper (scored
            bare, in eval mode; the mode it was in is restored afterwards).
        device: where the model runs (the batches move there).
        cls, seg: :class:`~multimix.data.pools.LabeledPool` (uint8 images; labels, or masks and
            ignore maps) or :class:`~multimix.data.pools.StreamedPool` (the same rows read
            from their shards while scored: the same batches), or None to skip the task.
        classes: class names in label order (None / empty: inferred from the head's width).
        batch_size: images per forward (``data.eval_batch``).
        rank, world_size: this process's share (every ``world_size``-th image from ``rank``);
            with ``world_size > 1`` every rank must call this (collective gathers).
        channels_last, precision: as :func:`multimix.engine.eval_step` (defaults: float32).

    Returns:
        :class:`Validation` with the gathered per-image results and metrics of each task
        scored; ``.flat()`` gives the ``val_*`` dict the training history holds.
    """
    from multimix.engine import eval_step

    names = list(classes) if classes else None
    was_training = model.training
    res = Validation()
    kw = dict(channels_last=channels_last, precision=precision)
    if cls is not None:
        acc, ids = ClsAccumulator(class_names=names), []
        for b in eval_batches(cls, batch_size, rank, world_size):
            acc.update(eval_step(model, b, device, **kw)["cls_prob"], b["cls_label"].numpy())
            ids += b["ids"]
        acc = ClsAccumulator.merge(all_gather_state(acc.state()), class_names=names)
        st = acc.state()
        res.cls = ClsScores(ids=_gather_ids(ids), probs=st["probs"], labels=st["labels"],
                            metrics=acc.compute())
    if seg is not None:
        acc, ids = SegAccumulator(), []
        for b in eval_batches(seg, batch_size, rank, world_size):
            acc.update(eval_step(model, b, device, **kw)["seg_prob"], b["seg_mask"].numpy(),
                       b["seg_ignore"].numpy())
            ids += b["ids"]
        acc = SegAccumulator.merge(all_gather_state(acc.state()))
        res.seg = SegScores(ids=_gather_ids(ids), per_image=acc.per_image(),
                            metrics=acc.compute())
    if was_training:
        model.train()
    return res
