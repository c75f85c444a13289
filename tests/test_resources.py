"""The resource pre-check: the decision function, and a local Ray (no autoscaler) that stops a
run asking for a GPU or too many CPUs at once, before any Train worker starts."""

from __future__ import annotations

import time

import pytest

from multimix.config import ConfigError, load_config
from multimix.resources import concurrent_trials, places, shortfall, trial_request

GPU_NODE = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}
CPU_NODE = {"CPU": 2.0, "memory": 1e10}


def _scaling(**kw):
    return load_config("paper", {"scaling": kw}).scaling


def test_places_counts_workers_per_node():
    assert places([GPU_NODE, GPU_NODE], {"CPU": 4, "GPU": 1}) == 2
    assert places([GPU_NODE], {"CPU": 4}) == 4
    assert places([{"CPU": 16, "GPU": 8}], {"CPU": 4, "GPU": 1}) == 4
    assert places([CPU_NODE], {"CPU": 4, "GPU": 1}) == 0
    assert places([CPU_NODE], {"CPU": 0.5}) == 4


def test_shortfall_names_the_key():
    assert shortfall(_scaling(), [GPU_NODE]) is None  # paper: 1 worker, 4 CPU + 1 GPU
    msg = shortfall(_scaling(), [CPU_NODE])
    assert msg.startswith("scaling.use_gpu: ") and "no GPU" in msg and "2 CPUs" in msg
    msg = shortfall(_scaling(num_workers=2), [GPU_NODE])
    assert msg.startswith("scaling.num_workers: 2 workers") and "1 fit" in msg
    msg = shortfall(_scaling(gpus_per_worker=2), [GPU_NODE])
    assert msg.startswith("scaling.gpus_per_worker: ")
    msg = shortfall(_scaling(use_gpu=False, cpus_per_worker=4), [CPU_NODE])
    assert msg.startswith("scaling.cpus_per_worker: 4 CPUs") and "2 CPUs" in msg
    msg = shortfall(_scaling(use_gpu=False, cpus_per_worker=1, num_workers=3), [CPU_NODE])
    assert msg.startswith("scaling.num_workers: 3 workers") and "2 fit" in msg
    assert shortfall(_scaling(use_gpu=False, cpus_per_worker=1, num_workers=2), [CPU_NODE]) is None


def _cfg(variant="multimix", **scaling):
    return load_config("cpu-small", {"model": {"variant": variant}, "scaling": scaling})


def test_trial_request_counts_workers_and_one_task_per_data_stream():
    req = trial_request(_cfg(cpus_per_worker=0.5, data_cpus_per_task=0.5))
    assert req == {"CPU": pytest.approx(0.01 + 0.5 + 2 * 0.5)}  # unl_cls + unl_seg
    assert trial_request(_cfg("enc", cpus_per_worker=0.5, data_cpus_per_task=0.5)) == {
        "CPU": pytest.approx(0.51)}  # a supervised encoder reads no stream
    gpu = load_config("paper", {"scaling": {"num_workers": 2}})
    assert trial_request(gpu)["GPU"] == 2.0


def test_concurrent_trials_lowered_on_a_fixed_cluster_kept_with_an_autoscaler():
    # the hang seen on 2 CPUs: 2 trials of 0.5 CPU workers and two 0.5 CPU data tasks each
    cfg = _cfg(cpus_per_worker=0.5, data_cpus_per_task=0.5)
    n, msg = concurrent_trials(cfg, 2, [CPU_NODE], can_scale=False)
    assert n == 1 and msg.startswith("--concurrent 2: a trial holds 1.51 CPU")
    assert "running 1 at a time" in msg
    assert concurrent_trials(cfg, 2, [CPU_NODE], can_scale=True)[0] == 2
    # the ASHA test's setting: 0.25 + 2 × 0.25 + 0.01 = 0.76 CPU, two fit in 2 CPUs
    small = _cfg(cpus_per_worker=0.25, data_cpus_per_task=0.25)
    assert concurrent_trials(small, 2, [CPU_NODE], can_scale=False) == (2, None)
    assert concurrent_trials(small, 3, [CPU_NODE], can_scale=False)[0] == 2
    with pytest.raises(ConfigError, match="^scaling: a trial holds 4.51 CPU"):
        concurrent_trials(_cfg(cpus_per_worker=2, data_cpus_per_task=1.25), 1, [CPU_NODE],
                          can_scale=False)


def test_concurrent_gpu_trials_bounded_by_gpus_and_worker_places():
    cfg = load_config("paper")  # 1 worker: 4 CPU + 1 GPU, 2 streams × 1 CPU
    n, msg = concurrent_trials(cfg, 4, [GPU_NODE, GPU_NODE], can_scale=False)
    assert n == 2 and "1 GPU" in msg
    n, msg = concurrent_trials(cfg, 4, [GPU_NODE], can_scale=True)
    assert n == 4 and "autoscaler must add nodes" in msg
    with pytest.raises(ConfigError, match="scaling: "):
        concurrent_trials(cfg, 1, [CPU_NODE], can_scale=False)


def test_v1_report_tells_an_autoscaler_from_the_read_only_monitor():
    import json

    from multimix.resources import v1_report_can_scale

    def report(mapping):
        return json.dumps({"autoscaler_report": {"node_type_mapping": mapping}}).encode()

    assert not v1_report_can_scale(None)
    assert not v1_report_can_scale(report({"af15": "node_af15"}))  # plain ray start / init
    assert v1_report_can_scale(report({"af15": "head", "b2": "gpu_worker"}))  # cluster launcher
    assert v1_report_can_scale(report({"af15": "headgroup"}))  # KubeRay, workers not up yet


@pytest.mark.slow
@pytest.mark.parametrize("over,key", [
    ({"scaling.use_gpu": True, "scaling.gpus_per_worker": 1}, "scaling.use_gpu"),
    ({"scaling.cpus_per_worker": 64}, "scaling.cpus_per_worker"),
    ({"scaling.cpus_per_worker": 1, "scaling.num_workers": 64}, "scaling.num_workers"),
])
def test_train_stops_before_waiting_without_autoscaler(ray_local, tmp_path, monkeypatch,
                                                       over, key):
    from multimix import train as T

    monkeypatch.delenv("MULTIMIX_AUTOSCALER", raising=False)

    def never(*a, **k):  # the check must come before any data or trainer work
        raise AssertionError("prepare_inputs reached")

    monkeypatch.setattr(T, "prepare_inputs", never)
    monkeypatch.setattr(T, "check_inputs", lambda cfg, **k: object())  # no datasets in this test
    cfg = load_config("cpu-small", [f"{k}={v}" for k, v in over.items()]
                      + [f"run.storage_path={tmp_path}"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        T.train(cfg)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg
    assert "no autoscaler" in msg and "CPUs" in msg


@pytest.mark.slow
def test_autoscaler_wait_is_reported(ray_local, monkeypatch, capsys):
    from multimix import resources

    monkeypatch.setenv("MULTIMIX_AUTOSCALER", "1")
    reporter = resources.check(_scaling(), every=0.2)
    try:
        time.sleep(0.7)
    finally:
        reporter.stop()
        reporter.join(5)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[multimix] waiting for the autoscaler: scaling.use_gpu: ")
    assert sum("for the autoscaler: scaling.use_gpu" in line for line in out) >= 3
    assert not reporter.is_alive()


@pytest.mark.parametrize("webui_url,warned", [("", True), ("127.0.0.1:8265", False)])
def test_a_cluster_without_dashboard_is_named_when_connecting(monkeypatch, capsys, webui_url,
                                                               warned):
    """Ray Train frees a dead run's placement group only through the dashboard's state API: a
    cluster without one is said at connect time (ray.init stands in for the cluster here)."""
    import types

    import ray

    from multimix import resources

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or types.SimpleNamespace(
        address_info={"webui_url": webui_url}))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    resources.connect_ray(quiet=True)
    assert calls and calls[0]["address"] == "10.0.0.1:6379"
    err = capsys.readouterr().err
    assert ("runs no dashboard" in err and "10.0.0.1:6379" in err) is warned
