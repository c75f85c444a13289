"""``multimix`` command line: argparse subcommands that call library functions.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together and turns errors into a one-line
last message: a :class:`UserError` (also when Ray wraps it) exits 2 with its message alone; any
other error exits 1 with its traceback above that line. Heavy imports (torch, ray) happen inside
``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from multimix.errors import RunFailed, UserError, is_user_error, one_line, root_cause

#: subcommand -> (module, one-line help)
COMMANDS = {
    "prepare": ("multimix.data.prepare", "public layouts -> sharded Parquet on disk or s3://"),
    "split": ("multimix.data.splits", "seeded, stratified label-budget splits (id lists)"),
    "verify": ("multimix.data.verify", "check prepared datasets against their manifests "
                                       "(shards, sizes, rows, sha256)"),
    "overlap": ("multimix.data.overlap", "exact and near-duplicate images shared by prepared "
                                         "datasets (contamination check)"),
    "train": ("multimix.train", "train MultiMix with Ray Train (DDP)"),
    "tune": ("multimix.tune", "Ray Tune search: --space/--grid, ASHA, concurrency, resume, "
                              "results + best.yaml"),
    "experiment": ("multimix.experiment", "`experiment paper-table`: the paper's rows x budgets "
                                          "x seeds, evaluated; one table"),
    "evaluate": ("multimix.evaluate", "score a checkpoint on labeled sets; JSON/Markdown + plots"),
    "predict": ("multimix.predict", "pneumonia probability, lung mask, saliency for images"),
    "bench": ("multimix.bench", "benchmarks: `bench step` (model step), `bench data` (augmentation)"),
    "demo": ("multimix.demo", "the main job on the built-in synthetic set: prepare, train, evaluate"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (a broken or slow module elsewhere never
    affects another command, and ``multimix --help`` imports none)."""
    parser = argparse.ArgumentParser(
        prog="multimix",
        description="MultiMix on Ray: semi-supervised chest X-ray pneumonia classification and "
                    "lung segmentation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:  # a command may say where it stopped (train.Interrupted)
        print(f"multimix {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr,
              flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of a job's log is one clear line
        # A UserError (also one raised inside a Ray Train worker or a Tune trial and wrapped by
        # Ray) is the whole message; anything else keeps its traceback above the last line.
        # A RunFailed (a failure inside Ray) is one line too: its traceback is in its log file.
        if not isinstance(root_cause(exc), (UserError, RunFailed)):
            traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        print(f"multimix {args.command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2 if is_user_error(exc) else 1


if __name__ == "__main__":
    sys.exit(main())
