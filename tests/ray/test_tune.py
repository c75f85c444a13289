"""multimix tune: search parsing/validation (Ray-free), a 2×2 grid with ASHA and 2 concurrent
trials on the real data (results files, best.yaml retrains, no secret in the experiment), and a
search resumed after a SIGKILL of its driver."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multimix.config import ConfigError, RunConfig, load_config
from multimix.errors import UserError
from multimix.tune import (Search, _diff, check_space, param_overrides, parse_grid,
                           parse_space)


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


def test_parse_grid_values_and_paired_budgets():
    grid = parse_grid(["data.cls_labeled=100,1000,all", "model.variant=enc,enc-ssl,multimix",
                       "optim.seed=0,1,2", "budget=100:10,all:all"])
    assert grid == {"data.cls_labeled": [100, 1000, "all"],
                    "model.variant": ["enc", "enc-ssl", "multimix"], "optim.seed": [0, 1, 2],
                    "budget": ["100:10", "all:all"]}  # not YAML 1.1's base 60 (100:10 = 6010)
    assert param_overrides({"budget": "100:10", "optim.seed": 1}) == [
        "data.cls_labeled=100", "data.seg_labeled=10", "optim.seed=1"]
    cfg = load_config("cpu-small", param_overrides({"budget": "all:50"}))
    assert (cfg.data.cls_labeled, cfg.data.seg_labeled) == ("all", 50)


@pytest.mark.parametrize("items,match", [
    (["optim.seed"], "--grid"), (["optim.seed="], "--grid"), (["optim.seed=0,,1"], "--grid"),
    (["optim.seed=0,0"], "repeated"), (["optim.seed=0", "optim.seed=1"], "given twice")])
def test_parse_grid_rejects_malformed(items, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(items)


def test_grid_values_validated_once_naming_the_key():
    cfg = load_config("cpu-small")
    with pytest.raises(ConfigError, match="model.variant"):
        check_space(cfg, {}, parse_grid(["model.variant=enc,umtl-xl"]))
    with pytest.raises(ConfigError, match="data.seg_labeled"):
        check_space(cfg, {}, parse_grid(["budget=100:0"]))
    with pytest.raises(ConfigError, match="budget: expected CLS:SEG"):
        check_space(cfg, {}, parse_grid(["budget=100"]))
    with pytest.raises(ConfigError, match="optim.seed: both"):
        check_space(cfg, parse_space(["optim.seed=choice:0,1"]), parse_grid(["optim.seed=2,3"]))


def test_search_checks_scheduler_settings():
    cfg = load_config("cpu-small", ["optim.epochs=3"])
    Search(scheduler="asha", grace_period=3).check(cfg)
    with pytest.raises(UserError, match="--grace-period"):
        Search(scheduler="asha", grace_period=4).check(cfg)
    with pytest.raises(UserError, match="--reduction-factor"):
        Search(scheduler="asha", reduction_factor=1).check(cfg)
    with pytest.raises(UserError, match="optim.epochs: cannot be searched"):
        Search(scheduler="asha", grid={"optim.epochs": [1, 2]}).check(cfg)
    with pytest.raises(UserError, match="--concurrent"):
        Search(concurrent=0).check(cfg)


def test_fingerprint_ignores_concurrency_and_run_location_not_the_search():
    base = load_config("cpu-small").to_dict()
    a = Search(grid={"optim.seed": [0, 1]}, concurrent=1).fingerprint(base)
    moved = {**base, "run": {**base["run"], "storage_path": "/elsewhere"}}
    assert _diff(a, Search(grid={"optim.seed": [0, 1]}, concurrent=4).fingerprint(moved)) == []
    other = Search(grid={"optim.seed": [0, 1, 2]}).fingerprint(base)
    assert _diff(a, other) == ["search.grid.optim.seed: [0, 1] -> [0, 1, 2]"]
    lr = load_config("cpu-small", ["optim.lr=0.5"]).to_dict()
    assert _diff(a, Search(grid={"optim.seed": [0, 1]}).fingerprint(lr)) == [
        "config.optim.lr: 0.001 -> 0.5"]


# ---------------------------------------------------------------------------------------------
# Ray: a 2x2 grid with ASHA on the real data, 2 trials at a time

#: the score Tune ranks trials by (the config default, run.checkpoint_metric)
METRIC = RunConfig().checkpoint_metric
SECRET = "MMtuneSECRETdo-not-store-0123"
KEY_ID = "MMtuneKEYIDdo-not-store"
ENV_SECRET = "MMtuneENVSECRETdo-not-store"


def _tiny(cls: Path, seg: Path, runs: Path, name: str) -> list[str]:
    return ["-c", "cpu-small", "--set", f"data.cls_data={cls}", "--set", f"data.seg_data={seg}",
            "--set", "optim.epochs=2", "--set", "optim.steps_per_epoch=2",
            "--set", "data.val_fraction=0.05", "--set", "scaling.data_concurrency=1",
            "--set", f"run.storage_path={runs}", "--set", f"run.name={name}"]


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def asha_grid(ray_local, kermany_prepared, v7_prepared, tmp_path_factory):
    from multimix.cli import main

    runs = tmp_path_factory.mktemp("tune") / "runs"
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)  # Tune would copy it into trial actors
    t0 = time.time()
    cpus_free = ray_local.available_resources().get("CPU", 0.0)
    try:
        code = main(["tune", *_tiny(kermany_prepared, v7_prepared, runs, "grid"),
                     "--set", f"storage.access_key_id={KEY_ID}",
                     "--set", f"storage.secret_access_key={SECRET}",
                     "--grid", "optim.lr=0.001,0.003", "--grid", "optim.seed=0,1",
                     "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2",
                     "--concurrent", "2",
                     # two trials at once on a 2-CPU Ray: 2 x (worker 0.25 + 2 streams x 0.25)
                     # = 1.5 CPUs, so one trial's data tasks cannot starve the other's worker
                     "--set", "scaling.cpus_per_worker=0.25",
                     "--set", "scaling.data_cpus_per_task=0.25",
                     # MLflow (the dev extra installs mlflow-skinny): one run per trial
                     "--set", "run.mlflow=true", "--set", f"run.mlflow_uri={runs.parent}/mlruns"])
    finally:
        mp.undo()
    return {"code": code, "exp": runs / "grid", "runs": runs, "wall": time.time() - t0,
            "cpus_free": cpus_free,
            "data": (kermany_prepared, v7_prepared), "mlruns": runs.parent / "mlruns"}


@pytest.mark.slow
@pytest.mark.realdata
def test_grid_asha_results_files(asha_grid):
    assert asha_grid["code"] == 0
    exp = asha_grid["exp"]
    rows = _read_csv(exp / "results.csv")
    assert len(rows) == 4
    assert sorted((r["param:optim.lr"], r["param:optim.seed"]) for r in rows) == [
        ("0.001", "0"), ("0.001", "1"), ("0.003", "0"), ("0.003", "1")]
    for r in rows:
        # ASHA (grace 1 epoch, factor 2) lets a trial finish its 2 epochs or stops it after 1
        assert (r["status"], r["epochs"]) in (("done", "2"), ("stopped", "1")), r
        assert int(r["best_epoch"]) < int(r["epochs"])
        for k in (METRIC, "val_score", "val_cls_accuracy", "val_cls_auc", "val_cls_f1_pneumonia",
                  "val_seg_dice_mean", "val_seg_hausdorff_mean"):
            assert r[k] != "" and float(r[k]) == float(r[k]), (k, r)
        assert float(r["time_s"]) > 0
        ckpt = Path(r["checkpoint"])
        assert ckpt == exp / "trials" / r["trial"] / f"checkpoint_epoch-{int(r['best_epoch']):04d}"
        assert (ckpt / "checkpoint.pt").is_file()
        hist = json.loads((exp / "trials" / r["trial"] / "history.json").read_text())
        assert len(hist) == int(r["epochs"])
        assert max(h[METRIC] for h in hist) == pytest.approx(float(r[METRIC]))
    md = (exp / "results.md").read_text()
    assert all(f"| {r['trial']} |" in md for r in rows)
    for png in ("tune_scores.png", "learning_curves.png"):
        assert (exp / png).stat().st_size > 5000
    assert (exp / "search.json").is_file() and (exp / "tuner.pkl").is_file()


@pytest.mark.slow
@pytest.mark.realdata
def test_a_finished_search_hands_every_cpu_back(asha_grid, ray_local):
    """ASHA stops trials (at a rung, and at max_t) by ending their actors: Ray Train's cleaner
    must then remove each stopped run's placement group, or a long-lived cluster loses the
    trial's CPUs for good (and the next run's data tasks wait for CPUs forever)."""
    deadline = time.time() + 30  # the cleaner checks its controller every second
    free = ray_local.available_resources().get("CPU", 0.0)
    while free < asha_grid["cpus_free"] and time.time() < deadline:
        time.sleep(0.5)
        free = ray_local.available_resources().get("CPU", 0.0)
    assert free >= asha_grid["cpus_free"], (free, asha_grid["cpus_free"])


@pytest.mark.slow
@pytest.mark.realdata
def test_grid_ran_at_most_concurrent_trials_at_once(asha_grid):
    """Each trial's span from its own reports (last timestamp − total time; Tune's timestamps are
    whole seconds, hence the 1 s margin): never 3 at once, and 2 at once at some point."""
    spans = []
    for d in (asha_grid["exp"]).iterdir():
        if (d / "result.json").is_file():
            last = json.loads((d / "result.json").read_text().strip().splitlines()[-1])
            spans.append((last["timestamp"] - last["time_total_s"], last["timestamp"]))
    assert len(spans) == 4
    most = max(sum(1 for s, e in spans if s <= t < e - 1.0) for t in {s for s, _ in spans})
    assert most == 2, spans


@pytest.mark.slow
@pytest.mark.realdata
def test_no_secret_in_any_tune_file(asha_grid):
    found = [str(p) for p in asha_grid["exp"].rglob("*") if p.is_file()
             for s in (SECRET, KEY_ID, ENV_SECRET) if s.encode() in p.read_bytes()]
    assert found == []


@pytest.mark.slow
@pytest.mark.realdata
def test_best_yaml_retrains_the_best_trial(asha_grid):
    from multimix.cli import main

    exp = asha_grid["exp"]
    rows = _read_csv(exp / "results.csv")
    best = max((r for r in rows if r["status"] != "error"), key=lambda r: float(r[METRIC]))
    assert f"best trial {best['trial']}" in (exp / "best.yaml").read_text()
    cfg = load_config(str(exp / "best.yaml"))
    assert cfg.run.name == "grid-best" and cfg.optim.lr == float(best["param:optim.lr"])
    trial_cfg = json.loads((exp / "trials" / best["trial"] / "config.json").read_text())
    best_cfg = cfg.to_dict()
    for d in (trial_cfg, best_cfg):
        for key in ("name", "storage_path", "tensorboard", "mlflow", "mlflow_uri"):  # a trial
            d["run"].pop(key, None)  # leaves TensorBoard and MLflow to Tune's loggers
    assert best_cfg == trial_cfg  # the trial's config, up to where it is written
    assert main(["train", "--config", str(exp / "best.yaml")]) == 0
    run_dir = asha_grid["runs"] / "grid-best"
    hist = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1]
    # a 2-epoch train run: TensorBoard events, the learning curves, its MLflow run
    from mlflow.tracking import MlflowClient

    from multimix import tracking

    scalars = tracking.read_scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars[tracking.tag(METRIC)]] == [1, 2]
    assert (run_dir / "learning_curves.png").stat().st_size > 10000
    client = MlflowClient(f"file:{asha_grid['mlruns']}")
    (run,) = client.search_runs([client.get_experiment_by_name("grid-best").experiment_id])
    assert run.data.params["optim.lr"] == best["param:optim.lr"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, METRIC)] == [1, 2]


@pytest.mark.slow
@pytest.mark.realdata
def test_each_trial_has_tensorboard_events_and_one_mlflow_run(asha_grid):
    from mlflow.tracking import MlflowClient

    exp = asha_grid["exp"]
    rows = _read_csv(exp / "results.csv")
    for r in rows:  # Tune's TBXLoggerCallback: <experiment>/<trial>/events.out.tfevents.*
        assert list((exp / r["trial"]).glob("events.out.tfevents.*")), r["trial"]
        if r["status"] == "done":  # an ASHA stop can kill a trial before its figure
            assert (exp / "trials" / r["trial"] / "learning_curves.png").is_file()
        assert not (exp / "trials" / r["trial"] / "tensorboard").exists()  # not twice
    client = MlflowClient(f"file:{asha_grid['mlruns']}")
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert sorted(run.data.tags["trial_name"] for run in runs) == sorted(r["trial"] for r in rows)
    for run in runs:
        row = next(r for r in rows if r["trial"] == run.data.tags["trial_name"])
        assert (run.data.params["optim.lr"], run.data.params["optim.seed"]) == (
            row["param:optim.lr"], row["param:optim.seed"])
        history = client.get_metric_history(run.info.run_id, METRIC)
        assert len(history) == int(row["epochs"])


# ---------------------------------------------------------------------------------------------
# resume: SIGKILL the driver once a trial has finished, rerun the same command


@pytest.mark.slow
def test_resume_after_sigkill_of_the_driver(ray_local, tmp_path, monkeypatch):
    from multimix.data.prepare import prepare_demo

    prepare_demo(str(tmp_path / "demo"), image_size=64)
    runs = tmp_path / "runs"
    argv = ["tune", *_tiny(tmp_path / "demo" / "cls", tmp_path / "demo" / "seg", runs, "res"),
            "--set", "optim.epochs=1", "--set", "data.cls_labeled=40",
            "--grid", "optim.seed=0,1", "--concurrent", "1",
            "--set", "run.mlflow=true", "--set", f"run.mlflow_uri={tmp_path}/mlruns"]
    # each driver starts a Ray of its own (~10 s), as a user's would: what earlier tests left in
    # the session's Ray cannot hold its trials back; the SIGKILL ends that Ray, and the rerun
    # restores from storage alone
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    trials = runs / "res" / "trials"
    finished: list[Path] = []

    def first_done_second_started() -> bool:  # killed mid-search, the second trial mid-run
        finished[:] = [d for d in trials.glob("*") if (d / "last.json").is_file()]
        return bool(finished) and len(list(trials.glob("*/config.json"))) == 2

    # a first trial: Ray, Tune, Train and Ray Data start-up (~80 s alone on 2 cores)
    code, out = _cli(argv, env, tmp_path / "driver.log", until=first_done_second_started,
                     timeout=480)
    assert finished, f"no trial finished (driver exit {code}): {out}"
    first = finished[0]
    done_hist = (first / "history.json").read_text()
    # the same command again: restored, not started over
    code, out = _cli(argv, env, tmp_path / "rerun.log", timeout=480)
    assert code == 0, out
    rows = _read_csv(runs / "res" / "results.csv")
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows), rows
    assert first.name in {r["trial"] for r in rows}  # the same trial ids, none added
    assert (first / "history.json").read_text() == done_hist  # the finished trial not rerun
    # one MLflow run per trial across both drivers, each with its epochs' metrics, finished
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as tracking sets it in the driver
    client = MlflowClient(f"file:{tmp_path}/mlruns")
    mlruns = client.search_runs([client.get_experiment_by_name("res").experiment_id])
    assert sorted(r.data.tags["trial_name"] for r in mlruns) == sorted(r["trial"] for r in rows)
    for run in mlruns:
        assert run.info.status == "FINISHED", run.info
        assert len(client.get_metric_history(run.info.run_id, METRIC)) == 1  # optim.epochs=1
    # another search under the same name: refused with what to do, until --restart
    with pytest.raises(UserError, match="--restart"):
        from multimix import tune

        tune.run(tune_args(argv[1:] + ["--grid", "optim.lr=0.01,0.02"]))


def _cli(argv: list[str], env: dict, log_path: Path, timeout: float, until=None):
    """``python -m multimix.cli ARGV`` in its own process group, its output in ``log_path``;
    with ``until``, SIGKILLed (the driver only, then its group) once ``until()`` holds. Returns
    (exit code or None, the log's tail); the group is killed on the way out, also on a timeout."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "multimix.cli", *argv], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while proc.poll() is None and time.time() < deadline:
                if until is not None and until():
                    os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-search
                    break
                time.sleep(0.5)
        finally:
            code = proc.poll()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its Ray, or all of it on a timeout
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    return code, log_path.read_text(errors="replace")[-3000:]


def tune_args(argv: list[str]):
    import argparse

    from multimix import tune

    p = argparse.ArgumentParser()
    tune.add_arguments(p)
    return p.parse_args(argv)


def test_an_all_digit_trial_id_stays_the_run_name(monkeypatch):
    """Tune's trial ids are 5 hex digits + _ + index; an all-digit one (83046_00000) parses as
    a YAML integer unless quoted: the trial's run.name must stay that string."""
    import ray.tune

    from multimix import tune, train

    seen = {}

    class Ctx:
        def get_trial_id(self):
            return "83046_00000"

    from ray.tune.integration import ray_train

    monkeypatch.setattr(ray.tune, "get_context", lambda: Ctx())
    monkeypatch.setattr(ray_train, "TuneReportCallback", lambda: None)
    monkeypatch.setattr(train, "train",
                        lambda cfg, callbacks, **kw: seen.update(name=cfg.run.name, **kw))
    tune.trial({}, load_config("cpu-small").to_dict(), "/tmp/exp")
    assert seen["name"] == "83046_00000"
    assert seen["lease"] is False  # under the search's lease
