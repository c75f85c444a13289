"""``multimix demo``: the main job, end to end on a local Ray with the ``cpu-small`` preset.

1. prepare data: the built-in synthetic phantoms (default), or real public sets with ``--data``
   (``ROOT/kermany-cxr`` for classification and ``ROOT/v7-covid-lungs`` for segmentation, the
   layout of ``../shared/data``; ``ROOT/gb-covid-lungs`` is added as a cross-domain test set);
2. train MultiMix with Ray Train (resumes if run again with the same ``--out``);
3. evaluate the best checkpoint and write a JSON + Markdown report with plots.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from multimix import evaluate
from multimix.config import add_config_arguments, load_config
from multimix.data.prepare import prepare, prepare_demo
from multimix.train import VERBOSE_ENV, add_run_arguments, train


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="use real data under ROOT (kermany-cxr/, v7-covid-lungs/, optional "
                        "gb-covid-lungs/) instead of the synthetic phantoms")
    add_config_arguments(p, "cpu-small")
    add_run_arguments(p)


def _prepare(args, size: int) -> tuple[str, str, list[str], list[str]]:
    """Prepared (cls, seg) URIs plus extra evaluation sets; reuses earlier output."""
    data = Path(args.out) / "data"
    if args.data is None:
        cls_uri, seg_uri = str(data / "demo" / "cls"), str(data / "demo" / "seg")
        if not (Path(cls_uri) / "manifest.json").exists():
            print(f"[demo] preparing the synthetic demo set in {data / 'demo'}", flush=True)
            prepare_demo(str(data / "demo"), image_size=size)
        return cls_uri, seg_uri, [], []
    root = Path(args.data)
    cls_uri, seg_uri = str(data / f"kermany-{size}"), str(data / f"v7-{size}")
    jobs = [(root / "kermany-cxr", cls_uri, "kermany-cxr"),
            (root / "v7-covid-lungs", seg_uri, "v7-covid-lungs")]
    extra_seg = []
    if (root / "gb-covid-lungs").is_dir():
        extra_seg.append(str(data / f"gb-{size}"))
        jobs.append((root / "gb-covid-lungs", extra_seg[0], "gb-covid-lungs"))
    for src, out, name in jobs:
        if not (Path(out) / "manifest.json").exists():
            print(f"[demo] preparing {src} -> {out}", flush=True)
            prepare(str(src), out, image_size=size, source_name=name)
    return cls_uri, seg_uri, [], extra_seg


def run(args) -> int:
    t0 = time.perf_counter()
    base = load_config(args.config, args.set)
    cls_uri, seg_uri, extra_cls, extra_seg = _prepare(args, base.data.image_size)
    overrides = [f"data.cls_data={cls_uri}", f"data.seg_data={seg_uri}",
                 f"run.storage_path={Path(args.out).resolve() / 'runs'}", "run.name=demo"]
    if args.data is None:
        # the synthetic pools are small: budgets that leave an unlabeled pool
        overrides += ["data.cls_labeled=40", "data.seg_labeled=10", "optim.epochs=5",
                      "optim.steps_per_epoch=40"]
    cfg = load_config(args.config, overrides + list(args.set))
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    result = train(cfg, restart=args.restart)
    report = evaluate.evaluate_checkpoint(
        result.best_checkpoint,
        cls_data=[cls_uri, *extra_cls],
        seg_data=[seg_uri, *extra_seg],
        out_dir=str(Path(args.out) / "report"),
        storage_cfg=cfg.storage,
    )
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    print(f"[demo] run directory: {result.run_dir}")
    print(report["summary_text"])
    print(f"[demo] report: {report['markdown']} (every metric, the plots)")
    return 0
