"""Figures for evaluation reports and ``multimix predict`` overlays (PNG files, matplotlib Agg).

Every ``plot_*`` function builds a :class:`matplotlib.figure.Figure` on an explicit Agg canvas —
no ``pyplot``, no global backend switch, no GUI — writes one PNG and returns its path. Figure sizes
are fixed, so the PNG size in pixels is known in advance (``figsize × DPI``, see each function).

Colours: reference lung boundary **green** (``REF_COLOUR``), predicted boundary **red**
(``PRED_COLOUR``), pixels where both boundaries coincide **yellow** (``BOTH_COLOUR``).
"""

from __future__ import annotations

import io

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries

from multimix.data.storage import replace_local
from multimix.metrics import as_bhw

__all__ = [
    "DPI",
    "REF_COLOUR",
    "PRED_COLOUR",
    "BOTH_COLOUR",
    "plot_roc",
    "plot_dice_box",
    "plot_boundaries",
    "plot_saliency",
    "boundary_overlay",
    "overlay_png",
    "grid_shape",
    "plot_tune_scores",
    "plot_learning_curves",
    "plot_metric_boxes",
    "plot_run_curves",
    "RUN_CURVES",
]

DPI = 100
#: inches per image cell in the image grids (so one cell is CELL_IN·DPI pixels square)
CELL_IN = 3.0
MAX_COLS = 4
REF_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
BOTH_COLOUR = (255, 255, 0)
MASK_COLOUR = (0, 255, 0)



def _boxes_with_dots(ax, data: list, dot_size: float, dot_alpha: float):
    """Box plots (no fliers) of the non-empty arrays in ``data`` at x = 1..len(data), each value
    drawn as a jittered dot (fixed seed); returns the x positions (len(data),)."""
    positions = np.arange(1, len(data) + 1)
    nonempty = [i for i, d in enumerate(data) if d.size]
    if nonempty:
        ax.boxplot([data[i] for i in nonempty], positions=positions[nonempty], widths=0.5,
                   showfliers=False)
    rng = np.random.default_rng(0)
    for i in nonempty:
        ax.scatter(positions[i] + rng.uniform(-0.12, 0.12, data[i].size), data[i], s=dot_size,
                   alpha=dot_alpha, color="tab:blue", linewidths=0)
    return positions

def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _save(fig: Figure, path: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)

    replace_local(path, buf.getvalue())  # atomic: never a truncated PNG
    return path


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        if f.size and f.max() <= 1.0 and f.min() >= 0.0:
            f = f * 255.0
        img = np.clip(np.round(f), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1)


def _binary(mask: Any) -> np.ndarray:
    """Masks as bool: {0,1}, bool, {0,255} or probabilities (threshold 0.5)."""
    m = np.asarray(mask)
    if m.dtype == bool:
        return m
    return m.astype(np.float64) >= 0.5 if m.dtype.kind == "f" else m > 0


def grid_shape(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    """(rows, cols) of the image grids: up to ``max_cols`` columns."""
    cols = max(1, min(n, max_cols))
    return max(1, math.ceil(n / cols)), cols


def boundary_overlay(image: Any, ref: Any, pred: Any) -> np.ndarray:
    """RGB (H, W, 3) uint8: grey image, reference boundary green, predicted boundary red,
    both yellow. Boundaries are the inner boundary pixels (:func:`find_boundaries`, mode
    ``inner``) of masks binarised as in :func:`_binary`."""
    rgb = _grey_rgb(image)
    rb = find_boundaries(_binary(ref), mode="inner")
    pb = find_boundaries(_binary(pred), mode="inner")
    rgb[rb & ~pb] = REF_COLOUR
    rgb[pb & ~rb] = PRED_COLOUR
    rgb[pb & rb] = BOTH_COLOUR
    return rgb


def _normalise_saliency(s: np.ndarray) -> np.ndarray:
    """Scale |saliency| to [0, 1] by its 99th percentile (robust to a few hot pixels)."""
    s = np.abs(np.nan_to_num(np.asarray(s, dtype=np.float64)))
    top = np.percentile(s, 99) if s.size else 0.0
    if top <= 0:
        top = s.max() if s.size and s.max() > 0 else 1.0
    return np.clip(s / top, 0.0, 1.0)


def overlay_png(image: Any, mask: Any = None, saliency: Any = None, alpha: float = 0.6) -> np.ndarray:
    """The overlay ``multimix predict`` writes: (H, W, 3) uint8.

    Args:
        image: (H, W) uint8 grey radiograph (floats in [0, 1] are scaled by 255).
        mask: (H, W) lung mask or probability map (binarised at 0.5), or None: its boundary is
            drawn in green (``MASK_COLOUR``), one pixel wide.
        saliency: (H, W) float or None: ``|saliency|``, scaled to [0, 1] by its 99th percentile,
            is blended over the image with the ``inferno`` colour map, per-pixel opacity
            ``alpha · saliency`` (so pixels without saliency keep the original grey).
        alpha: maximum opacity of the saliency layer.
    """
    img = _np(image)
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), got {img.shape}")
    rgb = _grey_rgb(img).astype(np.float64)
    if saliency is not None:
        s = _np(saliency)
        if s.shape != img.shape:
            raise ValueError(f"saliency {s.shape} must match image {img.shape}")
        s = _normalise_saliency(s)
        heat = colormaps["inferno"](s)[..., :3] * 255.0
        a = (alpha * s)[..., None]
        rgb = (1 - a) * rgb + a * heat
    out = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    if mask is not None:
        m = _np(mask)
        if m.shape != img.shape:
            raise ValueError(f"mask {m.shape} must match image {img.shape}")
        out[find_boundaries(_binary(m), mode="inner")] = MASK_COLOUR
    return out


def plot_roc(curves: Mapping[str, tuple], path: Any, title: str = "ROC") -> Path:
    """ROC curves of several models / datasets on one 5×5 in figure (500×500 px).

    Args:
        curves: ``{name: (fpr, tpr, auc)}`` with fpr/tpr from :func:`multimix.metrics.roc_curve`;
            a NaN ``auc`` (one class only) is labelled "AUC undefined" and its curve (NaN) is not
            drawn but still listed in the legend.
        path: the PNG to write.
    """
    fig = Figure(figsize=(5, 5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        auc = float(auc) if auc is not None else float("nan")
        label = f"{name} (AUC {auc:.3f})" if np.isfinite(auc) else f"{name} (AUC undefined)"
        ax.plot(_np(fpr), _np(tpr), linewidth=1.5, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_dice_box(per_set: Mapping[str, Any], path: Any, ylabel: str = "Dice",
                  title: str = "Per-image Dice") -> Path:
    """Box plot (with the individual images as dots) of per-image Dice for each set.

    6×4 in (600×400 px). An empty set is kept on the axis, labelled ``n=0``, with no box.
    """
    names = list(per_set)
    data = [_np(per_set[k]).astype(np.float64).reshape(-1) for k in names]
    fig = Figure(figsize=(6, 4), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    positions = _boxes_with_dots(ax, data, dot_size=6, dot_alpha=0.5)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{k}\n(n={d.size})" for k, d in zip(names, data)], fontsize=8)
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_boundaries(images: Any, refs: Any, preds: Any, path: Any,
                    titles: Optional[Sequence[str]] = None) -> Path:
    """Grid of radiographs with the reference lung boundary (green) and the predicted one (red).

    Args:
        images: (N, H, W) (or (N, 1, H, W)) uint8.
        refs, preds: (N, H, W) masks ({0,1}, bool, {0,255} or probabilities, binarised at 0.5).
        path: the PNG to write.
        titles: N strings (e.g. ``"V7/abc Dice 0.93"``), or None.

    The grid has ``grid_shape(N)`` = (rows, cols), at most 4 columns; the PNG is
    ``cols·300 × rows·300`` pixels.
    """
    imgs = as_bhw(_np(images), "images")
    refs = as_bhw(_np(refs), "refs")
    preds = as_bhw(_np(preds), "preds")
    if not (imgs.shape == refs.shape == preds.shape):
        raise ValueError(f"images {imgs.shape}, refs {refs.shape}, preds {preds.shape} differ")
    panels = [boundary_overlay(imgs[i], refs[i], preds[i]) for i in range(imgs.shape[0])]
    return _image_grid(panels, path, titles,
                       legend=[("reference", REF_COLOUR), ("prediction", PRED_COLOUR),
                               ("both", BOTH_COLOUR)])


def plot_saliency(images: Any, saliency: Any, path: Any, probs: Any = None,
                  titles: Optional[Sequence[str]] = None,
                  class_names: Optional[Sequence[str]] = None) -> Path:
    """Grid of radiographs with their saliency maps overlaid (see :func:`overlay_png`).

    Args:
        images: (N, H, W) (or (N, 1, H, W)) uint8.
        saliency: same shape, float (absolute value used).
        path: the PNG to write.
        probs: optional, (N,) p(positive) or (N, C) class probabilities, shown in the titles
            (``p=0.87`` or ``PNEUMONIA 0.87`` — the argmax class — when ``class_names`` given).
        titles: N strings prefixed to the probability, or None.

    Layout and size as :func:`plot_boundaries`.
    """
    imgs = as_bhw(_np(images), "images")
    sal = as_bhw(_np(saliency), "saliency")
    if imgs.shape != sal.shape:
        raise ValueError(f"images {imgs.shape} and saliency {sal.shape} differ")
    n = imgs.shape[0]
    labels = list(titles) if titles is not None else [""] * n
    if probs is not None:
        p = _np(probs).astype(np.float64)
        if p.shape[0] != n:
            raise ValueError(f"probs has {p.shape[0]} rows for {n} images")
        for i in range(n):
            if p.ndim == 1:
                txt = f"p={p[i]:.2f}"
            else:
                k = int(p[i].argmax())
                name = class_names[k] if class_names is not None else f"class {k}"
                txt = f"{name} {p[i, k]:.2f}"
            labels[i] = f"{labels[i]} {txt}".strip()
    panels = [overlay_png(imgs[i], None, sal[i]) for i in range(n)]
    return _image_grid(panels, path, labels if any(labels) else None)


def _image_grid(panels: list, path: Any, titles: Optional[Sequence[str]],
                legend: Optional[list] = None) -> Path:
    n = len(panels)
    if n == 0:
        raise ValueError("nothing to plot: no images")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    rows, cols = grid_shape(n)
    fig = Figure(figsize=(cols * CELL_IN, rows * CELL_IN), dpi=DPI)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i < n:
            ax.imshow(panels[i], interpolation="nearest")
            if titles is not None and titles[i]:
                ax.set_title(str(titles[i]), fontsize=8)
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([0], [0], color=np.array(c) / 255.0, lw=2, label=lbl) for lbl, c in legend]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False)
    # room above each row for its titles' lines (8 pt: about 0.15 in a line)
    lines = max([str(t).count("\n") + 1 for t in titles or [] if t] or [0])
    room = 0.15 * lines + 0.05
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - room / (rows * CELL_IN),
                        bottom=0.3 / (rows * CELL_IN), wspace=0.04,
                        hspace=max(0.12, room / CELL_IN + 0.02))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Tune results and the paper table


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_tune_scores(rows: Sequence[Mapping[str, Any]], params: Sequence[str], metric: str,
                     path: Any) -> Path:
    """Score vs each searched parameter: one panel per key of ``params`` (row keys, e.g.
    ``param:objective.threshold``), one dot per trial with a finite ``metric``.

    A parameter whose values are all numbers gets a numeric x axis (log when the values span more
    than a factor 20 and are all > 0); any other (variants, ``"all"`` budgets) one tick per value
    in first-seen order. 4×3 in (400×300 px) per panel, at most 3 panels a row.
    """
    rows = [r for r in rows if _is_number(r.get(metric))]
    n = max(len(params), 1)
    n_rows, n_cols = grid_shape(n, 3)
    fig = Figure(figsize=(4 * n_cols, 3 * n_rows), dpi=DPI)
    for i, key in enumerate(params):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        xs = [r.get(key) for r in rows]
        ys = [float(r[metric]) for r in rows]
        if xs and all(_is_number(x) for x in xs):
            ax.scatter(xs, ys, s=16)
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            labels = list(dict.fromkeys(str(x) for x in xs))
            pos = {v: k for k, v in enumerate(labels)}
            jitter = np.random.default_rng(0).uniform(-0.1, 0.1, len(xs))
            ax.scatter([pos[str(x)] + j for x, j in zip(xs, jitter)], ys, s=16)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=8, rotation=30 if len(labels) > 4 else 0)
        ax.set_xlabel(key.removeprefix("param:"))
        ax.set_ylabel(metric)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(curves: Mapping[str, tuple], metric: str, path: Any) -> Path:
    """``metric`` per epoch, one line per trial: ``curves`` maps a trial name to
    ``(epochs (E,), values (E,))``. 6×4 in (600×400 px); the legend lists at most 12 trials."""
    fig = Figure(figsize=(6, 4), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    for name, (epochs, values) in curves.items():
        ax.plot(_np(epochs) + 1, _np(values), marker="o", ms=3, lw=1, label=str(name))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch ({len(curves)} trials)")
    if 0 < len(curves) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_metric_boxes(groups: Mapping[str, Any], path: Any, ylabel: str, title: str = "") -> Path:
    """Box plot with the individual values as dots, one box per group (e.g. per model variant,
    values over seeds); groups with no finite value are kept on the axis with no box.
    Width 1.2 in per group (at least 6 in) × 4 in."""
    names = list(groups)
    data = [np.array([v for v in _np(groups[k]).astype(np.float64).reshape(-1)
                      if math.isfinite(v)]) for k in names]
    fig = Figure(figsize=(max(6.0, 1.2 * len(names)), 4), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    positions = _boxes_with_dots(ax, data, dot_size=10, dot_alpha=0.7)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{k}\n(n={d.size})" for k, d in zip(names, data)], fontsize=8)
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# one training run


#: the panels of :func:`plot_run_curves`: (title, y label, history keys or a key prefix + "*")
RUN_CURVES = (
    ("losses", "loss", ("train_loss", "train_ce_sup", "train_ce_pseudo", "train_dice",
                        "train_kl")),
    ("validation", "score", ("val_cls_auc", "val_cls_balanced_accuracy", "val_seg_dice_mean",
                             "val_score_balanced")),
    ("decision threshold on p(class 1)", "threshold", ("val_cls_threshold",)),
    ("pseudo-label accept rate", "accepted fraction", ("train_accept_rate",
                                                       "train_accept_rate_c*")),
)


def _curve_keys(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list:
    """The keys of one panel that some epoch has a finite value for (``prefix*``: every such
    key, sorted)."""
    seen = list(dict.fromkeys(k for h in history for k in h))
    out = []
    for key in keys:
        names = ([k for k in sorted(seen) if k.startswith(key[:-1])] if key.endswith("*")
                 else [key])
        out += [k for k in names if any(_is_number(h.get(k)) for h in history)]
    return out


def plot_run_curves(history: Sequence[Mapping[str, Any]], path: Any, title: str = "") -> Path:
    """``learning_curves.png`` of a run: its ``history`` (one metrics dict per epoch, with
    ``epoch`` 0-based) in four panels (:data:`RUN_CURVES`): the training losses; validation
    AUC, balanced accuracy, Dice and the checkpoint score; the threshold chosen on the
    validation split; the pseudo-label accept rate overall and per class. Epochs are shown
    1-based; a panel with no finite value says so. 10×7 in (1000×700 px)."""
    fig = Figure(figsize=(10, 7), dpi=DPI)
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]
    for i, (name, ylabel, keys) in enumerate(RUN_CURVES):
        ax = fig.add_subplot(2, 2, i + 1)
        shown = _curve_keys(history, keys)
        for key in shown:
            pts = [(e, float(h[key])) for e, h in zip(epochs, history) if _is_number(h.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1,
                    label=key.removeprefix("train_").removeprefix("val_"))
        if shown:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", color="0.5",
                    transform=ax.transAxes)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or f"learning curves ({len(history)} epochs)")
    fig.tight_layout()
    return _save(fig, path)
