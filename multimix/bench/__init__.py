"""``multimix bench step`` (the pure-torch training step), ``data`` (augmentation), ``train``
(Ray Data feeding the step) and ``scale`` (memory vs the unlabeled corpus's size).

Benchmarks print numbers (img/s, peak memory) and ratios against a baseline measured in the same
process; they are not timed tests.
"""

from __future__ import annotations

import importlib

SUBCOMMANDS = {
    "step": ("multimix.bench.step", "img/s and peak memory of one MultiMix step vs the naive step"),
    "data": ("multimix.bench.data", "weak+strong augmentation pairs/s per core vs the paper's"),
    "train": ("multimix.bench.train", "does Ray Data keep the step fed? pipeline → Train "
                                      "worker → train_step vs the bare step"),
    "scale": ("multimix.bench.scale", "peak memory and steps/s of a run with an N-row "
                                      "unlabeled pool vs a 5,000-row one"),
    "predict": ("multimix.bench.predict", "DICOM vs JPEG decoding; predict in-process vs --ray"),
}


def ratio(a: float, b: float) -> float:
    """``a / b`` to 3 significant digits (a small figure stays exact to 0.5 %, not rounded to
    0.0 or to two decimals)."""
    return float(f"{a / b:.3g}")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args) -> int:
    return args._bench_run(args)
