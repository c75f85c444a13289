"""multimix tune: search-space parsing and a 2-trial search that trains inside Tune trials."""

from __future__ import annotations

import json

import pytest

from multimix.config import ConfigError, load_config
from multimix.tune import check_space, parse_space


def test_parse_space_kinds():
    space = parse_space(["objective.threshold=uniform:0.5,0.95",
                         "data.cls_labeled=choice:100,1000,all",
                         "objective.beta=loguniform:0.001,0.1", "optim.epochs=randint:1,4"])
    assert space["objective.threshold"] == ("uniform", [0.5, 0.95])
    assert space["data.cls_labeled"] == ("choice", [100, 1000, "all"])
    assert space["optim.epochs"] == ("randint", [1, 4])


@pytest.mark.parametrize("item", ["objective.threshold", "objective.threshold=normal:0,1",
                                  "objective.threshold=uniform:0.5", "x=uniform:a,b"])
def test_parse_space_rejects_malformed(item):
    with pytest.raises(ConfigError, match="--space"):
        parse_space([item])


def test_check_space_validates_values_against_the_config():
    cfg = load_config("cpu-small")
    check_space(cfg, parse_space(["objective.threshold=uniform:0.5,0.95"]))
    with pytest.raises(ConfigError, match="objective.threshold"):
        check_space(cfg, parse_space(["objective.threshold=uniform:0.5,1.5"]))
    with pytest.raises(ConfigError, match="objective.nope"):
        check_space(cfg, parse_space(["objective.nope=choice:1,2"]))


@pytest.mark.slow
def test_tune_two_trials(ray_local, tmp_path, capsys):
    from multimix.cli import main
    from multimix.data.prepare import prepare_demo

    prepare_demo(str(tmp_path / "demo"), image_size=64)
    code = main(["tune", "-c", "cpu-small",
                 "--set", f"data.cls_data={tmp_path / 'demo' / 'cls'}",
                 "--set", f"data.seg_data={tmp_path / 'demo' / 'seg'}",
                 "--set", "data.cls_labeled=40", "--set", "optim.epochs=1",
                 "--set", "optim.steps_per_epoch=2", "--set", f"run.storage_path={tmp_path / 'runs'}",
                 "--set", "scaling.cpus_per_worker=0.5", "--set", "scaling.data_cpus_per_task=0.5",
                 "--space", "objective.threshold=uniform:0.6,0.9",
                 "--space", "data.seg_labeled=choice:5,10", "--num-samples", "2"])
    assert code == 0
    rows = json.loads((tmp_path / "runs" / "multimix-tune" / "tune_results.json").read_text())
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    for r in rows:
        assert 0.6 <= r["config"]["objective.threshold"] <= 0.9
        assert r["config"]["data.seg_labeled"] in (5, 10)
        assert 0.0 <= r["val_score_balanced"] <= 1.0 and r["epochs"] == 1
    assert "best: val_score_balanced=" in capsys.readouterr().out
