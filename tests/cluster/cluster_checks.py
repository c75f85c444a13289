"""Evaluators for the cluster recipes: what a Dockerfile's instructions expand to under Docker's
ARG/ENV scoping, what an IAM policy allows, which commands a Markdown guide runs, and what a
Kubernetes node can hold. The tests in this folder apply them to ``cluster/`` and to copies of
known-bad recipes (``bad_recipes/``), so each check is shown to catch the defect it is for."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Dockerfile: instructions and variable scoping
#
# The rules (Docker's Dockerfile reference, "Understand how ARG and FROM interact" and "Scope";
# the same in BuildKit and Buildah):
# - an ARG before the first FROM is global: it can be used in FROM lines only;
# - a stage sees an ARG from its declaration to the end of the stage; `ARG NAME` without a value
#   inside a stage takes the global default of NAME, if there is one;
# - ENV sets a variable for the following instructions of the stage (and overrides an ARG);
# - RUN in shell form runs `/bin/sh -c` with the stage's ARGs and ENVs in its environment, so the
#   shell expands them (not inside single quotes); RUN in exec form expands nothing;
# - ADD, COPY, ENV, EXPOSE, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR are expanded by the builder.
# A variable that is not in scope expands to the empty string: no error, a wrong image.

#: always set in a build stage's environment without a declaration (Docker: predefined proxy ARGs
#: are passed to RUN; PATH and HOME come from every base image)
PREDEFINED = {"HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY",
              "http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy", "PATH", "HOME"}
BUILDER_EXPANDS = {"ADD", "COPY", "ENV", "EXPOSE", "LABEL", "STOPSIGNAL", "USER", "VOLUME",
                   "WORKDIR", "FROM", "ARG"}
_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<mod>:[-+][^}]*)?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Instruction:
    keyword: str
    raw: str                      # the arguments as written (continuations joined)
    text: str                     # the arguments after expansion in the stage's scope
    unresolved: list[str] = field(default_factory=list)  # referenced, but not in scope


@dataclass
class Stage:
    base: str                     # the FROM image, expanded
    instructions: list[Instruction]

    def runs(self) -> list[str]:
        return [i.text for i in self.instructions if i.keyword == "RUN"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # a comment line inside a continuation
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    if buf:
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _expand(text: str, scope: dict[str, str], *, shell: bool,
            keep: frozenset[str] = frozenset()) -> tuple[str, list[str]]:
    """Expand ``$X``/``${X}``/``${X:-w}``/``${X:+w}`` from ``scope``; with ``shell`` nothing
    inside single quotes is expanded (as /bin/sh does), and names in ``keep`` (set by the
    command itself) stay as written. Returns (text, names not in scope)."""
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("braced") or m.group("bare")
        mod = m.group("mod")
        if name in keep and name not in scope:
            return m.group(0)
        value = scope.get(name)
        if mod and mod.startswith(":-"):
            return value if value else mod[2:]
        if mod and mod.startswith(":+"):
            return mod[2:] if value else ""
        if name not in scope and name not in PREDEFINED:
            missing.append(name)
        return value or ""

    if not shell:
        return _VAR.sub(sub, text), missing
    parts, quote, i, start = [], None, 0, 0
    while i < len(text):  # split into single-quoted (literal) and other segments
        c = text[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if c == "'" and quote is None:
            parts.append((text[start:i], True))
            start, quote = i, "'"
        elif c == "'" and quote == "'":
            parts.append((text[start:i + 1], False))
            start, quote = i + 1, None
        elif c == '"' and quote is None:
            quote = '"'
        elif c == '"' and quote == '"':
            quote = None
        i += 1
    parts.append((text[start:], quote != "'"))
    return "".join(_VAR.sub(sub, s) if expand else s for s, expand in parts), missing


def _shell_assigned(command: str) -> set[str]:
    """Names a shell command sets itself (``X=...``, ``for X in``, ``read X``, ``export X=``)."""
    return set(re.findall(r"(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_]\w*)=", command)) | set(
        re.findall(r"\bfor\s+([A-Za-z_]\w*)\s+in\b", command)) | set(
        re.findall(r"\bread\s+(?:-\w+\s+)*([A-Za-z_]\w*)", command))


def _declarations(args: str) -> list[tuple[str, str | None]]:
    """``ARG A=1 B`` / ``ENV A=1 B=2`` / legacy ``ENV A 1`` -> [(name, value or None)]."""
    if "=" not in args.split(" ", 1)[0] and " " in args:  # legacy `ENV NAME value`
        name, value = args.split(" ", 1)
        return [(name, value.strip())]
    out = []
    for tok in shlex.split(args):
        name, eq, value = tok.partition("=")
        out.append((name, value if eq else None))
    return out


def evaluate_dockerfile(path: Path) -> list[Stage]:
    """Every stage of the Dockerfile at ``path`` with its instructions expanded as a build with
    the ARG defaults (no --build-arg) would expand them."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    scope: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(path.read_text()):
        if keyword == "FROM":
            image_args = [a for a in args.split() if not a.startswith("--")]
            base, missing = _expand(image_args[0], global_args, shell=False)
            scope = {}
            stages.append(Stage(base, [Instruction("FROM", args, base, missing)]))
            continue
        if not stages:
            if keyword == "ARG":
                for name, value in _declarations(args):
                    if value is not None:
                        value, _ = _expand(value, global_args, shell=False)
                    global_args[name] = value or ""
            continue
        stage = stages[-1]
        if keyword == "ARG":
            for name, value in _declarations(args):
                if value is None:
                    if name in global_args:
                        scope[name] = global_args[name]
                    else:
                        scope.setdefault(name, "")
                else:
                    scope[name], _ = _expand(value, scope, shell=False)
            stage.instructions.append(Instruction(keyword, args, args))
        elif keyword == "ENV":
            decls = _declarations(args)
            missing = []
            for name, value in decls:
                value, miss = _expand(value or "", scope, shell=False)
                missing += miss
                scope[name] = value
            stage.instructions.append(Instruction(keyword, args, args, missing))
        elif keyword == "RUN":
            body = args
            while body.startswith("--"):  # RUN --mount=... --network=...
                body = body.split(" ", 1)[1].lstrip()
            if body.startswith("["):  # exec form: no shell, no expansion
                stage.instructions.append(Instruction(keyword, args, " ".join(json.loads(body))))
                continue
            own = frozenset(_shell_assigned(body))
            text, missing = _expand(body, scope, shell=True, keep=own)
            stage.instructions.append(Instruction(keyword, args, text, missing))
        elif keyword in BUILDER_EXPANDS:
            text, missing = _expand(args, scope, shell=False)
            stage.instructions.append(Instruction(keyword, args, text, missing))
        else:
            stage.instructions.append(Instruction(keyword, args, args))
    return stages


def _empty_in_scope(path: Path) -> list[tuple[str, str]]:
    """(instruction, variable) where a variable in scope has no value (``ARG X`` inside a stage
    with neither a value nor a global default): it expands to the empty string."""
    out = []
    global_args: dict[str, str | None] = {}
    scope: dict[str, str | None] = {}
    in_stage = False
    for keyword, args in dockerfile_instructions(path.read_text()):
        if keyword == "FROM":
            in_stage, scope = True, {}
            continue
        if keyword == "ARG":
            for name, value in _declarations(args):
                if not in_stage:
                    global_args[name] = value
                else:
                    scope[name] = value if value is not None else global_args.get(name)
        elif keyword == "ENV" and in_stage:
            for name, value in _declarations(args):
                scope[name] = value
        elif in_stage:
            for m in _VAR.finditer(args):
                name = m.group("braced") or m.group("bare")
                if name in scope and not scope[name] and not m.group("mod"):
                    out.append((f"{keyword} {args}", name))
    return out


def unresolved_variables(path: Path) -> list[tuple[str, str]]:
    """(instruction, variable) for every variable a stage uses without a value there: not
    declared in the stage (a global ARG is not enough), or declared with no value at all."""
    out = []
    for stage in evaluate_dockerfile(path):
        for ins in stage.instructions:
            out += [(f"{ins.keyword} {ins.raw}", name) for name in ins.unresolved]
    return out + _empty_in_scope(path)


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell command line, each as the shell splits its words
    (quotes removed; ``&&``, ``||``, ``;``, ``|``, ``&`` separate commands; ``#`` comments)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: list[list[str]] = []
    words: list[str] = []
    for tok in lexer:
        if tok and set(tok) <= set(";&|"):
            if words:
                out.append(words)
            words = []
        else:
            words.append(tok)
    if words:
        out.append(words)
    return out


def pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` (also ``python -m pip install``) in a shell
    command line, after the shell's word splitting and quote removal."""
    out = []
    for words in split_commands(command):
        for i, w in enumerate(words):
            if w in ("pip", "pip3") or w.endswith("/pip"):
                rest = words[i + 1:]
            elif w == "-m" and i + 1 < len(words) and words[i + 1] == "pip":
                rest = words[i + 2:]
            else:
                continue
            if rest[:1] == ["install"]:
                out.append(rest[1:])
            break
    return out


#: pip options that take a value (the value is not a requirement)
PIP_VALUE_OPTIONS = {"--index-url", "-i", "--extra-index-url", "-f", "--find-links", "-c",
                     "--constraint", "-r", "--requirement", "--target", "-t", "--prefix",
                     "--root", "--platform", "--python-version", "--src", "--upgrade-strategy"}


def pip_requirements(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(requirement strings and local paths, {option: value}) of one ``pip install``."""
    reqs, opts, skip = [], {}, None
    for a in args:
        if skip:
            opts[skip] = a
            skip = None
        elif a in PIP_VALUE_OPTIONS:
            skip = a
        elif a.startswith("--") and "=" in a:
            k, _, v = a.partition("=")
            opts[k] = v
        elif a.startswith("-"):
            opts[a] = ""
        else:
            reqs.append(a)
    return reqs, opts


def python_c_code(command: str) -> list[str]:
    """The ``python -c CODE`` programs in a shell command line."""
    return [words[i + 2] for words in split_commands(command)
            for i, w in enumerate(words[:-2])
            if re.fullmatch(r"python(3(\.\d+)?)?", w) and words[i + 1] == "-c"]


# ---------------------------------------------------------------------------------------------
# IAM policies
#
# AWS's evaluation, reduced to what the recipes use: a request is allowed when some Allow
# statement matches its action (``*`` and ``?`` wildcards, case-insensitive) and its resource
# (wildcards, case-sensitive) and no Deny statement matches. Conditions are not evaluated: a
# statement with a Condition counts as not matching (it could refuse the request).


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def _action_matches(pattern: str, action: str) -> bool:
    return fnmatch.fnmatchcase(action.lower(), pattern.lower())


def _resource_matches(pattern: str, resource: str) -> bool:
    return fnmatch.fnmatchcase(resource, pattern)


def check_policy_document(doc: dict) -> None:
    """Raise ValueError unless ``doc`` is an IAM identity policy that AWS would accept in the
    parts the grammar defines (Version 2012-10-17, Statement list, Effect, Action, Resource)."""
    if doc.get("Version") != "2012-10-17":
        raise ValueError("Version must be 2012-10-17 (the older version has no policy variables)")
    statements = _as_list(doc.get("Statement"))
    if not statements or not all(isinstance(s, dict) for s in statements):
        raise ValueError("Statement must be a non-empty list of objects")
    sids = [s["Sid"] for s in statements if "Sid" in s]
    if len(sids) != len(set(sids)):
        raise ValueError("Sid values must be unique")
    allowed = {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}
    for s in statements:
        if set(s) - allowed:
            raise ValueError(f"unknown statement keys {sorted(set(s) - allowed)}")
        if "Principal" in s:
            raise ValueError("an identity policy has no Principal")
        if s.get("Effect") not in ("Allow", "Deny"):
            raise ValueError(f"Effect must be Allow or Deny, got {s.get('Effect')!r}")
        if ("Action" in s) == ("NotAction" in s):
            raise ValueError("exactly one of Action / NotAction")
        if ("Resource" in s) == ("NotResource" in s):
            raise ValueError("exactly one of Resource / NotResource")
        for a in _as_list(s.get("Action", s.get("NotAction"))):
            if a != "*" and not re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9*?]+", a):
                raise ValueError(f"malformed action {a!r}")
        for r in _as_list(s.get("Resource", s.get("NotResource"))):
            if r != "*" and not r.startswith("arn:"):
                raise ValueError(f"malformed resource {r!r}")
    if len(json.dumps(doc, separators=(",", ":"))) > 6144:
        raise ValueError("longer than an inline role policy may be (6,144 characters)")


def _statement_matches(s: dict, action: str, resource: str) -> bool:
    if "Action" in s:
        ok = any(_action_matches(p, action) for p in _as_list(s["Action"]))
    else:
        ok = not any(_action_matches(p, action) for p in _as_list(s["NotAction"]))
    if "Resource" in s:
        ok = ok and any(_resource_matches(p, resource) for p in _as_list(s["Resource"]))
    else:
        ok = ok and not any(_resource_matches(p, resource) for p in _as_list(s["NotResource"]))
    return ok


def allows(policies: list[dict], action: str, resource: str = "*") -> bool:
    """Whether the union of ``policies`` (those attached to one role) allows ``action`` on
    ``resource``. ``resource="*"`` asks for an action that takes no resource ARN."""
    statements = [s for p in policies for s in _as_list(p["Statement"])]
    if any(s["Effect"] == "Deny" and _statement_matches(s, action, resource)
           for s in statements):
        return False
    return any(s["Effect"] == "Allow" and "Condition" not in s
               and _statement_matches(s, action, resource) for s in statements)


# ---------------------------------------------------------------------------------------------
# The guide's commands


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash / ```sh / ```shell blocks of a Markdown file (also those
    indented inside a list item)."""
    return [textwrap.dedent(m.group(2)) for m in re.finditer(
        r"^([ \t]*)```(?:bash|sh|shell)\n(.*?)^\1```", markdown, re.M | re.S)]


def shell_commands(markdown: str) -> list[list[str]]:
    """Every simple command of the guide's shell blocks as the shell would split it: comments
    dropped, continuations joined, ``&&``/``;``/``|`` separating commands."""
    return [words for block in shell_blocks(markdown)
            for line in re.sub(r"\\\n", " ", block).splitlines()
            for words in split_commands(line)]


def option_values(words: list[str], option: str) -> list[str]:
    """Every value of ``option`` (``--opt v`` or ``--opt=v``) in one command."""
    out = []
    for i, w in enumerate(words):
        if w == option and i + 1 < len(words):
            out.append(words[i + 1])
        elif w.startswith(option + "="):
            out.append(w.split("=", 1)[1])
    return out


# ---------------------------------------------------------------------------------------------
# Kubernetes: what a node can hold


def cpu_millis(q) -> int:
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


_MEM = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
        "G": 10**9, "T": 10**12}


def mem_bytes(q) -> int:
    q = str(q)
    for suffix in sorted(_MEM, key=len, reverse=True):
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * _MEM[suffix])
    return int(q)


def eks_kube_reserved_cpu_millis(vcpus: int) -> int:
    """kube-reserved CPU of the EKS-optimized AMIs (AL2023 nodeadm, the same as AL2's
    bootstrap.sh): 6 % of the first core, 1 % of the second, 0.5 % of cores 3-4, 0.25 % of the
    rest."""
    ranges = [(1, 60), (1, 10), (2, 5), (max(vcpus - 4, 0), 2.5)]
    total, left = 0.0, vcpus
    for cores, m in ranges:
        n = min(cores, left)
        total += n * m
        left -= n
    return int(round(total))


def eks_allocatable(shape: dict) -> dict:
    """A node's allocatable under the EKS-optimized AMI's kubelet settings: kube-reserved CPU
    (above), kube-reserved memory 255 MiB + 11 MiB per pod the node may run, the 100 MiB
    hard-eviction threshold; memory capacity is the instance's less ``os_reserved_fraction``
    (firmware and kernel: the kubelet sees less than the instance type's nominal memory)."""
    mem = shape["memory_gib"] * 2**30 * (1 - shape.get("os_reserved_fraction", 0.05))
    mem -= (255 + 11 * shape["max_pods"]) * 2**20 + 100 * 2**20
    return {"cpu": shape["vcpus"] * 1000 - eks_kube_reserved_cpu_millis(shape["vcpus"]),
            "memory": int(mem), "nvidia.com/gpu": shape.get("gpus", 0)}


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    for t in tolerations or []:
        if t.get("effect") not in (None, "", taint["effect"]):
            continue
        if t.get("operator", "Equal") == "Exists":
            if t.get("key") in (None, "", taint["key"]):
                return True
        elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


#: the values the recipes carry where a user puts their own (cluster/README.md, step 0, rewrites
#: them in the files; its commands use these variables)
PLACEHOLDERS = {"ACCOUNT": "123456789012", "BUCKET": "my-bucket", "AWS_REGION": "us-east-1"}


def expand_placeholders(word: str) -> str:
    for name, value in PLACEHOLDERS.items():
        word = word.replace("${" + name + "}", value).replace("$" + name, value)
    return word


def guide_commands(path: Path) -> list[list[str]]:
    """The commands of a Markdown guide with the placeholder variables expanded."""
    return [[expand_placeholders(w) for w in words] for words in shell_commands(path.read_text())]
