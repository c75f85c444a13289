"""``multimix evaluate``: score a checkpoint on labeled sets; one JSON + Markdown report with plots.

    multimix evaluate --checkpoint runs/demo --cls-data data/kermany --seg-data data/v7 data/gb

Which rows are scored (``--subset``):

- ``auto`` (default): for the dataset the checkpoint was trained on, only its held-out validation
  ids (stored in the checkpoint), so no training image is scored; every row of any other
  dataset (cross-domain sets);
- ``val``: validation ids only (an error for a dataset the checkpoint was not trained on);
- ``all``: every row.

Outputs in ``--out``: ``report.json``, ``report.md``, ``roc.png`` (classification sets),
``dice_box.png`` (Dice per image, one box per segmentation set), ``boundaries_<set>.png``
(reference vs predicted lung boundary), ``saliency_<set>.png``, and one row per scored image in
``images_cls.csv`` (set, id, label, predicted, ``prob_<class>``) and ``images_seg.csv`` (set, id
and the per-image scores).
Hausdorff distances are in pixels at the model's input size (``data.image_size``).

Operating point: a checkpoint trained with ``objective.decision`` other than
``argmax`` carries a threshold on p(class 1) chosen on its validation split; the classification
scores (and the ``predicted`` column) then use it, and the argmax scores are reported beside them
as ``argmax_*`` (``predicted_argmax``). Every set reports ``balanced_accuracy`` and
``recall_<class>``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from multimix import tracking
from multimix.config import add_config_arguments, load_config
from multimix.data import storage
from multimix.data.dataset import read_manifest, read_table
from multimix.data.pools import StreamedPool
from multimix.data.splits import recorded_split
from multimix.data.storage import write_text
from multimix.errors import UserError
from multimix.metrics import classification_metrics, roc_curve
from multimix.validate import validate
from multimix.variants import variant_flags


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt, a checkpoint directory, or a run directory (uses best)")
    p.add_argument("--cls-data", nargs="*", default=[], metavar="URI",
                   help="prepared classification datasets (dir or s3://)")
    p.add_argument("--seg-data", nargs="*", default=[], metavar="URI",
                   help="prepared segmentation datasets (dir or s3://)")
    p.add_argument("--subset", choices=("auto", "val", "all"), default="auto",
                   help="rows to score (default auto: held-out ids of the training sets, all rows "
                        "of other sets)")
    p.add_argument("--out", default="eval",
                   help="output directory or s3://bucket/prefix (default: eval)")
    p.add_argument("--device", default="cpu")
    add_config_arguments(p, what="storage settings (S3 endpoint) if needed")


def run(args) -> int:
    if not args.cls_data and not args.seg_data:
        raise UserError("give at least one --cls-data or --seg-data dataset")
    storage_cfg = load_config(args.config, args.set).storage
    report = evaluate_checkpoint(args.checkpoint, cls_data=args.cls_data, seg_data=args.seg_data,
                                 out_dir=args.out, subset=args.subset, storage_cfg=storage_cfg,
                                 device=args.device)
    print(report["summary_text"])
    print(f"report: {report['markdown']} and {report['json']}")
    return 0


def evaluate_run(result, cfg) -> dict:
    """Evaluate the best checkpoint of a finished run on its own datasets; the report goes
    into the run directory (``<run_dir>/eval/``, also on ``s3://``) and, with ``run.mlflow``,
    into the run's MLflow run (:func:`multimix.tracking.log_evaluation`)."""
    report = evaluate_checkpoint(
        result.best_checkpoint,
        cls_data=[cfg.data.cls_data] if cfg.data.cls_data else [],
        seg_data=[cfg.data.seg_data] if cfg.data.seg_data else [],
        out_dir=storage.join(result.run_dir, "eval"),
        storage_cfg=cfg.storage,
    )
    tracking.log_evaluation(cfg, report, run_dir=result.run_dir)
    return report


def _same_dataset(a: str, b: str) -> bool:
    if not a or not b:
        return False
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _select(uri: str, task: str, subset: str, ckpt_cfg, splits: dict,
            storage_cfg=None) -> tuple[list | None, str]:
    """(ids or None for all, description)."""
    trained_on = ckpt_cfg.data.cls_data if task == "cls" else ckpt_cfg.data.seg_data
    own = _same_dataset(uri, trained_on) and task in splits
    if subset == "all":
        return None, "all rows"
    if subset == "val" and not own:
        raise UserError(f"--subset val: {uri} is not the {task} dataset the checkpoint was trained "
                        f"on ({trained_on or 'none'}); use --subset all or auto")
    if own:
        split = recorded_split(uri, splits[task], storage_cfg)
        return list(split.val), "held-out validation ids"
    return None, "all rows (not seen in training)"


def _plot_outputs(model, images: np.ndarray, device: str) -> dict:
    """Every output for a few images shown in the plots (``cls_prob``, ``seg_prob``,
    ``saliency`` where the variant has them; :func:`multimix.engine.eval_step` with ``img``).
    Not used for scores: those come from :func:`multimix.validate.validate`."""
    import torch

    from multimix.engine import eval_step

    x = torch.from_numpy(np.ascontiguousarray(images[:, None]))
    return eval_step(model, {"img": x}, device, saliency=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def evaluate_checkpoint(ckpt: str, *, cls_data=(), seg_data=(), out_dir: str = "eval",
                        subset: str = "auto", storage_cfg=None, device: str = "cpu",
                        n_show: int = 8) -> dict:
    """Score ``ckpt`` on each dataset; write ``report.json``, ``report.md`` and plots.

    ``out_dir`` is a local folder or ``s3://bucket/prefix`` (written locally, then uploaded).

    Returns ``{"json": uri, "markdown": uri, "markdown_text": str, "sets": {...}}``.

    Raises:
        StorageError: ``out_dir`` is not writable (checked before any scoring).
    """
    with storage.staged_output(out_dir, storage_cfg) as local:
        report = _evaluate(ckpt, cls_data=cls_data, seg_data=seg_data, out=local, subset=subset,
                           storage_cfg=storage_cfg, device=device, n_show=n_show,
                           dest=lambda p: storage.output_uri(out_dir, local, p))
    return report


def _evaluate(ckpt: str, *, cls_data, seg_data, out: Path, subset: str, storage_cfg, device: str,
              n_show: int, dest) -> dict:
    """:func:`evaluate_checkpoint` into the local folder ``out``; ``dest`` maps a file in it to
    its final place (reported paths)."""
    from multimix import checkpoint, plots

    model, cfg, state = checkpoint.load_model(ckpt, storage_cfg, device=device)
    threshold = checkpoint.decision_threshold(state)
    if storage_cfg is not None:
        cfg.storage = storage_cfg
    flags = variant_flags(cfg.model.variant)
    classes = state.get("classes") or []
    bs = cfg.data.eval_batch
    report: dict = {"checkpoint": ckpt, "epoch": state["epoch"], "variant": cfg.model.variant,
                    "image_size": cfg.data.image_size, "decision_threshold": threshold,
                    "hausdorff_unit": f"pixels at {cfg.data.image_size}x{cfg.data.image_size}",
                    "cls": {}, "seg": {}, "plots": {}}
    rocs, dices = {}, {}
    per_image: dict[str, list[dict]] = {"cls": [], "seg": []}
    for task, uris in (("cls", cls_data), ("seg", seg_data)):
        if uris and not (flags.has_cls if task == "cls" else flags.has_seg):
            raise UserError(f"variant {cfg.model.variant!r} has no {task} head; "
                            f"drop --{task}-data")
        for uri in uris:
            man = read_manifest(uri, storage_cfg)
            if man.get("task") != task:
                raise UserError(f"{uri} holds a {man.get('task')!r} dataset, not {task!r}")
            if task == "cls" and classes and list(man.get("classes") or classes) != classes:
                raise UserError(f"{uri} has classes {man['classes']} but the checkpoint's are "
                                f"{classes} (label indices would not match)")
            ids, what = _select(uri, task, subset, cfg, state.get("splits", {}), storage_cfg)
            if ids is None:
                ids = read_table(uri, ["id"], storage_cfg).column("id").to_pylist()
            if int(man.get("image_size", cfg.data.image_size)) != cfg.data.image_size:
                raise UserError(f"{uri} was prepared at {man['image_size']}², the checkpoint "
                                f"expects {cfg.data.image_size}² (prepare it with --size "
                                f"{cfg.data.image_size})")
            # streamed: read and decoded one row group at a time while scored
            pool = StreamedPool(uri, ids, cfg)
            name = man.get("source") or Path(uri).name
            if name in report[task]:
                name = f"{name} ({Path(uri.rstrip('/')).name})"
            if task == "cls":
                res = validate(model, device, cls=pool, classes=classes, batch_size=bs).cls
                what += _skipped_note(pool)
                probs = res.probs
                m = dict(res.metrics)
                if threshold is not None:  # decide at the stored threshold, argmax beside it
                    m = classification_metrics(probs, res.labels, classes or None,
                                               threshold=threshold)
                    m.update({f"argmax_{k}": v for k, v in res.metrics.items()
                              if k in ("accuracy", "balanced_accuracy", "macro_f1")
                              or k.startswith(("f1_", "recall_"))})
                    m["threshold"] = threshold
                m.update(dataset=uri, rows=what, n=int(len(res.labels)))
                report["cls"][name] = m
                names = list(classes) or [f"class{k}" for k in range(probs.shape[1])]
                per_image["cls"] += [
                    {"set": name, "id": i, "label": names[y],
                     "predicted": names[_decide(p, threshold)],
                     **({"predicted_argmax": names[int(p.argmax())]} if threshold is not None
                        else {}),
                     **{f"prob_{c}": float(v) for c, v in zip(names, p)}}
                    for i, y, p in zip(res.ids, res.labels, probs)]
                if len(np.unique(res.labels)) > 1:
                    fpr, tpr, _ = roc_curve(probs[:, 1], res.labels)
                    rocs[name] = (fpr, tpr, m.get("auc", float("nan")))
                head = pool.head(n_show)
                sal = _plot_outputs(model, head.images, device)
                if "saliency" in sal:
                    p = plots.plot_saliency(
                        head.images, sal["saliency"][:, 0], out / f"saliency_{_slug(name)}.png",
                        titles=cls_titles(head.ids, head.labels, sal["cls_prob"], names,
                                          threshold))
                    report["plots"][f"saliency {name}"] = dest(p)
            else:
                res = validate(model, device, seg=pool, batch_size=bs).seg
                what += _skipped_note(pool)
                per = res.per_image
                s = dict(res.metrics)
                s.update(dataset=uri, rows=what, n=int(len(res.ids)))
                report["seg"][name] = s
                dices[name] = per["dice"]
                per_image["seg"] += [{"set": name, "id": i, **{k: float(v[j]) for k, v in
                                                             per.items()}}
                                     for j, i in enumerate(res.ids)]
                head = pool.head(n_show)
                k = len(head)
                shown = _plot_outputs(model, head.images, device)
                dice_of = dict(zip(res.ids, per["dice"]))  # the scores, by id
                titles = [f"{_short(i)}\nDice {dice_of[i]:.3f}" if i in dice_of else _short(i)
                          for i in head.ids]
                p = plots.plot_boundaries(head.images, head.masks,
                                          shown["seg_prob"][:k, 0] >= 0.5,
                                          out / f"boundaries_{_slug(name)}.png", titles=titles)
                report["plots"][f"boundaries {name}"] = dest(p)
                if "saliency" in shown:
                    p = plots.plot_saliency(head.images, shown["saliency"][:, 0],
                                            out / f"saliency_{_slug(name)}.png", titles=titles)
                    report["plots"][f"saliency {name}"] = dest(p)
    if rocs:
        report["plots"]["roc"] = dest(plots.plot_roc(rocs, out / "roc.png"))
    if dices:
        report["plots"]["dice_box"] = dest(plots.plot_dice_box(dices, out / "dice_box.png"))
    for task, rows in per_image.items():
        if rows:
            with open(out / f"images_{task}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            report["per_image"] = {**report.get("per_image", {}),
                                   task: dest(out / f"images_{task}.csv")}

    write_text(str(out / "report.json"), json.dumps(report, indent=2, default=_json_default))
    markdown = _markdown(report)
    (out / "report.md").write_text(markdown)
    return {"json": dest(out / "report.json"), "markdown": dest(out / "report.md"),
            "markdown_text": markdown, "summary_text": summary_text(report),
            "sets": {"cls": report["cls"], "seg": report["seg"]}}


def _short(image_id: str, width: int = 36) -> str:
    """An image id cut to ``width`` characters from the left (the file name end is kept)."""
    return image_id if len(image_id) <= width else "…" + image_id[-(width - 1):]


def cls_titles(ids, labels, probs, names, threshold) -> list:
    """Per-image titles of a classification saliency figure: the id, then the true label,
    the predicted one (at ``threshold`` when the checkpoint decides at one, else argmax) and
    p(class 1): ``NORMAL/IM-0115\ntrue NORMAL, pred PNEUMONIA\np(PNEUMONIA) = 0.87``."""
    out = []
    probs = np.asarray(probs, dtype=np.float64)
    for j, image_id in enumerate(ids):
        true = names[int(labels[j])] if labels is not None else "?"
        pred = names[_decide(probs[j], threshold)]
        p1 = f"p({names[1]})" if len(names) == 2 else "p(class 1)"
        out.append(f"{_short(str(image_id))}\ntrue {true}, pred {pred}\n"
                   f"{p1} = {probs[j, 1]:.2f}")
    return out


def _skipped_note(pool) -> str:
    """``"; N undecodable row(s) skipped"`` for a pool that lost rows while scored, else ``""``."""
    return f"; {pool.skipped} undecodable row(s) skipped" if pool.skipped else ""


def _decide(p: np.ndarray, threshold) -> int:
    """Class index for probabilities ``p`` (C,): argmax, or ``p[1] >= threshold`` (C = 2)."""
    return int(p.argmax()) if threshold is None else int(p[1] >= threshold)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "set"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


#: the terminal summary's width limit (the full tables are in report.md)
SUMMARY_WIDTH = 100


def _num(v, width: int, digits: int = 4) -> str:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return f"{v:>{width}.{digits}f}" if ok else f"{'n/a':>{width}}"


def summary_text(r: dict, width: int = SUMMARY_WIDTH) -> str:
    """The report in a few lines of at most ``width`` columns, for the terminal: per
    classification set n, accuracy, balanced accuracy, AUC (at the decision the checkpoint
    makes); per segmentation set n, Dice and HD95 (means over images). Set names are cut to
    fit; the full tables are in ``report.md``."""
    def name_col(names) -> int:
        return max([12] + [len(n) for n in names])

    head = (f"evaluation: epoch {r['epoch'] + 1}, variant {r['variant']}, input "
            f"{r['image_size']}x{r['image_size']}")
    if r.get("decision_threshold") is not None:
        head += f", decision p(class 1) >= {r['decision_threshold']:.3f}"
    lines = [head]
    rest = 7 + 3 * 9  # the numeric columns of the wider table
    w = min(name_col(list(r["cls"]) + list(r["seg"])), width - rest)

    def cut(name: str) -> str:
        return name if len(name) <= w else name[:w - 1] + "…"

    if r["cls"]:
        lines.append(f"{'classification':<{w}} {'n':>6} {'accuracy':>8} {'bal.acc':>8} "
                     f"{'AUC':>8}")
        for name, m in r["cls"].items():
            lines.append(f"{cut(name):<{w}} {m['n']:>6} {_num(m.get('accuracy'), 8)} "
                         f"{_num(m.get('balanced_accuracy'), 8)} {_num(m.get('auc'), 8)}")
    if r["seg"]:
        lines.append(f"{'segmentation':<{w}} {'n':>6} {'Dice':>8} {'HD95 px':>8}")
        for name, m in r["seg"].items():
            lines.append(f"{cut(name):<{w}} {m['n']:>6} {_num(m.get('dice_mean'), 8)} "
                         f"{_num(m.get('hd95_mean'), 8, 1)}")
    return "\n".join(line if len(line) <= width else line[:width - 1] + "…" for line in lines)


def _markdown(r: dict) -> str:
    lines = ["# MultiMix evaluation", "",
             f"Checkpoint `{r['checkpoint']}` (epoch {r['epoch'] + 1}, variant `{r['variant']}`, "
             f"input {r['image_size']}²)."
             + (f" Classification decided at p(class 1) ≥ {r['decision_threshold']:.4f} (chosen "
                "on the validation split); `argmax_*` = the argmax decision."
                if r.get("decision_threshold") is not None else ""), ""]
    if r["cls"]:
        lines += ["## Pneumonia classification", ""]
        keys = [k for k in next(iter(r["cls"].values())) if k not in
                ("dataset", "rows", "confusion", "confusion_matrix", "class_names", "n")]
        keys = [k for k in keys if isinstance(next(iter(r["cls"].values()))[k], (int, float))]
        lines.append("| set | rows | n | " + " | ".join(keys) + " |")
        lines.append("|---|---|---|" + "---|" * len(keys))
        for name, m in r["cls"].items():
            lines.append(f"| {name} | {m['rows']} | {m['n']} | "
                         + " | ".join(_fmt(m[k]) for k in keys) + " |")
        lines.append("")
    if r["seg"]:
        lines += ["## Lung segmentation", "",
                  f"Mean over images (± std). Hausdorff distance in {r['hausdorff_unit']}.", ""]
        metrics = ["dice", "jaccard", "ssim", "hausdorff", "precision", "recall"]
        lines.append("| set | rows | n | " + " | ".join(metrics) + " |")
        lines.append("|---|---|---|" + "---|" * len(metrics))
        for name, s in r["seg"].items():
            cells = []
            for k in metrics:
                mean, std = s.get(f"{k}_mean"), s.get(f"{k}_std")
                cells.append("n/a" if mean is None else f"{mean:.4f} ± {std:.4f}")
            lines.append(f"| {name} | {s['rows']} | {s['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    if r["plots"]:
        lines += ["## Plots", ""] + [f"- {k}: `{v}`" for k, v in r["plots"].items()] + [""]
    return "\n".join(lines)
