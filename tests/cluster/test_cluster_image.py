"""The image builds as written: every variable a build stage uses has a value there under
Docker's ARG scoping, and the pip commands it runs are valid, pinned requirements of the
versions the project is tested with. Checked two ways: by evaluating the Dockerfile's scoping
(cluster_checks.evaluate_dockerfile, always) and by a real Buildah build on a stand-in base
image whose `pip` and `python` record their arguments (where buildah and a static busybox are
installed: the real base image cannot be pulled offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement

import cluster_checks as cc

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "cluster" / "Dockerfile"
BAD = Path(__file__).with_name("bad_recipes")


def _ray_version() -> str:
    import ray

    return ray.__version__


def _make_torch() -> str:
    m = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    return m.group(1)


def install_problems(pip_calls: list[list[str]], python_codes: list[str]) -> list[str]:
    """What is wrong with the image's installs: each requirement must parse (pip refuses what
    `packaging` refuses) and be pinned with ==; ray must be the Ray the project is tested with,
    torch the Makefile's version from PyTorch's cu128 index; the image's own version check must
    pass for what pip installs."""
    problems, pins = [], {}
    for args in pip_calls:
        reqs, opts = cc.pip_requirements(args)
        for r in reqs:
            if r == ".":
                continue
            try:
                req = Requirement(r)
            except InvalidRequirement as exc:
                problems.append(f"pip install {r!r}: not a valid requirement ({exc})")
                continue
            spec = [s for s in req.specifier if s.operator == "=="]
            if not spec:
                problems.append(f"pip install {r!r}: not pinned with ==")
                continue
            pins[req.name] = (spec[0].version, opts.get("--index-url"))
    if pins.get("ray", (None,))[0] != _ray_version():
        problems.append(f"ray pinned to {pins.get('ray')}, the project runs {_ray_version()}")
    if pins.get("torch") != (_make_torch(), "https://download.pytorch.org/whl/cu128"):
        problems.append(f"torch pinned to {pins.get('torch')}, want {_make_torch()} from cu128")
    for code in python_codes:
        # run the image's check against what pip installs: stand-in modules with those versions
        stub = ("import sys, types\n"
                "for n in ('multimix', 'torch', 'ray'):\n"
                "    sys.modules[n] = types.ModuleType(n)\n"
                f"sys.modules['ray'].__version__ = {pins.get('ray', ('',))[0]!r}\n"
                f"sys.modules['torch'].__version__ = {pins.get('torch', ('',))[0]!r}\n")
        done = subprocess.run([sys.executable, "-c", stub + code], capture_output=True, text=True)
        if done.returncode:
            problems.append(f"python -c {code!r} fails: {done.stderr.strip().splitlines()[-1]}")
    return problems


def dockerfile_problems(path: Path) -> list[str]:
    stages = cc.evaluate_dockerfile(path)
    problems = [f"{ins}: ${var} has no value in this stage"
                for ins, var in cc.unresolved_variables(path)]
    runs = [r for s in stages for r in s.runs()]
    problems += install_problems([a for r in runs for a in cc.pip_installs(r)],
                                 [c for r in runs for c in cc.python_c_code(r)])
    if stages[0].base != f"rayproject/ray:{_ray_version()}-py311-gpu":
        problems.append(f"base image {stages[0].base}")
    return problems


def test_every_variable_a_stage_uses_has_a_value_and_the_installs_are_valid():
    assert dockerfile_problems(DOCKERFILE) == []


def test_the_scoping_check_catches_an_arg_declared_only_before_from():
    problems = dockerfile_problems(BAD / "Dockerfile")
    assert any("$RAY_VERSION has no value" in p for p in problems), problems
    assert any("'ray[default,train,tune,data]=='" in p and "not a valid" in p for p in problems)
    assert any(p.startswith("ray pinned to None") for p in problems), problems


def test_the_scoping_rules(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("ARG A=1\nARG B=2\nFROM img:${A}\nARG B\nARG C\nENV D=${B}x\n"
                 "RUN echo $A ${B} $D '$B' && for i in 1; do echo $i; done\nRUN echo ${C:-dflt}\n"
                 "RUN echo $C\n")
    stages = cc.evaluate_dockerfile(f)
    assert stages[0].base == "img:1"
    assert stages[0].runs() == ["echo  2 2x '$B' && for i in 1; do echo $i; done",
                                "echo dflt", "echo "]
    assert sorted(v for _, v in cc.unresolved_variables(f)) == ["A", "C"]


def test_the_build_context_is_only_what_the_image_copies():
    text = DOCKERFILE.read_text()
    copied = [w for k, a in cc.dockerfile_instructions(text) if k == "COPY"
              for w in a.split()[:-1] if not w.startswith("--")]
    assert copied == ["pyproject.toml", "README.md", "multimix", "ray_jobs"]
    ignore = [ln.strip() for ln in (REPO / "cluster" / "Dockerfile.dockerignore").read_text()
              .splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"  # everything out, then only the copied paths back in
    assert set(ignore[1:5]) == {"!pyproject.toml", "!README.md", "!multimix/**", "!ray_jobs/**"}


# ---------------------------------------------------------------------------------------------
# a real build

BUSYBOX = Path("/bin/busybox")
STANDIN = '#!/bin/sh\necho "standin-{0}-begin"\nfor a in "$@"; do printf "standin-{0}-arg:%s\\n" "$a"; done\necho "standin-{0}-end"\n'  # noqa: E501


def _static(path: Path) -> bool:
    if not path.exists():
        return False
    out = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True).stdout
    return "statically linked" in out or "static-pie" in out


def _buildah_build(tmp: Path, dockerfile: Path) -> tuple[str, list[str]]:
    """Build ``dockerfile`` with the repository as context on a stand-in for the base image;
    return (build log, the files under /home/ray/multimix in the image)."""
    root = tmp / "base" / "rootfs"
    for d in ("bin", "etc", "home/ray", "usr/local/bin", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nray:x:1000:100::/home/ray:"
                                         "/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nusers:x:100:\n")
    for tool in ("pip", "python"):
        (root / "usr" / "local" / "bin" / tool).write_text(STANDIN.format(tool))
        (root / "usr" / "local" / "bin" / tool).chmod(0o755)
    (tmp / "base" / "Containerfile").write_text(
        'FROM scratch\nCOPY rootfs/ /\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n')
    buildah = ["buildah", "--root", str(tmp / "store"), "--runroot", str(tmp / "run"),
               "--storage-driver", "vfs"]
    base_tag = f"docker.io/rayproject/ray:{_ray_version()}-py311-gpu"

    def run(*args, cwd=None):
        done = subprocess.run(buildah + list(args), cwd=cwd, capture_output=True, text=True,
                              timeout=300)
        return done.returncode, done.stdout + done.stderr

    rc, log = run("bud", "--isolation", "chroot", "-q", "-t", base_tag, str(tmp / "base"))
    if rc:
        pytest.skip(f"buildah cannot build here: {log.strip().splitlines()[-1]}")
    rc, log = run("bud", "--isolation", "chroot", "--pull=never", "--ignorefile",
                  str(REPO / "cluster" / "Dockerfile.dockerignore"), "-f", str(dockerfile),
                  "-t", "localhost/multimix-standin", str(REPO))
    assert rc == 0, log
    rc, files = run("run", "--isolation", "chroot",
                    run("from", "localhost/multimix-standin")[1].strip().splitlines()[-1],
                    "find", "/home/ray/multimix", "-maxdepth", "1")
    assert rc == 0, files
    return log, sorted(files.split())


def _recorded(log: str, tool: str) -> list[list[str]]:
    calls, cur = [], None
    for line in log.splitlines():
        if line == f"standin-{tool}-begin":
            cur = []
        elif line == f"standin-{tool}-end":
            calls.append(cur)
            cur = None
        elif cur is not None and line.startswith(f"standin-{tool}-arg:"):
            cur.append(line.split(":", 1)[1])
    return calls


needs_buildah = pytest.mark.skipif(
    not (shutil.which("buildah") and _static(BUSYBOX)),
    reason="needs buildah and a static busybox (Debian: apt-get install buildah busybox-static)")


@needs_buildah
@pytest.mark.parametrize("dockerfile", [DOCKERFILE, BAD / "Dockerfile"], ids=["cluster", "bad"])
def test_a_real_build_runs_valid_installs(tmp_path, dockerfile):
    log, files = _buildah_build(tmp_path, dockerfile)
    pips = [c[1:] for c in _recorded(log, "pip") if c[:1] == ["install"]]
    codes = [c[1] for c in _recorded(log, "python") if c[:1] == ["-c"]]
    assert len(pips) == 2 and len(codes) == 1, log
    problems = install_problems(pips, codes)
    if dockerfile == DOCKERFILE:
        assert problems == []
        # the image holds the project and nothing else of the checkout (no .venv, no runs)
        assert files == ["/home/ray/multimix", "/home/ray/multimix/README.md",
                         "/home/ray/multimix/multimix", "/home/ray/multimix/pyproject.toml",
                         "/home/ray/multimix/ray_jobs"]
    else:
        assert any("not a valid requirement" in p for p in problems), problems
