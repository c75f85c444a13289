"""Evaluation metrics for both MultiMix tasks, and accumulators that are exact under DDP.

Pure core: imports nothing from ``ray`` (``torch`` only lazily, for :func:`all_gather_state`).

Classification (pneumonia vs normal)
    :func:`classification_metrics` → ``accuracy``, ``f1_<class>`` for every class (class names
    lower-cased: ``f1_normal``, ``f1_pneumonia``), ``macro_f1``, ``auc`` (ROC AUC of the positive
    class, index 1, exact rank-based Mann–Whitney statistic with ties counted ½), ``auc_defined``,
    ``confusion`` and ``n``. :func:`roc_curve` gives the curve for the plots.

Segmentation (lung), per image
    :func:`segmentation_metrics` → per-image arrays ``dice``, ``jaccard``, ``precision``,
    ``recall``, ``ssim``, ``hausdorff``, ``hd95``; :func:`summarize` → ``<key>_mean``,
    ``<key>_std``, ``<key>_median`` and ``n``.

Accumulators
    :class:`ClsAccumulator` and :class:`SegAccumulator` keep *sufficient statistics* (the
    probabilities and labels, or the per-image scores), never running averages. Their
    :meth:`state` is a dict of numpy arrays; states from several DDP ranks are concatenated by
    :meth:`merge` (after :func:`all_gather_state`), so a distributed evaluation yields exactly
    the numbers one process would on the same data.

Operating point
    ``balanced_accuracy`` and ``recall_<class>`` in :func:`classification_metrics` (which also
    takes a decision ``threshold``); :func:`choose_threshold` (balanced accuracy / Youden's J on
    the validation split); :func:`balanced_resample` (equal classes, fixed seed: a proxy for test
    sets whose class ratio differs); :func:`validation_cls_metrics` (all of it, flat).

Model selection
    :func:`val_score` and :func:`val_score_balanced` are the scalars that pick the "best"
    checkpoint (``run.checkpoint_metric``).

Conventions shared by everything here: inputs may be numpy arrays or (CPU or GPU) torch tensors;
outputs are Python floats / numpy arrays; nothing is ever silently dropped — undefined values are
NaN only where stated (ROC AUC with one class, summaries of zero images), and the per-image
segmentation scores are never NaN.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "KERMANY_CLASSES",
    "SEG_KEYS",
    "classification_metrics",
    "roc_auc",
    "roc_curve",
    "segmentation_metrics",
    "summarize",
    "ClsAccumulator",
    "SegAccumulator",
    "all_gather_state",
    "val_score",
    "val_score_balanced",
    "choose_threshold",
    "balanced_resample",
    "validation_cls_metrics",
    "as_bhw",
]

#: Kermany's class order (index = label); index 1 is the positive class for ROC AUC.
KERMANY_CLASSES = ("NORMAL", "PNEUMONIA")

#: Per-image segmentation score names, in the order :func:`segmentation_metrics` returns them.
SEG_KEYS = ("dice", "jaccard", "precision", "recall", "ssim", "hausdorff", "hd95")


def _np(x: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (detached, on the CPU), no torch import."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# classification


def roc_auc(scores: Any, labels: Any) -> float:
    """Exact ROC AUC: the Mann–Whitney U statistic divided by ``n_pos · n_neg``.

    Args:
        scores: (N,) float, higher = more likely positive (e.g. p(PNEUMONIA)).
        labels: (N,) bool or {0, 1}; ``True``/1 = positive.

    Returns:
        AUC in [0, 1] = P(score of a random positive > score of a random negative) + ½·P(tie),
        computed from average ranks (:func:`_average_ranks`), so ties are counted ½ exactly
        as the pairwise definition does. **NaN** when only one class is present (or N = 0): the
        AUC is undefined then, and :func:`classification_metrics` reports ``auc_defined=False``.
    """
    s = _np(scores).astype(np.float64).reshape(-1)
    y = _np(labels).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same length")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (N,), tied values sharing their mean rank: what
    ``scipy.stats.rankdata(x, method="average")`` gives, without importing ``scipy.stats``
    (~1 s in every Train worker and evaluation process); all NaN when ``x`` holds a NaN, as
    scipy's default ``nan_policy="propagate"``."""
    if np.isnan(x).any():
        return np.full(x.shape, np.nan)
    order = np.argsort(x, kind="stable")
    _, inverse, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of each distinct value's last copy
    ranks = np.empty(x.shape, dtype=np.float64)
    ranks[order] = (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]
    return ranks


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (every distinct threshold, no points dropped).

    Args:
        scores: (N,) float, higher = more likely positive.
        labels: (N,) bool or {0, 1}; 1 = positive.

    Returns:
        ``(fpr, tpr, thresholds)``, each (K + 1,) float64 for K distinct scores. Point i is the
        rate of negatives / positives with ``score >= thresholds[i]``; ``thresholds`` decrease,
        starting with ``+inf`` (the point (0, 0)) and ending with the smallest score (the point
        (1, 1)). ``np.trapezoid(tpr, fpr)`` equals :func:`roc_auc`. If there are no positives,
        ``tpr`` is all NaN; if there are no negatives, ``fpr`` is all NaN (the rate is undefined).
    """
    s = _np(scores).astype(np.float64).reshape(-1)
    y = _np(labels).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same length")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # last index of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.zeros(0, dtype=int)
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / n_pos if n_pos > 0 else np.full_like(tps, np.nan)
        fpr = fps / n_neg if n_neg > 0 else np.full_like(fps, np.nan)
    thresholds = np.r_[np.inf, s[last]] if s.size else np.array([np.inf])
    return fpr, tpr, thresholds


def _default_names(c: int) -> tuple[str, ...]:
    return KERMANY_CLASSES if c == len(KERMANY_CLASSES) else tuple(f"class{i}" for i in range(c))


def classification_metrics(
    probs: Any,
    labels: Any,
    class_names: Optional[Sequence[str]] = KERMANY_CLASSES,
    pos_label: int = 1,
    threshold: Optional[float] = None,
) -> dict:
    """Accuracy, balanced accuracy, per-class recall and F1, ROC AUC and the confusion matrix.

    Args:
        probs: (N, C) float class probabilities (softmax output; rows need not sum exactly to
            1). The predicted class is ``argmax`` (ties → the lower index), i.e. for C = 2 the
            positive class is predicted when ``p[:, 1] > 0.5``.
        labels: (N,) int class indices in ``[0, C)``.
        class_names: C names in index order, Kermany: ``("NORMAL", "PNEUMONIA")``. None or
            empty: Kermany's names when C = 2, else ``class0 … class{C-1}``.
        pos_label: the positive class for ROC AUC (default 1 = PNEUMONIA); its score is
            ``probs[:, pos_label]`` and the other classes together are the negatives.
        threshold: None (argmax decision) or, for C = 2 only, the operating point: the positive
            class is predicted where ``probs[:, pos_label] >= threshold`` (see
            :func:`choose_threshold`).

    Returns:
        dict with
            - ``accuracy`` (float in [0, 1]),
            - ``balanced_accuracy``: mean of the per-class recalls over the classes present in
              the labels (sklearn's definition; = (TPR + TNR) / 2 for two classes),
            - ``recall_<name>`` for each class: TP / (TP + FN); NaN for a class absent from the
              labels,
            - ``f1_<name>`` for each class, ``name`` lower-cased (``f1_normal``,
              ``f1_pneumonia``): one-vs-rest F1 = 2TP / (2TP + FP + FN). **Rule**: a class that is
              neither in the labels nor in the predictions (denominator 0) scores 1.0 (nothing
              to get wrong, the same rule as Dice on two empty masks),
            - ``macro_f1`` (mean of the per-class F1),
            - ``auc`` (float in [0, 1]; exact, see :func:`roc_auc`) and ``auc_defined`` (bool).
              **Rule**: when the labels hold only one of {positive, negative} the AUC is
              undefined: ``auc`` is NaN and ``auc_defined`` is False — the value is reported,
              never dropped; :func:`val_score` then falls back to accuracy,
            - ``confusion``: (C, C) int64, rows = true class, columns = predicted class,
            - ``n`` (int).

        With N = 0 every score is NaN (``auc_defined`` False) and ``n`` is 0.
    """
    p = _np(probs).astype(np.float64)
    y = _np(labels).reshape(-1)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    n, c = p.shape
    names = [str(k) for k in class_names] if class_names is not None and len(class_names) else \
        list(_default_names(c))
    if c != len(names):
        raise ValueError(f"probs has {c} classes but class_names has {len(names)}: {names}")
    if y.shape != (n,):
        raise ValueError(f"labels must be ({n},) to match probs {p.shape}, got {y.shape}")
    if not 0 <= pos_label < c:
        raise ValueError(f"pos_label {pos_label} out of range for {c} classes")
    if n and (y.dtype.kind not in "iub" or y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must be integers in [0, {c}), got {np.unique(y)[:10]}")
    y = y.astype(np.int64)
    if threshold is not None:
        if c != 2:
            raise ValueError(f"threshold needs two classes, probs has {c}")
        pred = np.where(p[:, pos_label] >= threshold, pos_label, 1 - pos_label).astype(np.int64)
    else:
        pred = p.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)

    out: dict = {}
    out["accuracy"] = float(np.trace(confusion) / n) if n else float("nan")
    support = confusion.sum(axis=1)
    recalls = [float(confusion[k, k] / support[k]) if support[k] else float("nan")
               for k in range(c)]
    present = [r for r, m in zip(recalls, support) if m]
    out["balanced_accuracy"] = float(np.mean(present)) if present else float("nan")
    for name, r in zip(names, recalls):
        out[f"recall_{name.lower()}"] = r
    f1s = []
    for k, name in enumerate(names):
        tp = confusion[k, k]
        fp = confusion[:, k].sum() - tp
        fn = confusion[k, :].sum() - tp
        denom = 2 * tp + fp + fn
        if n == 0:
            f1 = float("nan")
        else:
            f1 = float(2 * tp / denom) if denom else 1.0
        out[f"f1_{name.lower()}"] = f1
        f1s.append(f1)
    out["macro_f1"] = float(np.mean(f1s)) if n else float("nan")
    auc = roc_auc(p[:, pos_label], y == pos_label) if n else float("nan")
    out["auc"] = auc
    out["auc_defined"] = bool(np.isfinite(auc))
    out["confusion"] = confusion
    out["n"] = int(n)
    return out


# ---------------------------------------------------------------------------------------------
# segmentation


def as_bhw(x: Any, name: str) -> np.ndarray:
    """A stack of 2-D maps as ``(B, H, W)``: ``(B, 1, H, W)`` → ``(B, H, W)``, ``(H, W)`` →
    ``(1, H, W)`` (numpy or torch input; no copy).

    Raises:
        ValueError: any other shape, naming ``name``.
    """
    a = _np(x)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(f"{name} must be (B, 1, H, W) or (B, H, W), got {a.shape}")
        a = a[:, 0]
    elif a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (B, 1, H, W) or (B, H, W), got {a.shape}")
    return a


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour that is background or outside the image."""
    from scipy import ndimage  # only the boundary metrics need scipy (0.3 s to import)

    if not mask.any():
        return mask
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1),
                                    border_value=0)
    return mask & ~eroded


def _surface_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (pixels) boundary(a) → boundary(b) and boundary(b) → boundary(a)."""
    from scipy import ndimage

    ba, bb = _boundary(a), _boundary(b)
    dt_b = ndimage.distance_transform_edt(~bb)
    dt_a = ndimage.distance_transform_edt(~ba)
    return dt_b[ba], dt_a[bb]


def _ssim(prob: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if not valid.any():  # every pixel ignored: the both-empty rule
        return 1.0
    h, w = prob.shape
    win = min(7, h, w)
    if win % 2 == 0:
        win -= 1
    x = np.where(valid, prob, 0.0)
    y = np.where(valid, ref, 0.0)
    _, smap = structural_similarity(x, y, data_range=1.0, win_size=win, full=True)
    pad = (win - 1) // 2
    if pad and h > 2 * pad and w > 2 * pad:
        inner = (slice(pad, h - pad), slice(pad, w - pad))
        if valid[inner].any():
            return float(smap[inner][valid[inner]].mean())
    return float(smap[valid].mean())


def segmentation_metrics(
    prob: Any,
    ref: Any,
    ignore: Any = None,
    threshold: float = 0.5,
    with_ssim: bool = True,
) -> dict[str, np.ndarray]:
    """Per-image lung-segmentation scores.

    Args:
        prob: (B, 1, H, W), (B, H, W) or (H, W) float lung probabilities in [0, 1] (sigmoid
            output). The prediction is ``prob >= threshold`` (threshold 0.5).
        ref: the reference mask, same shape; {0, 1}, bool, or {0, 255} (foreground = ``> 0.5``).
        ignore: optional, same shape; nonzero = pixel left out of every score (medical devices
            in the V7 set). None = no pixel ignored.
        threshold: binarisation threshold of ``prob``.
        with_ssim: compute SSIM (the slowest score); if False ``ssim`` is left out of the result.

    Returns:
        dict of (B,) float64 arrays, one value per image, never NaN:

        - ``dice`` = 2TP / (2TP + FP + FN), ``jaccard`` = TP / (TP + FP + FN),
          ``precision`` = TP / (TP + FP), ``recall`` = TP / (TP + FN); counts over the
          non-ignored pixels. All in [0, 1].
        - ``ssim``: structural similarity (:func:`skimage.metrics.structural_similarity`,
          uniform 7×7 window — smaller for tiny images —, ``data_range=1``) between the
          **probability map** and the binary reference as float, so calibration counts and the
          score is not a duplicate of Dice. Ignore pixels: both images are set to 0 (the same
          neutral value, so they add no disagreement to windows that overlap them) and the SSIM
          map is averaged over the non-ignored pixels only (of the interior that skimage also
          averages over; the whole image if that holds no valid pixel; 1.0 if every pixel is
          ignored). In [-1, 1].
        - ``hausdorff``: symmetric Hausdorff distance between the boundary pixels of prediction
          and reference (boundary = foreground pixels with a 4-neighbour that is background or
          off the image), Euclidean, **in pixels at the evaluated resolution** (the model's input
          size, e.g. 256² — multiply by the pixel spacing for mm). ``hd95`` is the 95th percentile
          variant: the larger of the two directed 95th percentiles (MONAI's convention). Ignore
          pixels are set to background in both masks before boundaries are found.

        Edge-case rules (after the ignored pixels are removed):

        - reference **and** prediction empty → dice = jaccard = precision = recall = 1,
          hausdorff = hd95 = 0 (a perfect "no lung" answer). This includes an image whose
          every pixel is ignored.
        - exactly one of them empty → dice = jaccard = precision = recall = 0, and
          hausdorff = hd95 = the image diagonal ``sqrt((H-1)² + (W-1)²)``, the largest distance
          two pixels can have (the worst case).
        - otherwise a ratio with a zero denominator cannot occur, except as above.
    """
    p = as_bhw(prob, "prob").astype(np.float64)
    r = as_bhw(ref, "ref")
    if r.shape != p.shape:
        raise ValueError(f"ref {r.shape} must match prob {p.shape}")
    r = r.astype(np.float64) > 0.5
    if ignore is None:
        valid = np.ones(p.shape, dtype=bool)
    else:
        ig = as_bhw(ignore, "ignore")
        if ig.shape != p.shape:
            raise ValueError(f"ignore {ig.shape} must match prob {p.shape}")
        valid = ig == 0
    pred = (p >= threshold) & valid
    r = r & valid
    b, h, w = p.shape
    diag = math.sqrt((h - 1) ** 2 + (w - 1) ** 2)

    keys = SEG_KEYS if with_ssim else tuple(k for k in SEG_KEYS if k != "ssim")
    out = {k: np.zeros(b, dtype=np.float64) for k in keys}
    for i in range(b):
        pi, ri = pred[i], r[i]
        tp = float(np.count_nonzero(pi & ri))
        fp = float(np.count_nonzero(pi & ~ri))
        fn = float(np.count_nonzero(~pi & ri))
        p_empty, r_empty = tp + fp == 0, tp + fn == 0
        if p_empty and r_empty:
            d = j = pr = rc = 1.0
            hd = hd95 = 0.0
        elif p_empty or r_empty:
            d = j = pr = rc = 0.0
            hd = hd95 = diag
        else:
            d = 2 * tp / (2 * tp + fp + fn)
            j = tp / (tp + fp + fn)
            pr = tp / (tp + fp)
            rc = tp / (tp + fn)
            d_pr, d_rp = _surface_distances(pi, ri)
            hd = float(max(d_pr.max(), d_rp.max()))
            hd95 = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
        out["dice"][i], out["jaccard"][i] = d, j
        out["precision"][i], out["recall"][i] = pr, rc
        out["hausdorff"][i], out["hd95"][i] = hd, hd95
        if with_ssim:
            out["ssim"][i] = _ssim(p[i], r[i].astype(np.float64), valid[i])
    return out


def summarize(per_image: Mapping[str, Any]) -> dict:
    """Mean, standard deviation and median of every per-image score.

    Args:
        per_image: ``{key: (N,) array}`` as from :func:`segmentation_metrics` (all the same N).

    Returns:
        ``{"<key>_mean", "<key>_std", "<key>_median": float, ..., "n": N}``. ``std`` is the
        population standard deviation (ddof = 0). Sums are exactly rounded (:func:`math.fsum`),
        so the result does not depend on the order of the images (bit-identical under any DDP
        sharding). With N = 0 the statistics are NaN and n = 0.
    """
    out: dict = {}
    n = None
    for key, values in per_image.items():
        v = _np(values).astype(np.float64).reshape(-1)
        if n is None:
            n = v.size
        elif v.size != n:
            raise ValueError(f"per-image arrays differ in length: {key} has {v.size}, not {n}")
        if v.size:
            # math.fsum is exactly rounded, hence independent of the order of the images:
            # DDP ranks holding any interleaving of the data give bit-identical numbers
            mean = math.fsum(v) / v.size
            out[f"{key}_mean"] = mean
            out[f"{key}_std"] = math.sqrt(math.fsum((v - mean) ** 2) / v.size)
            out[f"{key}_median"] = float(np.median(v))
        else:
            out[f"{key}_mean"] = out[f"{key}_std"] = out[f"{key}_median"] = float("nan")
    out["n"] = int(n or 0)
    return out


# ---------------------------------------------------------------------------------------------
# accumulators and DDP


def collective_device(group=None):
    """The device that tensors of a collective on ``group`` (default: the default process group)
    must be on: the current CUDA device when the group's only backend is NCCL (NCCL accepts only
    CUDA tensors: "No backend type associated with device type cpu"), else the CPU (gloo, or a
    group with both backends, ``cpu:gloo,cuda:nccl``). The current CUDA device must be this
    rank's own (``torch.cuda.set_device``; Ray Train sets it before the training function runs).
    """
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_state(state: dict) -> list[dict]:
    """Collect one accumulator state from every DDP rank.

    Uses :func:`torch.distributed.all_gather_object` when a process group is initialised (every
    rank must call this, collectively); otherwise it is a no-op that returns ``[state]``. Under
    NCCL, ``all_gather_object`` moves the pickled state through the current CUDA device (see
    :func:`collective_device`), so each rank must have set its own (``torch.cuda.set_device``).

    Returns:
        list of states in rank order (length = world size).
    """
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return [state]
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    world = dist.get_world_size()
    if world == 1:
        return [state]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, state)
    return gathered


class ClsAccumulator:
    """Collects class probabilities and labels; computes :func:`classification_metrics`.

    Args:
        class_names: C names in index order; None or empty = inferred from the width of the
            first batch (Kermany's names when C = 2, see :func:`classification_metrics`).
        pos_label: positive class of the ROC AUC.

    State: ``{"probs": (N, C) float64, "labels": (N,) int64, "class_names": (C,) str}``.
    Merging concatenates, so the AUC/F1/accuracy of a merged accumulator equal those of one
    process that saw all the data.

    Example (inside a DDP worker)::

        acc = ClsAccumulator(classes)
        for batch in loader:
            acc.update(out["cls_prob"], batch["cls_label"])
        metrics = acc.gather().compute()   # identical on every rank
        # the same, spelled out:
        metrics = ClsAccumulator.merge(all_gather_state(acc.state()), class_names=classes).compute()
    """

    def __init__(self, class_names: Optional[Sequence[str]] = KERMANY_CLASSES, pos_label: int = 1):
        names = [str(c) for c in class_names] if class_names is not None else []
        self.class_names: Optional[tuple[str, ...]] = tuple(names) if names else None
        self.pos_label = int(pos_label)
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def __len__(self) -> int:
        return int(sum(x.shape[0] for x in self._labels))

    def update(self, probs: Any, labels: Any) -> "ClsAccumulator":
        """Add a batch: ``probs`` (B, C) float, ``labels`` (B,) int. B = 0 is allowed."""
        p = _np(probs).astype(np.float64)
        y = _np(labels).astype(np.int64).reshape(-1)
        if p.ndim != 2 or p.shape[0] != y.shape[0]:
            raise ValueError(f"expected probs (B, C) and labels (B,), got {p.shape}, {y.shape}")
        if p.shape[0] == 0:
            return self
        if self.class_names is None:
            self.class_names = _default_names(p.shape[1])
        c = len(self.class_names)
        if p.shape[1] != c:
            raise ValueError(f"probs has {p.shape[1]} classes, expected {c}: {self.class_names}")
        self._probs.append(p)
        self._labels.append(y)
        return self

    def state(self) -> dict:
        c = len(self.class_names) if self.class_names is not None else 0
        probs = np.concatenate(self._probs) if self._probs else np.zeros((0, c))
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)
        names = np.array(self.class_names if self.class_names is not None else [], dtype=str)
        return {"probs": probs, "labels": labels, "class_names": names}

    @classmethod
    def merge(cls, states: Iterable[dict], class_names: Optional[Sequence[str]] = None,
              pos_label: int = 1) -> "ClsAccumulator":
        """A new accumulator holding the concatenation of ``states``, in order.

        ``class_names`` None: taken from the first state that names them (else inferred).
        Typically ``ClsAccumulator.merge(all_gather_state(acc.state()), class_names=...)``.
        """
        states = list(states)
        if not class_names:
            for st in states:
                if len(st.get("class_names", ())):
                    class_names = [str(x) for x in st["class_names"]]
                    break
        new = cls(class_names, pos_label)
        for st in states:
            new.update(st["probs"], st["labels"])
        return new

    def gather(self) -> "ClsAccumulator":
        """``merge(all_gather_state(state()))``: collective under DDP, a copy otherwise."""
        return type(self).merge(all_gather_state(self.state()), self.class_names, self.pos_label)

    def compute(self) -> dict:
        """:func:`classification_metrics` of everything added (n = 0: NaN scores, see there)."""
        s = self.state()
        c = s["probs"].shape[1]
        if c == 0:  # nothing seen and no names: assume Kermany's two classes
            s["probs"] = np.zeros((0, len(KERMANY_CLASSES)))
        return classification_metrics(s["probs"], s["labels"], self.class_names, self.pos_label)


class SegAccumulator:
    """Scores each image on :meth:`update` and keeps the per-image scores.

    Args:
        threshold: binarisation threshold of the probabilities (0.5).
        with_ssim: include SSIM (the slowest score; training validation may turn it off).

    State: ``{key: (N,) float64}`` for the keys of :func:`segmentation_metrics`. Merging
    (classmethod :meth:`merge`) concatenates; :meth:`compute` returns :func:`summarize` of all
    images, so means, standard deviations and medians equal the single-process ones.
    """

    def __init__(self, threshold: float = 0.5, with_ssim: bool = True):
        self.threshold = float(threshold)
        self.with_ssim = bool(with_ssim)
        self.keys = SEG_KEYS if with_ssim else tuple(k for k in SEG_KEYS if k != "ssim")
        self._scores: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}

    def __len__(self) -> int:
        return int(sum(x.shape[0] for x in self._scores[self.keys[0]]))

    def update(self, prob: Any, ref: Any, ignore: Any = None) -> "SegAccumulator":
        """Score a batch (shapes as in :func:`segmentation_metrics`) and keep the scores."""
        scores = segmentation_metrics(prob, ref, ignore, threshold=self.threshold,
                                      with_ssim=self.with_ssim)
        return self.add_scores(scores)

    def add_scores(self, scores: Mapping[str, Any]) -> "SegAccumulator":
        """Append already-computed per-image scores (``{key: (B,) array}``)."""
        missing = [k for k in self.keys if k not in scores]
        if missing:
            raise ValueError(f"per-image scores lack {missing}")
        for k in self.keys:
            self._scores[k].append(_np(scores[k]).astype(np.float64).reshape(-1))
        return self

    def state(self) -> dict:
        return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self._scores.items()}

    @classmethod
    def merge(cls, states: Iterable[dict], threshold: float = 0.5) -> "SegAccumulator":
        """A new accumulator holding the concatenation of ``states``, in order.

        Typically ``SegAccumulator.merge(all_gather_state(acc.state()))``. Whether SSIM is
        included follows the states (all must agree).
        """
        states = list(states)
        with_ssim = all("ssim" in st for st in states) if states else True
        new = cls(threshold, with_ssim)
        for st in states:
            new.add_scores(st)
        return new

    def gather(self) -> "SegAccumulator":
        """``merge(all_gather_state(state()))``: collective under DDP, a copy otherwise."""
        new = type(self).merge(all_gather_state(self.state()), self.threshold)
        if new.with_ssim != self.with_ssim:  # pragma: no cover - mixed configurations
            raise ValueError("ranks disagree on with_ssim")
        return new

    def per_image(self) -> dict[str, np.ndarray]:
        return self.state()

    def compute(self) -> dict:
        return summarize(self.state())


# ---------------------------------------------------------------------------------------------
# model selection


def _lookup(d: Mapping, task: str, key: str) -> Any:
    """``d[key]``, also under the prefixes ``val_<task>_`` and ``<task>_`` (flat report dicts)."""
    for prefix in (f"val_{task}_", f"{task}_", ""):
        if prefix + key in d:
            return d[prefix + key]
    return None


def val_score(cls_metrics: Optional[Mapping] = None, seg_metrics: Optional[Mapping] = None) -> float:
    """The scalar that selects the "best" checkpoint (``run.checkpoint_metric = "val_score"``).

    ``val_score`` = mean over the tasks present of

    - classification: ``auc`` if it is defined (finite), else ``accuracy`` (the fallback for a
      validation set holding one class only);
    - segmentation: ``dice_mean`` (mean per-image Dice, from :func:`summarize`).

    A task is present when its metrics are found and its ``n`` (if given) is not 0.

    Args:
        cls_metrics: output of :func:`classification_metrics` / ``ClsAccumulator.compute()``,
            or None when the variant has no classification task.
        seg_metrics: output of :func:`summarize` / ``SegAccumulator.compute()``, or None.

        Either argument may instead be one **flat** dict holding both tasks with prefixed keys
        — ``val_cls_auc``, ``val_cls_accuracy``, ``val_cls_n``, ``val_seg_dice_mean``,
        ``val_seg_n`` (or the prefixes ``cls_`` / ``seg_``) — as the training loop reports them:
        ``val_score(flat)``. Each task is looked up in ``cls_metrics`` first, then
        ``seg_metrics``.

    Returns:
        float in [0, 1], higher is better. NaN when no task had any validation data.
    """
    sources = [d for d in (cls_metrics, seg_metrics) if d is not None]
    parts = []
    for d in sources:
        auc, acc = _lookup(d, "cls", "auc"), _lookup(d, "cls", "accuracy")
        if auc is None and acc is None:
            continue
        if _lookup(d, "cls", "n") != 0:
            ok = auc is not None and np.isfinite(float(auc))
            parts.append(float(auc) if ok else float(acc if acc is not None else np.nan))
        break
    for d in sources:
        dice = _lookup(d, "seg", "dice_mean")
        if dice is None:
            continue
        if _lookup(d, "seg", "n") != 0:
            parts.append(float(dice))
        break
    return float(np.mean(parts)) if parts else float("nan")


# ---------------------------------------------------------------------------------------------
# operating point and class-ratio-independent validation


def choose_threshold(scores: Any, labels: Any, criterion: str = "balanced_accuracy"
                     ) -> tuple[float, float]:
    """The decision threshold on ``scores`` that maximises ``criterion`` on these labels.

    Args:
        scores: (N,) float, p(positive) (e.g. ``probs[:, 1]``).
        labels: (N,) {0, 1}; 1 = positive.
        criterion: ``"balanced_accuracy"`` = (TPR + TNR) / 2 or ``"youden"`` = J = TPR − FPR
            (Youden, Cancer 1950). For two classes J = 2·BA − 1, so both choose the same
            threshold; the value returned is the criterion's own.

    Returns:
        ``(threshold, value)``: predict positive where ``score >= threshold``. The cut lies half
        way between the last score called positive and the next lower distinct score (so the
        same confusion matrix is reached with some margin), 0 ≤ threshold ≤ 1 for scores in
        [0, 1] (``inf`` when calling nothing positive is best and a score is 1). Ties between
        cuts with the same value go to the one nearest 0.5 (the argmax decision), then the
        higher. ``(0.5, nan)`` when the labels hold one class only (no criterion is defined).
    """
    if criterion not in ("balanced_accuracy", "youden"):
        raise ValueError(f"criterion: expected 'balanced_accuracy' or 'youden', got {criterion!r}")
    fpr, tpr, thr = roc_curve(scores, labels)
    if not (np.isfinite(fpr).all() and np.isfinite(tpr).all()):
        return 0.5, float("nan")
    j = tpr - fpr
    best = j.max()
    cuts = []
    for i in np.nonzero(np.isclose(j, best, rtol=0, atol=1e-12))[0]:
        if i == 0:  # nothing positive: above the highest score
            cut = (thr[1] + 1.0) / 2.0 if thr[1] < 1.0 else float("inf")
        elif i + 1 < len(thr):
            cut = (thr[i] + thr[i + 1]) / 2.0
        else:  # everything positive: below the lowest score
            cut = thr[i] / 2.0 if thr[i] > 0 else 0.0
        cuts.append(float(cut))
    cut = min(cuts, key=lambda t: (abs(t - 0.5), -t))
    value = float(best) if criterion == "youden" else float((best + 1.0) / 2.0)
    return cut, value


def balanced_resample(labels: Any, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced subsample: every class present is drawn down (without
    replacement, ``numpy.random.default_rng(seed)``) to the size of the smallest one.

    Deterministic for a fixed seed and label vector; sorted (C_present · n_min,) int64. Scoring
    it estimates what a test set with equal classes would show, whatever the ratio of the
    validation split.
    """
    y = _np(labels).astype(np.int64).reshape(-1)
    classes, counts = np.unique(y, return_counts=True)
    if classes.size == 0:
        return np.zeros(0, dtype=np.int64)
    n_min = int(counts.min())
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.nonzero(y == c)[0], size=n_min, replace=False) for c in classes]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def validation_cls_metrics(probs: Any, labels: Any,
                           class_names: Optional[Sequence[str]] = KERMANY_CLASSES,
                           decision: str = "argmax", seed: int = 0) -> dict:
    """Every classification number validation reports, as one flat dict of floats.

    * the argmax scores of :func:`classification_metrics` (``accuracy``, ``balanced_accuracy``,
      ``macro_f1``, ``f1_<c>``, ``recall_<c>``, ``auc``, ``n``) and ``pred_classes`` (how many
      classes the argmax predicts at all: 1 = collapsed to a single class);
    * ``res_*``: the same scores on :func:`balanced_resample` of the split (``seed``);
    * two classes only: ``threshold`` chosen here by :func:`choose_threshold` (criterion
      ``decision``, or balanced accuracy when ``decision="argmax"``), ``thr_*`` the scores at
      it and ``thr_res_*`` those on the balanced resample. Chosen and scored on the same split:
      in-sample, optimistic for the split itself.
    * ``decision_balanced_accuracy``: the balanced accuracy of the decision in force (argmax, or
      the threshold) — the classification part of :func:`val_score_balanced`.
    """
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64).reshape(-1)
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "n")

    def scalars(m: dict) -> dict:
        return {k: float(v) for k, v in m.items()
                if k in keep or k.startswith(("f1_", "recall_"))}

    base = classification_metrics(p, y, class_names)
    out = scalars(base)
    pred = p.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    out["pred_classes"] = float(np.unique(pred).size)
    idx = balanced_resample(y, seed)
    out.update({f"res_{k}": v for k, v in
                scalars(classification_metrics(p[idx], y[idx], class_names)).items()})
    out["decision_balanced_accuracy"] = out["balanced_accuracy"]
    if p.shape[1] == 2 and len(y):
        crit = "balanced_accuracy" if decision == "argmax" else decision
        thr, _ = choose_threshold(p[:, 1], y, crit)
        out["threshold"] = float(thr)
        out.update({f"thr_{k}": v for k, v in
                    scalars(classification_metrics(p, y, class_names, threshold=thr)).items()})
        out.update({f"thr_res_{k}": v for k, v in scalars(
            classification_metrics(p[idx], y[idx], class_names, threshold=thr)).items()})
        if decision != "argmax":
            out["decision_balanced_accuracy"] = out["thr_balanced_accuracy"]
    return out


def val_score_balanced(metrics: Mapping) -> float:
    """The class-ratio-robust selection score (``run.checkpoint_metric = "val_score_balanced"``,
    the default): mean over the tasks present of

    - classification: ``decision_balanced_accuracy`` (balanced accuracy of the decision in force,
      :func:`validation_cls_metrics`), else ``balanced_accuracy``;
    - segmentation: ``dice_mean``.

    ``metrics`` is the flat validation dict (``val_cls_*``, ``val_seg_*`` keys, or ``cls_*`` /
    ``seg_*``). A task with ``n`` = 0 is left out. NaN when no task is present. Unlike
    :func:`val_score` (AUC + Dice), it drops when the decision collapses to the majority class
    (a collapsed argmax scores 0.5 whatever the class ratio).
    """
    parts = []
    ba = _lookup(metrics, "cls", "decision_balanced_accuracy")
    if ba is None:
        ba = _lookup(metrics, "cls", "balanced_accuracy")
    if ba is not None and _lookup(metrics, "cls", "n") != 0 and np.isfinite(float(ba)):
        parts.append(float(ba))
    dice = _lookup(metrics, "seg", "dice_mean")
    if dice is not None and _lookup(metrics, "seg", "n") != 0:
        parts.append(float(dice))
    return float(np.mean(parts)) if parts else float("nan")
