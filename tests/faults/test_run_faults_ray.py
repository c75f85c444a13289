"""Faults of a running ``multimix train``, as a user meets them (the CLI in a subprocess, a local
Ray each): Ctrl-C says where it stopped and the rerun resumes; a second command into the running
run's directory is refused; a full disk mid-checkpoint and an S3 server that goes away mid-run
end in one line, last, with no traceback on the console and no truncated checkpoint left."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import _stop, start_s3_server
from multimix.data.prepare import prepare_demo

pytestmark = pytest.mark.slow

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-demo")
    prepare_demo(str(root), n_cls=60, n_seg=16, image_size=SIZE)
    return root


def _argv(cls: str, seg: str, storage_path: str, *extra: str) -> list[str]:
    out = [sys.executable, "-m", "multimix.cli", "train", "-c", "cpu-small"]
    for s in (f"data.image_size={SIZE}", f"data.cls_data={cls}", f"data.seg_data={seg}",
              "data.cls_labeled=20", "data.seg_labeled=4", "optim.epochs=2",
              f"run.storage_path={storage_path}", "run.name=r", *extra):
        out += ["-s", s]
    return out


class Run:
    """A ``multimix train`` subprocess whose output lines are read as they come."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        while True:
            line = self._q.get(timeout=10)
            if line is None:
                return rc
            self.lines.append(line)


def _descendants(pid: int) -> set:
    """Every process started (directly or not) by ``pid`` (from /proc; other tests' Rays are
    not counted)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.update(kids)
        todo.extend(kids)
    return out


def _alive(pids: set) -> set:
    """Those of ``pids`` still running (zombies count as gone)."""
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.add(p)
    return out


def _whole_checkpoints(run: Path) -> list[str]:
    """Every checkpoint.pt under ``run`` loads (sha256s match); returns the folders."""
    from multimix import checkpoint

    names = []
    for f in sorted(run.glob("checkpoint_epoch-*/checkpoint.pt")):
        checkpoint.load_bytes(f.read_bytes(), name=str(f))
        names.append(f.parent.name)
    return names


@pytest.fixture
def small_disk(tmp_path):
    """``(folder, True)``: a 9 MiB tmpfs, where one checkpoint of cpu-small (6 MB) fits and a
    second does not; ``(folder, False)`` on a machine that cannot mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        yield mnt, False
        return
    try:
        yield mnt, True
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def another_ray():
    """A second Ray on the machine while the test runs (a shared workstation)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, ray\nray.init(address='local', num_cpus=1, "
         "include_dashboard=False)\nprint('up', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    try:
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_ctrl_c_a_second_writer_the_resume_and_a_full_disk(demo, small_disk, another_ray):
    """One run directory on a small disk, another Ray running on the machine. The first run
    (--verbose: Ray's own lines shown) is unambiguous about its Ray; a second command into its
    directory is refused; Ctrl-C says where it stopped (exit 130, its Ray gone). The rerun
    (quiet) resumes after epoch 1 in a few lines, and its epoch-2 checkpoint no longer fits:
    one line, exit 2, no partial file, the first run's best checkpoint whole."""
    disk, small = small_disk
    argv = _argv(str(demo / "cls"), str(demo / "seg"), str(disk), "optim.steps_per_epoch=40",
                 "run.tensorboard=false")
    first = Run(argv + ["--verbose"])
    first.wait_for(r"^epoch 1/2 ")
    started = _descendants(first.proc.pid)  # its local Ray: GCS, raylet, workers, ...
    assert started
    # a second command into the same run directory: refused at once, naming the holder
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"multimix train: error: {disk / 'r'} is being written by multimix train (host ")
    assert f"pid {first.proc.pid}," in second.stderr
    first.proc.send_signal(signal.SIGINT)
    assert first.finish() == 130
    assert re.fullmatch(r"multimix train: interrupted (at epoch 2 step \d+/40|after epoch 1); "
                        r"rerun the same command to resume from epoch 2", first.lines[-1])
    assert any("(TrainController" in line for line in first.lines)  # --verbose: Ray's lines
    assert not any("multiple active Ray instances" in line for line in first.lines)
    deadline = time.time() + 30
    while _alive(started) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(started), "the interrupted run left its Ray running"
    assert not (disk / "r" / "lease.json").exists()
    # the rerun resumes after epoch 1
    again = Run(argv)
    rc = again.finish()
    assert any(re.search(r"resumed after epoch 1 ", line) for line in again.lines), again.lines
    assert not any("Traceback" in line or "(TrainController" in line
                   or "Reporting training result" in line for line in again.lines), again.lines
    assert len(again.lines) <= 40, again.lines
    run = disk / "r"
    if not small:  # no tmpfs here: the resumed run finishes
        assert rc == 0 and [h["epoch"] for h in json.loads(
            (run / "history.json").read_text())] == [0, 1]
        return
    assert rc == 2, again.lines
    assert re.fullmatch(rf"multimix train: error: training failed: {disk}\S*: no space left "
                        r"on device \(disk full\) \(full traceback: \S+\)", again.lines[-1])
    whole = _whole_checkpoints(run)  # raises on a truncated file
    best = json.loads((run / "best.json").read_text())["checkpoint"]
    assert whole == [best] == ["checkpoint_epoch-0000"]


def test_an_s3_server_lost_mid_run_is_one_line(demo, tmp_path):
    server, proc, log = start_s3_server(tmp_path / "s3")
    try:
        server.make_bucket("faults")
        st = [f"storage.endpoint={server.endpoint}"]
        env = {"AWS_ACCESS_KEY_ID": server.access_key,
               "AWS_SECRET_ACCESS_KEY": server.secret_key}
        client = server.client()
        for f in demo.rglob("*"):  # the prepared sets, as they are
            if f.is_file():
                client.upload_file(str(f), "faults", f"data/{f.relative_to(demo)}")
        run = Run(_argv("s3://faults/data/cls", "s3://faults/data/seg", "s3://faults/runs",
                        "optim.steps_per_epoch=40", *st), env=env)
        run.wait_for(r"^epoch 1/2 ")
        _stop(proc)  # mid-epoch 2, after the first checkpoint
        rc = run.finish(timeout=600)
    finally:
        _stop(proc)
        log.close()
    assert rc == 2, run.lines
    assert re.fullmatch(rf"multimix train: error: training failed: cannot reach the S3 "
                        rf"endpoint {server.endpoint} for s3://faults/\S+: check "
                        r"storage.endpoint / AWS_ENDPOINT_URL and the network "
                        r"\(full traceback: \S+\)", run.lines[-1]), run.lines[-1]
    assert not any("Traceback" in line for line in run.lines), run.lines
