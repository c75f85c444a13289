"""cluster/README.md can be followed verbatim: every repository path its commands name exists;
every `python ray_jobs/X.py ...` parses with the `multimix X` parser and its --set values load;
every `ray ...` command parses with Ray's own CLI; every result file it promises is one the code
writes, and the search's folder is the one `multimix tune` uses."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
import yaml

import cluster_checks as cc

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "cluster" / "README.md"
BAD = Path(__file__).with_name("bad_recipes")
REPO_DIRS = ("cluster/", "ray_jobs/", "scripts/", "tests/", "multimix/")


def _image_paths() -> dict[str, Path]:
    """Where the image puts the repository's folders (cluster/Dockerfile's WORKDIR + COPY)."""
    out, workdir = {}, "/"
    for stage in cc.evaluate_dockerfile(REPO / "cluster" / "Dockerfile"):
        for ins in stage.instructions:
            if ins.keyword == "WORKDIR":
                workdir = ins.text
            elif ins.keyword == "COPY":
                *src, dest = [w for w in ins.text.split() if not w.startswith("--")]
                if len(src) == 1:
                    out[str(Path(workdir, dest))] = REPO / src[0]
    return out


def path_problems(commands: list[list[str]]) -> list[str]:
    image = _image_paths()
    out = []
    for words in commands:
        for w in words:
            w = w.split("=", 1)[1] if w.startswith("--") and "=" in w else w
            if w.startswith("file://"):
                w = w[len("file://"):]
            if w.startswith(REPO_DIRS) and not any(REPO.glob(w)):
                out.append(f"{' '.join(words[:3])} ...: {w} does not exist")
            for prefix, src in image.items():
                if w.startswith(prefix + "/") and not (src / w[len(prefix) + 1:]).exists():
                    out.append(f"{w}: not in the image ({src} has no {w[len(prefix) + 1:]})")
    return out


def _entry_command(script: Path) -> str:
    """The `multimix` subcommand a ray_jobs/ script runs: main(["<command>", *argv])."""
    for n in ast.walk(ast.parse(script.read_text())):
        if (isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main" and n.args
                and isinstance(n.args[0], ast.List)):
            return n.args[0].elts[0].value
    raise AssertionError(f"{script}: no main([...]) call")


def _job_argv(words: list[str]) -> list[str] | None:
    """`... python ray_jobs/X.py ARGS` -> ["ray_jobs/X.py", *ARGS]."""
    for i, w in enumerate(words[:-1]):
        if w == "python" and words[i + 1].endswith(".py") and "ray_jobs/" in words[i + 1]:
            return words[i + 1:]
    return None


def entrypoint_problems(commands: list[list[str]]) -> list[str]:
    from multimix.cli import build_parser
    from multimix.config import load_config

    out = []
    for words in commands:
        argv = _job_argv(words)
        if argv is None:
            continue
        script = REPO / "ray_jobs" / Path(argv[0]).name
        if not script.exists():
            out.append(f"{argv[0]}: no such entry point")
            continue
        command = _entry_command(script)
        try:
            args = build_parser(command).parse_args([command, *argv[1:]])
        except SystemExit:
            out.append(f"multimix {command} refuses {' '.join(argv[1:])}")
            continue
        try:
            load_config(getattr(args, "config", None), getattr(args, "set", []))
        except Exception as exc:  # noqa: BLE001 - the message is the finding
            out.append(f"multimix {command} {' '.join(argv[1:])}: {exc}")
    return out


def ray_cli_problems(commands: list[list[str]]) -> list[str]:
    from ray.scripts.scripts import cli

    out = []
    for words in commands:
        if words[:1] != ["ray"]:
            continue
        cmd, rest, name = cli, words[1:], "ray"
        while isinstance(cmd, click.Group) and rest:
            sub = cmd.get_command(None, rest[0])
            if sub is None:
                out.append(f"{name} has no command {rest[0]}")
                break
            cmd, name, rest = sub, f"{name} {rest[0]}", rest[1:]
        else:
            try:
                cmd.make_context(name, list(rest))
            except click.UsageError as exc:
                out.append(f"{' '.join(words)}: {exc.format_message()}")
    return out


def test_every_path_the_guide_names_exists():
    commands = cc.guide_commands(GUIDE)
    assert path_problems(commands) == []
    [job] = [d for d in yaml.safe_load_all((REPO / "cluster" / "kuberay-job.yaml").read_text())
             if d]
    assert path_problems([job["spec"]["entrypoint"].split()]) == []
    assert path_problems([["python", "/home/ray/multimix/ray_jobs/missing.py"]])


def test_every_job_command_parses_and_its_settings_load():
    commands = cc.guide_commands(GUIDE)
    jobs = [c for c in commands if _job_argv(c)]
    assert {Path(_job_argv(c)[0]).stem for c in jobs} == {"prepare", "train", "tune", "evaluate"}
    assert entrypoint_problems(commands) == []
    assert entrypoint_problems([["python", "ray_jobs/train.py", "--evaluation-set"]])
    assert entrypoint_problems([["python", "ray_jobs/train.py", "--set", "scaling.gpus=1"]])


def test_every_ray_command_parses():
    commands = cc.guide_commands(GUIDE)
    assert {" ".join(c[:3]) for c in commands if c[:2] == ["ray", "job"]} >= {
        "ray job submit", "ray job logs", "ray job stop", "ray job list"}
    assert ray_cli_problems(commands) == []
    assert ray_cli_problems([["ray", "job", "logs", "--tail", "x"]])


def _code_spans(markdown: str) -> list[str]:
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", markdown, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", text)


def _code_strings() -> set[str]:
    out = set()
    for f in (REPO / "multimix").rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                out.add(n.value)
    return out


FILE = re.compile(r"[\w.*<>{}-]+\.(?:json|csv|md|yaml|pt|parquet|png)\b")


def promised_file_problems(markdown: str) -> list[str]:
    """Every file name in the guide's text is a file of the repository or a name the code
    writes (a string constant in multimix/, as in `storage.join(run_dir, "history.json")`)."""
    strings = _code_strings()
    out = []
    for span in _code_spans(markdown):
        for name in FILE.findall(cc.expand_placeholders(span)):
            base = name.rsplit("/", 1)[-1]
            if re.search(r"[*<>{}]", base) or (REPO / name).exists():
                continue
            if any((REPO / "cluster").rglob(base)):  # a recipe, named by its file name
                continue
            if "/" in span and (REPO / span).exists():
                continue
            if not any(s == base or s.endswith("/" + base) for s in strings):
                out.append(f"`{span}`: nothing in multimix/ writes {base}")
    return out


def test_every_result_file_the_guide_promises_is_written_by_the_code():
    assert promised_file_problems(GUIDE.read_text()) == []


def test_the_old_guide_is_caught():
    problems = promised_file_problems((BAD / "README.md").read_text())
    assert any("tune_results.json" in p for p in problems), problems


def test_the_search_folder_is_where_tune_writes():
    """The guide's Results table names the folder of a search; `multimix tune` computes it."""
    from multimix.cli import build_parser
    from multimix.config import load_config
    from multimix.tune import experiment_uri

    [tune_cmd] = [c for c in cc.guide_commands(GUIDE)
                  if _job_argv(c) and _job_argv(c)[0].endswith("tune.py")]
    args = build_parser("tune").parse_args(["tune", *_job_argv(tune_cmd)[1:]])
    cfg = load_config(args.config, args.set)
    rows = [r for r in GUIDE.read_text().splitlines() if r.startswith("|") and "results.csv" in r]
    assert len(rows) == 1
    where = cc.expand_placeholders(re.findall(r"`([^`]+)`", rows[0])[0])
    assert where.replace("<run.name>", cfg.run.name).rstrip("/") == experiment_uri(cfg).rstrip("/")


@pytest.mark.parametrize("span", ["`s3://x/<run.name>-tune/tune_results.json`"])
def test_a_made_up_result_file_is_caught(span):
    assert promised_file_problems(span)
