"""The resource pre-check: the decision function, and a local Ray (no autoscaler) that stops a
run asking for a GPU or too many CPUs at once, before any Train worker starts."""

from __future__ import annotations

import time

import pytest

from multimix.config import ConfigError, load_config
from multimix.resources import places, shortfall

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
