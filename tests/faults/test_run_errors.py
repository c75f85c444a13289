"""Ray-free: a failure inside Ray becomes one line + a traceback file; the CLI
prints that line alone with the right exit code; Tune's wrappers keep it; the epoch summary
shows skipped rows."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from multimix import cli
from multimix.errors import DataError, RunFailed, is_user_error, one_line, root_cause
from multimix.train import ERROR_LOG, _SkippedRows, record_failure


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - give it a traceback
        return e


def _group(inner: BaseException):
    from ray.train import WorkerGroupError

    return WorkerGroupError("rank 0 failed\nTraceback ...", {0: _raised(inner)})


def test_worker_failure_recorded(tmp_path):
    disk = OSError(errno.ENOSPC, "No space left on device")
    run_dir = tmp_path / "runs" / "r1"
    failed = record_failure(_raised(_group(disk)), str(run_dir), None, "training")
    log = run_dir / ERROR_LOG
    # the same words (and exit code) as the driver's own storage errors
    assert str(failed) == (f"training failed: {run_dir}: no space left on device (disk full) "
                           f"(full traceback: {log})")
    assert failed.root is not None and failed.log_path == str(log)
    assert is_user_error(failed)
    text = log.read_text()
    assert text.splitlines()[0] == ("multimix training failed: OSError: [Errno 28] No space "
                                    "left on device")
    assert "--- worker rank 0 ---" in text and "Traceback" in text
    # a RunFailed pickles (a Tune trial raises it in its actor) and stays one line
    again = pickle.loads(pickle.dumps(failed))
    assert str(again) == str(failed) and again.log_path == failed.log_path


def test_unwritable_run_dir_logs_locally(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    failed = record_failure(_raised(_group(DataError("s3://b/kermany: gone"))),
                            str(blocker / "run"), None, "training")
    assert str(failed).startswith("training failed: s3://b/kermany: gone (full traceback: ")
    assert "multimix-error-" in failed.log_path
    with open(failed.log_path) as f:
        assert "DataError" in f.read()
    os.unlink(failed.log_path)
    assert is_user_error(failed)


def test_tune_trial_error_keeps_the_line():
    """Tune wraps a trial's exception (RayTaskError .cause, TuneError); the results table's
    reason (one_line) is the RunFailed line, not Ray's text."""
    from ray.exceptions import RayTaskError

    inner = RunFailed("training failed: bad data (full traceback: /r/error.log)",
                      DataError("bad data"), "/r/error.log")
    wrapped = RayTaskError("trial", "Traceback ...", _raised(inner))
    assert root_cause(wrapped) is not None
    assert one_line(wrapped) == "training failed: bad data (full traceback: /r/error.log)"
    assert is_user_error(wrapped)


@pytest.mark.parametrize("root, rc", [(DataError("stream unl_cls: empty"), 2),
                                      (OSError(errno.ENOSPC, "No space left on device"), 1)])
def test_cli_prints_the_line_alone(monkeypatch, capsys, root, rc):
    failed = RunFailed(f"training failed: {one_line(root)} (full traceback: /r/error.log)",
                       root, "/r/error.log")

    def run(args):
        raise failed from _raised(_group(root))

    monkeypatch.setattr(cli, "COMMANDS", {"train": ("multimix.train", "train")})
    monkeypatch.setattr("multimix.train.run", run)
    assert cli.main(["train"]) == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"multimix train: error: {failed}"]


def test_epoch_summary_shows_skipped_rows():
    assert _SkippedRows.summary({"skipped_rows": 0, "skipped_unl_cls": 0}) == "skipped_rows=0"
    assert _SkippedRows.summary({"skipped_rows": 7, "skipped_unl_cls": 4, "skipped_cls_val": 3,
                                 "skipped_cls_labeled": 0}) == (
        "skipped_rows=7 (cls_val=3 unl_cls=4)")


@pytest.mark.parametrize("text,where", [
    ("When reading information for key 'runs/r1/x.parquet' in bucket 'b': AWS Error "
     "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server",
     "s3://b/runs/r1/x.parquet"),
    ("When uploading part for key 'runs/r1/checkpoint_epoch-0001/checkpoint.pt' in bucket 'b':"
     " AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7, Couldn't connect "
     "to server", "s3://b/runs/r1/checkpoint_epoch-0001/checkpoint.pt"),
])
def test_s3_errors_inside_ray_read_as_the_drivers(tmp_path, text, where):
    """A pyarrow OSError from S3 raised in a data task or a Train worker (mid-epoch: a read;
    after a checkpoint: an upload) ends in the line the driver gives for an unreachable
    endpoint, and counts as the user's (exit 2), not as a crash."""
    from multimix.config import StorageConfig

    st = StorageConfig(endpoint="http://127.0.0.1:9")
    failed = record_failure(_raised(_group(OSError(text))), str(tmp_path / "r1"), st,
                            "training")
    assert str(failed).startswith(f"training failed: cannot reach the S3 endpoint "
                                  f"http://127.0.0.1:9 for {where}: check storage.endpoint")
    assert is_user_error(failed) and "\n" not in str(failed)


def test_an_os_error_that_is_not_storage_stays_as_it_is(tmp_path):
    failed = record_failure(_raised(_group(OSError(errno.EIO, "device error"))),
                            str(tmp_path / "r1"), None, "training")
    assert "OSError: [Errno 5] device error" in str(failed) and not is_user_error(failed)
