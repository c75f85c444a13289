"""multimix.tracking without Ray running: a train run's rank-0 tracker writes TensorBoard event
files and learning_curves.png into the run directory after every epoch (a resumed run adds a
file, TensorBoard reads both), other ranks write nothing; MLflow (the extra) gets params, every
epoch and the evaluation in one MLflow run per run directory, also across a resume; with MLflow
missing, ``run.mlflow=true`` is one line naming the extra."""

from __future__ import annotations

import importlib.util

import pyarrow.fs as pafs
import pytest

from multimix import tracking
from multimix.cli import main
from multimix.config import load_config
from multimix.errors import UserError


def _history(n: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_accept_rate_c1": 0.25 * e,
             "val_cls_auc": 0.5 + 0.1 * e, "val_cls_threshold": float("nan"), "lr": 0.001,
             "val_cls_confusion": [[1, 2], [3, 4]], "skipped_rows": 0} for e in range(n)]


def _cfg(tmp_path, *sets):
    return load_config("cpu-small", [f"run.storage_path={tmp_path / 'runs'}", "run.name=r",
                                     *sets])


def test_tensorboard_and_curves_after_every_epoch_and_across_a_resume(tmp_path):
    cfg = _cfg(tmp_path)
    root = tmp_path / "runs" / "r"
    t = tracking.RunTracker(cfg, pafs.LocalFileSystem(), str(root), rank=0)
    h = _history(3)
    t.epoch(h[:1])
    assert tracking.read_scalars(root / "tensorboard")["train/loss"] == [(1, 1.0)]
    assert (root / "learning_curves.png").stat().st_size > 5000
    t.epoch(h[:2])
    t.close()
    resumed = tracking.RunTracker(cfg, pafs.LocalFileSystem(), str(root), rank=0)
    resumed.epoch(h)
    resumed.close()
    scalars = tracking.read_scalars(root / "tensorboard")
    assert len([f for f in (root / "tensorboard").iterdir()]) == 2  # one file per worker start
    assert scalars["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [s for s, _ in scalars["val/cls_auc"]] == [1, 2, 3]
    assert {"train/accept_rate_c1", "run/lr", "run/skipped_rows", "val/cls_threshold"} <= set(
        scalars) and "val/cls_confusion" not in scalars


def test_other_ranks_and_tensorboard_off_write_nothing(tmp_path):
    root = tmp_path / "runs" / "r"
    t = tracking.RunTracker(_cfg(tmp_path), pafs.LocalFileSystem(), str(root), rank=1)
    t.epoch(_history(1))
    t.close()
    assert not root.exists()
    t = tracking.RunTracker(_cfg(tmp_path, "run.tensorboard=false"), pafs.LocalFileSystem(),
                            str(root), rank=0)
    t.epoch(_history(1))
    t.close()
    assert sorted(p.name for p in root.iterdir()) == ["learning_curves.png"]


def test_a_tracking_failure_never_stops_the_run(tmp_path, caplog):
    class Broken(pafs.LocalFileSystem):
        pass

    root = tmp_path / "file"
    root.write_text("a file where the run directory should be")
    t = tracking.RunTracker(_cfg(tmp_path), pafs.LocalFileSystem(), str(root), rank=0)
    t.epoch(_history(1))
    t.epoch(_history(2))  # switched off after the first failure: one warning each
    t.close()
    warnings = [r.getMessage() for r in caplog.records if "tracking off" in r.getMessage()]
    assert len(warnings) == 2, warnings


def test_mlflow_uri_and_tags():
    assert tracking.mlflow_uri("").startswith("file:/") and tracking.mlflow_uri("").endswith(
        "/mlruns")
    assert tracking.mlflow_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking.mlflow_uri("http://host:5000") == "http://host:5000"
    assert tracking.mlflow_uri("rel/dir").startswith("file:/")
    assert tracking.tag("val_seg_dice_mean") == "val/seg_dice_mean"
    assert tracking.tag("img_per_s") == "run/img_per_s"


def test_mlflow_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r"run.mlflow: MLflow is not installed; pip install "
                                        r"'multimix\[mlflow\]'"):
        tracking.check(_cfg(tmp_path, "run.mlflow=true"))
    tracking.check(_cfg(tmp_path))  # off: nothing asked
    code = main(["train", "-c", "cpu-small", "--set", f"run.storage_path={tmp_path}",
                 "--set", "run.mlflow=true", "--set", f"data.cls_data={tmp_path / 'none'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "multimix[mlflow]" in err[0], err


def test_mlflow_one_run_per_run_directory_with_params_metrics_and_evaluation(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, "run.mlflow=true", f"run.mlflow_uri={tmp_path / 'mlruns'}")
    tracking.check(cfg)
    assert cfg.run.mlflow_uri == f"file:{tmp_path / 'mlruns'}"
    root = str(tmp_path / "runs" / "r")
    h = _history(2)
    for part in (h[:1], h):  # a run, then its resume
        t = tracking.RunTracker(cfg, pafs.LocalFileSystem(), root, rank=0)
        t.epoch(part)
        t.close()
    report = {"sets": {"cls": {"kermany cxr": {"n": 10, "auc": 0.9, "rows": "all"}},
                       "seg": {"v7": {"n": 3, "dice_mean": 0.8}}},
              "markdown_text": "# MultiMix evaluation\n"}
    run_id = tracking.log_evaluation(cfg, report, run_dir=root)
    client = MlflowClient(cfg.run.mlflow_uri)
    exp = client.get_experiment_by_name("r")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run_id
    data = runs[0].data
    assert data.params["optim.lr"] == str(cfg.optim.lr) and "storage.secret_access_key" not in \
        data.params
    hist = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5)]
    assert data.metrics["eval.cls.kermany cxr.auc"] == 0.9
    assert data.metrics["eval.seg.v7.dice_mean"] == 0.8
    assert "val_cls_threshold" not in data.metrics  # NaN: not logged
