"""Every subcommand that reads a config takes it the same way: ``-c/--config`` and ``-s/--set``
(one helper, :func:`multimix.config.add_config_arguments`), and the values reach the command."""

from __future__ import annotations

import argparse

import pytest

from multimix.cli import COMMANDS, build_parser

#: (argv before the options, required arguments after them) of every config-reading command
COMMANDS_WITH_CONFIG = {
    ("prepare",): ["--out", "o"],
    ("split",): ["d", "--labeled", "10"],
    ("verify",): ["d"],
    ("overlap",): ["a", "b"],
    ("train",): [],
    ("tune",): [],
    ("experiment", "paper-table"): ["--cls-data", "a", "--seg-data", "b"],
    ("evaluate",): ["--checkpoint", "ckpt"],
    ("predict",): ["--checkpoint", "ckpt", "img.png"],
    ("demo",): [],
    ("bench", "train"): [],
    ("bench", "scale"): [],
}


def _subparser(parser: argparse.ArgumentParser, path: tuple) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _options(parser: argparse.ArgumentParser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("path", sorted(COMMANDS_WITH_CONFIG), ids=" ".join)
def test_config_and_set_have_the_same_short_and_long_names(path):
    sub = _subparser(build_parser(path[0]), path)
    opts = _options(sub)
    assert {"-c", "--config", "-s", "--set"} <= set(opts)
    assert opts["-c"] is opts["--config"] and opts["-c"].dest == "config"
    assert opts["-s"] is opts["--set"] and opts["-s"].dest == "set"
    assert isinstance(opts["-s"], argparse._AppendAction)
    # the same help text everywhere for --set
    assert opts["-s"].help == _options(_subparser(build_parser("train"), ("train",)))["-s"].help


@pytest.mark.parametrize("path", sorted(COMMANDS_WITH_CONFIG), ids=" ".join)
def test_short_options_reach_the_command(path):
    argv = [*path, *COMMANDS_WITH_CONFIG[path], "-c", "cpu-small", "-s", "optim.epochs=3",
            "-s", "run.name=x"]
    args = build_parser(path[0]).parse_args(argv)
    assert args.config == "cpu-small" and args.set == ["optim.epochs=3", "run.name=x"]


def test_paper_table_keeps_preset_as_an_alias_of_config():
    argv = ["experiment", "paper-table", "--cls-data", "a", "--seg-data", "b"]
    parser = build_parser("experiment")
    assert parser.parse_args(argv).config == "paper"
    assert parser.parse_args([*argv, "--preset", "cpu-small"]).config == "cpu-small"


def test_every_command_that_loads_a_config_is_listed():
    """A command whose module calls load_config(args.config, ...) takes -c/-s: the list above
    covers all of them (a new command gets checked once it is added there)."""
    import importlib
    import inspect

    reading = set()
    for name, (module, _) in COMMANDS.items():
        src = inspect.getsource(importlib.import_module(module))
        if "args.config" in src:
            reading.add(name)
    bench = importlib.import_module("multimix.bench")
    for name, (module, _) in bench.SUBCOMMANDS.items():
        if "args.config" in inspect.getsource(importlib.import_module(module)):
            reading.add(f"bench {name}")
    listed = {" ".join(p) if p[0] == "bench" else p[0] for p in COMMANDS_WITH_CONFIG}
    assert reading == listed
