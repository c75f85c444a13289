"""``multimix experiment paper-table``: the MultiMix paper's ablation table in one command.

    multimix experiment paper-table --cls-data data/kermany-256 --seg-data data/v7-256 \\
        --eval-seg data/gb-256 --seeds 3 --budgets 100:10,1000:50,all:all --preset paper

One Ray Tune experiment (:mod:`multimix.tune`: same trials, same restore on rerun, same
``results.csv`` / ``best.yaml`` / plots) runs the grid ``model.variant`` (the paper's rows: U-Net,
Enc, Enc-SSL, UMTL, UMTL-S, UMTL-SSL, UMTL-SSL-S, MultiMix) × label budget (classification:
segmentation pairs, the paper's 100:10, 1000:50, all:all) × ``optim.seed`` (``--seeds`` N:
0…N-1). Every trial's best checkpoint (best epoch by ``run.checkpoint_metric`` on its own
validation ids) is then evaluated (:func:`multimix.evaluate.evaluate_checkpoint`) on the
in-domain sets (the held-out validation ids of ``--cls-data`` / ``--seg-data``) and on the
cross-domain sets (``--eval-cls`` / ``--eval-seg``, every row), for the heads the variant has.

Written into ``<run.storage_path>/<name>/`` (local or ``s3://``) beside Tune's results::

    eval/<trial>/report.{json,md}, ...   each trial's evaluation (reused on a rerun)
    paper_table.md, paper_table.csv      mean ± std over seeds per row, budget and set:
                                         Acc, F1-N, F1-P, AUC (%); Dice, Jaccard (%), HD (px)
    box_<budget>_<set>_<metric>.png      one box per row (the seeds as dots): AUC, Dice, HD

Presets: ``cpu-small`` (64 px, width 0.5, 2 epochs × 20 steps: minutes per row on 2 cores) and
``paper`` (the GPU protocol: 256 px, full width, 25 epochs). ``--set`` overrides either.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time

import numpy as np

from multimix import evaluate, tune
from multimix.config import add_config_arguments, load_config
from multimix.data import storage
from multimix.errors import UserError
from multimix.tune import BUDGET_KEY, Search, experiment_uri
from multimix.variants import VARIANT_FLAGS

#: the paper's rows, in its order: variant -> label in the table
ROWS = {"unet": "U-Net", "enc": "Enc", "enc-ssl": "Enc-SSL", "umtl": "UMTL", "umtl-s": "UMTL-S",
        "umtl-ssl": "UMTL-SSL", "umtl-ssl-s": "UMTL-SSL-S", "multimix": "MultiMix"}
DEFAULT_BUDGETS = ("100:10", "1000:50", "all:all")
#: (column, metric key in the evaluation report, scale): classification then segmentation
CLS_COLUMNS = (("Acc", "accuracy", 100.0), ("F1-N", "f1_normal", 100.0),
               ("F1-P", "f1_pneumonia", 100.0), ("AUC", "auc", 100.0))
SEG_COLUMNS = (("Dice", "dice_mean", 100.0), ("Jaccard", "jaccard_mean", 100.0),
               ("HD", "hausdorff_mean", 1.0))
#: metrics that get a box plot
BOX_METRICS = ("AUC", "Dice", "HD")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    t = sub.add_parser("paper-table", help="the paper's rows × label budgets × seeds, evaluated "
                                           "in- and cross-domain; one table + box plots",
                       description=__doc__.split("\n\n")[0])
    t.add_argument("--cls-data", required=True, metavar="URI",
                   help="prepared classification set to train on (its held-out ids: in-domain)")
    t.add_argument("--seg-data", required=True, metavar="URI",
                   help="prepared segmentation set to train on (its held-out ids: in-domain)")
    t.add_argument("--eval-cls", nargs="*", default=[], metavar="URI",
                   help="cross-domain classification sets (every row scored)")
    t.add_argument("--eval-seg", nargs="*", default=[], metavar="URI",
                   help="cross-domain segmentation sets (every row scored)")
    t.add_argument("--seeds", type=int, default=3, help="seeds per row and budget (default 3)")
    t.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS), metavar="C:S,...",
                   help="classification:segmentation label budgets (default "
                        f"{','.join(DEFAULT_BUDGETS)})")
    t.add_argument("--rows", default=",".join(ROWS), metavar="VARIANT,...",
                   help=f"the rows (default all: {','.join(ROWS)})")
    add_config_arguments(t, "paper", aliases=("--preset",),
                         what="cpu-small (a 2-core machine) or paper (the GPU protocol)")
    t.add_argument("--name", default="paper-table",
                   help="experiment name: <run.storage_path>/<name> (default paper-table)")
    t.add_argument("--concurrent", type=int, default=1, help="trials at once (default 1)")
    t.add_argument("--restart", action="store_true", help="delete the experiment, start over")
    t.add_argument("--retries", type=int, default=1,
                   help="restarts of a failed trial from its last checkpoint (default 1)")
    t.add_argument("--device", default="cpu", help="device for the evaluations (default cpu)")


def parse_rows(raw: str) -> list[str]:
    rows = [r.strip() for r in raw.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if not rows or bad:
        raise UserError(f"--rows: unknown variant {bad[0] if bad else raw!r} (rows: "
                        f"{', '.join(ROWS)})")
    return rows


def search_for(rows: list[str], budgets: list[str], seeds: int, concurrent: int = 1,
               retries: int = 1):
    """The :class:`multimix.tune.Search` of the table: a grid, one sample per point."""
    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {seeds}")
    return Search(grid={"model.variant": list(rows), BUDGET_KEY: list(budgets),
                        "optim.seed": list(range(seeds))},
                  num_samples=1, concurrent=concurrent, retries=retries)


def evaluate_trials(rows: list[dict], cfg, eval_cls: list[str], eval_seg: list[str],
                    device: str = "cpu") -> list[dict]:
    """Evaluate each finished trial's best checkpoint (a stored report is reused).

    Returns one record per trial: ``variant``, ``budget``, ``seed``, ``trial`` and
    ``sets``: ``{"cls": {set name: metrics}, "seg": {set name: summary}}`` (the report's)."""
    exp = experiment_uri(cfg)
    out = []
    for row in rows:
        if not row.get("checkpoint") or row["status"] not in ("done", "stopped"):
            continue
        variant = row["param:model.variant"]
        flags = VARIANT_FLAGS[variant]
        out_dir = storage.join(exp, "eval", row["trial"])
        report_uri = storage.join(out_dir, "report.json")
        if storage.exists(report_uri, cfg.storage):
            report = json.loads(storage.read_bytes(report_uri, cfg.storage))
            sets = {"cls": report["cls"], "seg": report["seg"]}
        else:
            sets = evaluate.evaluate_checkpoint(
                row["checkpoint"],
                cls_data=[cfg.data.cls_data, *eval_cls] if flags.has_cls else [],
                seg_data=[cfg.data.seg_data, *eval_seg] if flags.has_seg else [],
                out_dir=out_dir, storage_cfg=cfg.storage, device=device)["sets"]
        out.append({"trial": row["trial"], "variant": variant,
                    "budget": str(row["param:budget"]), "seed": row["param:optim.seed"],
                    "time_s": row.get("time_s"), "sets": sets})
    return out


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def table(evals: list[dict], rows: list[str], budgets: list[str]) -> tuple[list[dict], dict]:
    """Aggregate over seeds.

    Returns ``(records, columns)``: one record per (budget, variant) with ``budget``,
    ``row`` (the paper's label), ``seeds`` and, per ``"<set> <column>"``, ``(mean, std, n)``
    (sample std, ddof 1; 0 with one seed); ``columns`` maps ``"cls"``/``"seg"`` to the set names
    in first-seen order."""
    sets = {"cls": [], "seg": []}
    for e in evals:
        for task in sets:
            sets[task] += [s for s in e["sets"][task] if s not in sets[task]]
    records = []
    for budget in budgets:
        for variant in rows:
            es = [e for e in evals if e["variant"] == variant and e["budget"] == budget]
            rec: dict = {"budget": budget, "row": ROWS[variant], "seeds": len(es)}
            for task, cols in (("cls", CLS_COLUMNS), ("seg", SEG_COLUMNS)):
                for name in sets[task]:
                    for col, key, scale in cols:
                        vals = [e["sets"][task][name].get(key) for e in es
                                if name in e["sets"][task]]
                        vals = [float(v) * scale for v in vals if v is not None]
                        rec[f"{name} {col}"] = _mean_std(vals) if vals else None
            records.append(rec)
    return records, sets


def _fmt(cell) -> str:
    if cell is None:
        return "—"
    m, s, n = cell
    if n == 0:
        return "n/a"
    return f"{m:.1f} ± {s:.1f}"


def markdown(records: list[dict], sets: dict, budgets: list[str], note: str = "") -> str:
    """One Markdown table per budget, rows as in the paper; ``—`` where a row has no such head."""
    cols = [f"{n} {c}" for n in sets["cls"] for c, _, _ in CLS_COLUMNS] + \
           [f"{n} {c}" for n in sets["seg"] for c, _, _ in SEG_COLUMNS]
    out = ["# The MultiMix paper's table", "",
           "Mean ± std over seeds (sample std; ± 0.0 with one seed). Acc, F1-N, F1-P, AUC, "
           "Dice, Jaccard in %; HD (mean Hausdorff distance) in pixels at the model's input "
           "size. In-domain sets: held-out validation ids of the training sets; other sets: "
           "every image.", ""]
    if note:
        out += [note, ""]
    for budget in budgets:
        out += [f"## Labeled: classification {budget.split(':')[0]}, segmentation "
                f"{budget.split(':')[1]}", ""]
        out.append("| row | seeds | " + " | ".join(cols) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for rec in records:
            if rec["budget"] == budget:
                out.append(f"| {rec['row']} | {rec['seeds']} | "
                           + " | ".join(_fmt(rec.get(c)) for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def csv_text(records: list[dict]) -> str:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.writer(buf)
    head = []
    for k in keys:
        head += [k] if k in ("budget", "row", "seeds") else [f"{k} mean", f"{k} std"]
    w.writerow(head)
    for r in records:
        line = []
        for k in keys:
            v = r.get(k)
            if k in ("budget", "row", "seeds"):
                line.append(v)
            else:
                line += ["", ""] if v is None or v[2] == 0 else [f"{v[0]:.4f}", f"{v[1]:.4f}"]
        w.writerow(line)
    return buf.getvalue()


def write_table(evals: list[dict], cfg, rows: list[str], budgets: list[str],
                note: str = "") -> dict:
    """``paper_table.md``, ``paper_table.csv`` and the box plots into the experiment dir."""
    from multimix import plots

    records, sets = table(evals, rows, budgets)
    exp = experiment_uri(cfg)
    text = markdown(records, sets, budgets, note)
    names = ["paper_table.md", "paper_table.csv"]
    with storage.staged_output(exp, cfg.storage) as local:
        storage.replace_local(local / "paper_table.md", text)
        storage.replace_local(local / "paper_table.csv", csv_text(records))
        for budget in budgets:
            for task, cols in (("cls", CLS_COLUMNS), ("seg", SEG_COLUMNS)):
                for name in sets[task]:
                    for col, key, scale in cols:
                        if col not in BOX_METRICS:
                            continue
                        groups = {ROWS[v]: [e["sets"][task][name][key] * scale for e in evals
                                            if e["variant"] == v and e["budget"] == budget
                                            and e["sets"][task].get(name, {}).get(key)
                                            is not None]
                                  for v in rows}
                        groups = {k: v for k, v in groups.items() if v}
                        if not groups:
                            continue
                        fname = (f"box_{budget.replace(':', '-')}_{_slug(name)}_"
                                 f"{col.lower()}.png")
                        plots.plot_metric_boxes(groups, local / fname,
                                                ylabel=f"{col} ({'px' if col == 'HD' else '%'})",
                                                title=f"{name}, labeled {budget}")
                        names.append(fname)
    return {"markdown": storage.join(exp, "paper_table.md"), "text": text,
            "files": [storage.join(exp, n) for n in names], "records": records}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


def run(args) -> int:
    rows = parse_rows(args.rows)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    cfg = load_config(args.config, [
        f"data.cls_data={args.cls_data}", f"data.seg_data={args.seg_data}",
        f"run.name={args.name}", *args.set])
    # the evaluation sets are protected by every trial's contamination guard (DESIGN §3b)
    cfg.data.eval_data = list(dict.fromkeys([*cfg.data.eval_data, *args.eval_cls,
                                             *args.eval_seg]))
    cfg = tune.absolute_paths(cfg.validate())
    search = search_for(rows, budgets, args.seeds, args.concurrent, args.retries)
    t0 = time.perf_counter()
    grid = tune.tune(cfg, search, restart=args.restart)
    t_tune = time.perf_counter() - t0
    res = tune.write_results(grid, cfg, search)
    unfinished = [r for r in res["rows"] if r["status"] == "unfinished"]
    if unfinished:
        print(f"{len(unfinished)} of {len(res['rows'])} trials unfinished: rerun the same "
              "command to continue")
        return 130
    failed = [r for r in res["rows"] if r["status"] == "error"]
    t1 = time.perf_counter()
    evals = evaluate_trials(res["rows"], cfg, args.eval_cls, args.eval_seg, args.device)
    t_eval = time.perf_counter() - t1
    train_s = sum(r.get("time_s") or 0.0 for r in res["rows"])
    note = (f"Protocol: preset {args.config}" + (f", --set {' '.join(args.set)}" if args.set
                                                 else "")
            + f"; {len(res['rows'])} trials; trial wall time {train_s:.0f} s in all "
            f"(this command: search {t_tune:.0f} s, evaluation {t_eval:.0f} s).")
    out = write_table(evals, cfg, rows, budgets, note)
    print(out["text"])
    print(f"table: {out['markdown']}; trials: {res['files']['results.md']}")
    if failed:
        raise UserError(f"{len(failed)} of {len(res['rows'])} trials failed (left out of the "
                        f"table); first: {failed[0]['error']}")
    return 0
