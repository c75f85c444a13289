"""Checkpoint choice: ``best.json`` / ``last.json`` by ``run.checkpoint_metric`` and
``run.checkpoint_mode`` on scripted histories, agreement with the checkpoints Ray keeps, and the
checkpoint a resumed run starts from."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import torch

from multimix import checkpoint
from multimix.config import load_config

NAN = float("nan")


def _ctx(root: Path):
    """The two attributes of Ray Train's StorageContext that the run files use."""
    root.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), experiment_fs_path=str(root))


def _cfg(metric="val_score", mode="max", *extra):
    return load_config("cpu-small", [f"run.checkpoint_metric={metric}",
                                     f"run.checkpoint_mode={mode}", *extra])


def _history(metric: str, values) -> list[dict]:
    return [{"epoch": e, metric: v, "train_loss": 1.0 / (e + 1)} for e, v in enumerate(values)]


# (metric, mode, values per epoch, expected best epoch): ties go to the later epoch (the one Ray
# keeps), NaN / missing values never win unless nothing else is there (then the latest)
CASES = [
    ("val_score", "max", [0.5, 0.8, 0.7, 0.9, 0.6], 3),
    ("val_score", "max", [0.9, 0.2, 0.3], 0),
    ("val_seg_hausdorff_mean", "min", [9.0, 4.0, 5.0, 7.0], 1),
    ("val_seg_hausdorff_mean", "min", [3.0, 4.0, 5.0], 0),
    ("val_score", "max", [NAN, 0.4, NAN, 0.3], 1),
    ("val_score", "max", [0.7, 0.9, 0.9, 0.5], 2),
    ("train_loss", "min", [2.0, 1.0, 1.0], 2),
    ("val_score", "max", [NAN, NAN], 1),
]


@pytest.mark.parametrize("metric,mode,values,best", CASES)
def test_best_and_last_by_metric_and_mode(tmp_path, metric, mode, values, best):
    from multimix.train import _write_run_files, read_run

    cfg = _cfg(metric, mode)
    hist = _history(metric, values)
    if metric == "train_loss":
        hist = [{"epoch": h["epoch"], "train_loss": v} for h, v in zip(hist, values)]
    root = tmp_path / "run"
    for e in range(len(hist)):  # one epoch at a time, as the training loop writes them
        _write_run_files(_ctx(root), cfg, hist[:e + 1], f"checkpoint_epoch-{e:04d}")
    b = json.loads((root / "best.json").read_text())
    last = json.loads((root / "last.json").read_text())
    assert b["epoch"] == best and b["checkpoint"] == f"checkpoint_epoch-{best:04d}"
    assert b["metric"] == metric
    if values[best] == values[best]:
        assert b["value"] == values[best]
    assert last["epoch"] == len(values) - 1
    assert last["checkpoint"] == f"checkpoint_epoch-{len(values) - 1:04d}"
    assert json.loads((root / "history.json").read_text())[-1]["epoch"] == len(values) - 1
    run = read_run(str(root), cfg)
    assert run.best_checkpoint == str(root / b["checkpoint"]) and run.epochs == len(values)
    assert run.last_checkpoint == str(root / last["checkpoint"])


def _tiny_state(cfg, epoch: int, history: list[dict]) -> dict:
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters())
    return checkpoint.build_state(model=net, optimizer=opt, scheduler=None, epoch=epoch,
                                  config=cfg, splits={}, classes=[], history=history)


def test_resolve_and_resume_pick_the_checkpoint_the_run_files_name(tmp_path):
    from multimix.train import _read_last_checkpoint, _write_run_files

    cfg = _cfg()
    root = tmp_path / "run"
    hist = _history("val_score", [0.3, 0.9, 0.4])
    for e in range(3):
        d = root / f"checkpoint_epoch-{e:04d}"
        d.mkdir(parents=True)
        checkpoint.save(_tiny_state(cfg, e, hist[:e + 1]), str(d / checkpoint.FILENAME))
        _write_run_files(_ctx(root), cfg, hist[:e + 1], d.name)
    assert checkpoint.resolve_checkpoint(str(root)) == str(
        root / "checkpoint_epoch-0001" / checkpoint.FILENAME)
    assert checkpoint.resolve_checkpoint(str(root), which="last") == str(
        root / "checkpoint_epoch-0002" / checkpoint.FILENAME)
    assert checkpoint.load(str(root))["epoch"] == 1
    state, path = _read_last_checkpoint(_ctx(root))
    assert state["epoch"] == 2 and path.endswith("checkpoint_epoch-0002/checkpoint.pt")
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
    # last.json naming a checkpoint that never got written: no resume point from it
    (root / "checkpoint_epoch-0002" / checkpoint.FILENAME).unlink()
    assert _read_last_checkpoint(_ctx(root)) == (None, None)
    assert _read_last_checkpoint(_ctx(tmp_path / "empty")) == (None, None)


def _scripted_loop(config: dict) -> None:
    """A Train loop that reports scripted metrics with a checkpoint per epoch and writes the run
    files exactly as :func:`multimix.train.train_loop_per_worker` does."""
    import os
    import tempfile

    import ray.train

    from multimix.train import _write_run_files

    cfg = load_config(config["cfg"])
    history = []
    for epoch, v in enumerate(config["values"]):
        metrics = {"epoch": epoch, cfg.run.checkpoint_metric: v}
        history.append(metrics)
        name = f"checkpoint_epoch-{epoch:04d}"
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save(_tiny_state(cfg, epoch, history), os.path.join(d, checkpoint.FILENAME))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=name)
        _write_run_files(ray.train.get_context().get_storage(), cfg, history, name)


@pytest.mark.slow
def test_best_json_names_a_checkpoint_ray_kept(ray_local, tmp_path):
    """Ray keeps the best (by the same metric and mode, ``num_to_keep=1``) and the latest
    checkpoint; ``best.json`` and ``last.json`` must name exactly those directories (here with a
    tie for the best, which Ray breaks towards the later epoch; ``max`` is the same code path)."""
    mode, values = "min", [0.5, 0.2, 0.6, 0.2, 0.8]
    import ray
    from ray.train import ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from multimix.data.pipeline import DataInputs
    from multimix.train import build_trainer, read_run

    cfg = _cfg("val_score", mode, f"run.storage_path={tmp_path / 'runs'}", "run.name=scripted")
    inputs = DataInputs(steps=1)
    run_config = build_trainer(cfg, inputs).run_config  # the run's own CheckpointConfig
    # the workers cannot import this test module: ship its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    DataParallelTrainer(_scripted_loop, train_loop_config={"cfg": cfg.to_dict(), "values": values},
                        scaling_config=ScalingConfig(num_workers=1,
                                                     resources_per_worker={"CPU": 0.5}),
                        run_config=run_config).fit()
    root = tmp_path / "runs" / "scripted"
    kept = sorted(p.parent.name for p in root.glob("checkpoint_epoch-*/checkpoint.pt"))
    b = json.loads((root / "best.json").read_text())
    last = json.loads((root / "last.json").read_text())
    assert sorted({b["checkpoint"], last["checkpoint"]}) == kept
    pick = max if mode == "max" else min
    assert values[b["epoch"]] == pick(values) and last["epoch"] == len(values) - 1
    res = read_run(str(root), cfg)
    assert checkpoint.load(res.best_checkpoint)["epoch"] == b["epoch"]
    assert checkpoint.load(res.last_checkpoint)["epoch"] == len(values) - 1
