"""Ray-free: a run directory has one writer (its lease, on a local disk and on S3), a rerun
resumes only the same experiment, ``--restart`` says what it deletes, and an incomplete
checkpoint never outlives a failed run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from multimix import rundir
from multimix import train as T
from multimix.cli import main
from multimix.config import StorageConfig, load_config
from multimix.data import storage
from multimix.data.prepare import prepare_demo
from multimix.errors import UserError
from multimix.progress import Console, epoch_line

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rundir-demo")
    prepare_demo(str(root), n_cls=60, n_seg=16, image_size=SIZE)
    return root


def _args(demo: Path, runs: Path, *extra: str) -> list[str]:
    out = ["train", "-c", "cpu-small"]
    for s in (f"data.image_size={SIZE}", f"data.cls_data={demo / 'cls'}",
              f"data.seg_data={demo / 'seg'}", "data.cls_labeled=20", "data.seg_labeled=4",
              f"run.storage_path={runs}", "run.name=r", *extra):
        out += ["-s", s]
    return out


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a run gets as far as starting Ray."""
    def tripwire(cfg, **kw):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(T, "init_ray", tripwire)


def _s3(s3_server, bucket: str) -> StorageConfig:
    s3_server.client().create_bucket(Bucket=bucket)
    return StorageConfig(endpoint=s3_server.endpoint, access_key_id=s3_server.access_key,
                         secret_access_key=s3_server.secret_key)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """``(run_dir, storage config)`` on a local disk and on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "runs" / "r"), None
    s3 = request.getfixturevalue("s3_server")
    bucket = f"lease-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**8}"
    return f"s3://{bucket}/runs/r", _s3(s3, bucket)


def _held(uri: str, st) -> dict:
    return json.loads(storage.read_bytes(storage.join(uri, rundir.LEASE), st))


# ---------------------------------------------------------------------------------------------
# the lease


def test_a_second_writer_is_refused_naming_the_holder(where, capsys):
    run_dir, st = where
    first = rundir.Lease(run_dir, st, command="multimix train").acquire()
    try:
        held = _held(run_dir, st)
        assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(rundir.RunDirBusy, match=(
                rf"^{run_dir} is being written by multimix train \(host "
                rf"{socket.gethostname()}, pid {os.getpid()}, since .*; refreshed \d+ s ago\)")):
            rundir.Lease(run_dir, st, command="multimix train").acquire()
    finally:
        first.release()
    assert not storage.exists(storage.join(run_dir, rundir.LEASE), st)
    with rundir.Lease(run_dir, st):  # released: the next one takes it
        pass


def test_of_writers_starting_together_exactly_one_wins(where):
    run_dir, st = where
    start, results = threading.Barrier(6), []

    def one():
        lease = rundir.Lease(run_dir, st)
        start.wait()
        try:
            results.append(lease.acquire())
        except rundir.RunDirBusy as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, rundir.Lease)]
    assert len(won) == 1 and len(results) == 6
    assert _held(run_dir, st)["token"] == won[0].token
    won[0].release()


def test_a_dead_holders_lease_is_taken_over_with_a_line(where, capsys):
    run_dir, st = where
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    record = {"host": socket.gethostname(), "pid": dead.pid, "command": "multimix train",
              "started": "2026-01-01 00:00:00 UTC", "refreshed": time.time(), "token": "x"}
    storage.write_bytes(storage.join(run_dir, rundir.LEASE), json.dumps(record).encode(), st)
    with rundir.Lease(run_dir, st) as lease:
        assert _held(run_dir, st)["token"] == lease.token
    out = capsys.readouterr().out
    assert f"took over the stale lease of {run_dir} (its process {dead.pid} on " in out


def test_another_hosts_lease_is_stale_only_when_no_longer_refreshed(tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    record = {"host": "other-node", "pid": 1, "command": "multimix tune",
              "started": "2026-01-01 00:00:00 UTC", "refreshed": time.time() - 10, "token": "x"}
    storage.write_bytes(storage.join(run_dir, rundir.LEASE), json.dumps(record).encode())
    with pytest.raises(rundir.RunDirBusy, match="multimix tune \\(host other-node, pid 1"):
        rundir.Lease(run_dir).acquire()
    record["refreshed"] = time.time() - rundir.STALE_S - 5
    storage.write_bytes(storage.join(run_dir, rundir.LEASE), json.dumps(record).encode())
    rundir.Lease(run_dir).acquire().release()
    assert "not refreshed for 12" in capsys.readouterr().out


def test_the_lease_is_refreshed_while_held_and_a_takeover_is_noticed(tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    lease = rundir.Lease(run_dir, refresh_s=0.2).acquire()
    t0 = _held(run_dir, None)["refreshed"]
    time.sleep(0.8)
    assert _held(run_dir, None)["refreshed"] > t0
    # another process takes the lease over (as after a long stall): the holder notices
    record = dict(_held(run_dir, None), token="thief", pid=1)
    storage.write_bytes(storage.join(run_dir, rundir.LEASE), json.dumps(record).encode())
    time.sleep(0.8)
    assert lease.lost and "was taken over by another process" in capsys.readouterr().err
    lease.release()
    assert _held(run_dir, None)["token"] == "thief"  # not ours to delete


def test_train_into_a_held_run_directory_is_refused_before_ray(demo, tmp_path, no_ray, capsys):
    runs = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom multimix.rundir import Lease\n"
         f"Lease({str(runs / 'r')!r}, command='multimix train').acquire()\n"
         "print('held', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_args(demo, runs)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"multimix train: error: {runs / 'r'} is being written by multimix train (host "
            f"{socket.gethostname()}, pid {holder.pid}, since ")
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# the same experiment


def _fake_run(runs: Path, cfg_args: list[str], epochs: int = 1) -> Path:
    """A run directory as a finished run leaves it (config.json, history, last/best)."""
    cfg = load_config("cpu-small", [a for a in cfg_args if a != "-s"][3:])
    run = runs / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "history.json").write_text(json.dumps([{"epoch": e} for e in range(epochs)]))
    (run / "checkpoint_epoch-0000").mkdir()
    return run


def test_a_rerun_with_another_budget_is_refused_naming_the_key(demo, tmp_path, no_ray, capsys):
    runs = tmp_path / "runs"
    _fake_run(runs, _args(demo, runs))
    assert main(_args(demo, runs, "data.cls_labeled=50")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"multimix train: error: {runs / 'r'} holds a run of another experiment "
        "(data.cls_labeled differ: data.cls_labeled: 20 -> 50)")
    assert "--restart" in err[0]
    # the lease was given back
    assert not (runs / "r" / rundir.LEASE).exists()


def test_the_schedule_length_and_operational_keys_may_change(demo, tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, _args(demo, runs))
    cfg = load_config("cpu-small", [a for a in _args(demo, runs, "optim.epochs=9",
                                                       "scaling.num_workers=2",
                                                       "run.log_every=3") if a != "-s"][3:])
    rundir.check_same_experiment(str(runs / "r"), cfg)  # no error
    cfg.objective.threshold = 0.9
    with pytest.raises(UserError, match=r"\(objective.threshold differ: "):
        rundir.check_same_experiment(str(runs / "r"), cfg)


def test_restart_says_what_it_deletes_and_keeps_the_lease(where, capsys):
    run_dir, st = where
    for name in ("config.json", "history.json", "checkpoint_epoch-0000/checkpoint.pt",
                 "checkpoint_epoch-0001/checkpoint.pt"):
        data = b"[{}, {}]" if name == "history.json" else b"x"
        storage.write_bytes(storage.join(run_dir, name), data, st)
    with rundir.Lease(run_dir, st):
        gone = rundir.clear(run_dir, st)
        assert storage.exists(storage.join(run_dir, rundir.LEASE), st)
    assert set(gone) == {"config.json", "history.json", "checkpoint_epoch-0000",
                         "checkpoint_epoch-0001"}
    out = capsys.readouterr().out
    assert f"--restart: deleting the run in {run_dir} (2 checkpoint(s), the history of 2 " \
           "epoch(s), 4 entries" in out
    assert not rundir.has_run(run_dir, st)


# ---------------------------------------------------------------------------------------------
# whole checkpoints


def _saved(path: Path, cfg) -> bytes:
    """A real checkpoint file of an untrained cpu-small model."""
    import torch

    from multimix import checkpoint
    from multimix.model import create_model

    model = create_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    state = checkpoint.build_state(model=model, optimizer=opt, scheduler=sched, epoch=0,
                                   config=cfg, splits={}, classes=["N", "P"], history=[{}])
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(state, str(path))
    return path.read_bytes()


def test_an_incomplete_checkpoint_after_last_json_is_removed(tmp_path, capsys):
    run = tmp_path / "r"
    whole = _saved(run / "checkpoint_epoch-0000" / "checkpoint.pt", load_config("cpu-small"))
    (run / "last.json").write_text(json.dumps({"checkpoint": "checkpoint_epoch-0000",
                                               "epoch": 0}))
    (run / "best.json").write_text(json.dumps({"checkpoint": "checkpoint_epoch-0000",
                                               "epoch": 0}))
    # a copy cut short by a full disk, and a whole one Ray persisted just before a kill
    (run / "checkpoint_epoch-0001").mkdir()
    (run / "checkpoint_epoch-0001" / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])
    (run / "checkpoint_epoch-0002").mkdir()
    (run / "checkpoint_epoch-0002" / "checkpoint.pt").write_bytes(whole)
    (run / "checkpoint_epoch-0003").mkdir()  # nothing copied yet
    removed = rundir.remove_incomplete_checkpoints(str(run))
    assert removed == ["checkpoint_epoch-0001", "checkpoint_epoch-0003"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint_epoch-0000", "checkpoint_epoch-0002"]
    out = capsys.readouterr().out
    assert f"removed the incomplete checkpoint {run / 'checkpoint_epoch-0001'}" in out


# ---------------------------------------------------------------------------------------------
# the console


def test_the_interrupted_line_names_where_and_how_to_resume():
    c = Console(board=None, tty=False)
    assert c.interrupted_line(None) == ("interrupted before training started; rerun the same "
                                        "command to resume from epoch 1")
    c._on_step({"epoch": 2, "epochs": 5, "step": 17, "steps": 40})
    assert c.interrupted_line(2) == ("interrupted at epoch 3 step 17/40; rerun the same "
                                     "command to resume from epoch 3")


def test_an_epoch_line_fits_a_terminal():
    m = {"train_loss": 1.23456, "val_cls_auc": 0.91234, "val_cls_balanced_accuracy": 0.8812,
         "val_cls_threshold": 0.61, "val_seg_dice_mean": 0.9012, "img_per_s": 123.4,
         "skipped_rows": 3}
    line = epoch_line(9, 25, m, {"epoch": 9, "value": 1.7823})
    assert line == ("epoch 10/25  loss 1.235  AUC 0.912  bal.acc 0.881@0.61  Dice 0.901  "
                    "best 1.782 @10  123 img/s")
    assert len(line) <= 100
