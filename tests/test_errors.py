"""The one line that ends a failed command (and a failed `ray job submit`): Ray's wrappers around
a user error are peeled off; any other error keeps its traceback above that line."""

from __future__ import annotations

import pytest

from multimix import cli
from multimix.errors import StorageError, UserError, one_line, root_cause


def _raised(exc):
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001
        return e


def test_root_cause_unwraps_train_and_task_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    inner = StorageError("access denied to s3://b/runs: check the S3 credentials")
    task = RayTaskError("train_fn", "Traceback (most recent call last):\n  ...", inner)
    wrapped = task.as_instanceof_cause()
    assert isinstance(wrapped, StorageError) and "pid=" in str(wrapped)  # Ray's long text
    group = WorkerGroupError("rank 1 failed\nTraceback ...", {1: wrapped, 0: ValueError("x")})
    assert isinstance(root_cause(group), ValueError)  # lowest failing rank first
    group = WorkerGroupError("rank 1 failed\nTraceback ...", {1: wrapped})
    assert root_cause(group) is inner
    assert one_line(ControllerError(group)) == str(inner)
    assert one_line(_raised(RuntimeError("boom\nmore"))) == "RuntimeError: boom"


def test_cli_prints_one_line_last(monkeypatch, capsys):
    from ray.train import WorkerGroupError

    def fail_user(args):
        raise WorkerGroupError("Traceback ...", {0: StorageError("bucket 'x' does not exist")})

    def fail_bug(args):
        raise KeyError("oops")

    mod = pytest.importorskip("multimix.evaluate")
    for fn, rc, last in ((fail_user, 2, "multimix evaluate: error: bucket 'x' does not exist"),
                         (fail_bug, 1, "multimix evaluate: error: KeyError: 'oops'")):
        monkeypatch.setattr(mod, "run", fn)
        assert cli.main(["evaluate", "--checkpoint", "c", "--cls-data", "d"]) == rc
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == last
        assert ("Traceback" in "\n".join(err[:-1])) == (rc == 1)
    assert issubclass(StorageError, UserError)

