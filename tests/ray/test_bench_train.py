"""``multimix bench train`` on CPU at 64²: the real pipeline → Train worker → train_step path,
its JSON keys, and figures that agree with each other."""

from __future__ import annotations

import argparse
import math
import signal

import pytest

from multimix.bench import train as B


@pytest.mark.slow
def test_bench_train_cpu_figures_are_consistent(ray_local):
    p = argparse.ArgumentParser()
    B.add_arguments(p)
    args = p.parse_args(["--config", "cpu-small", "--size", "64", "--steps", "4",
                         "--warmup", "2", "--n-cls", "160", "--device", "cpu", "--json"])
    before = signal.getsignal(signal.SIGINT)
    res = B.measure(args)
    # Ctrl-C still reaches this process, not a handler Ray Train left bound to a finished run
    assert signal.getsignal(signal.SIGINT) is before
    assert set(B.KEYS) <= set(res)
    for k in ("train_img_per_s", "step_img_per_s", "data_cpus", "data_img_per_cpu_s",
              "augment_img_per_s_per_core", "cpus_per_gpu_needed"):
        assert res[k] > 0 and math.isfinite(res[k]), k
    assert res["feed_ratio"] == pytest.approx(res["train_img_per_s"] / res["step_img_per_s"],
                                              rel=5e-3, abs=2e-3)
    assert 0.0 <= res["data_wait_fraction"] <= 1.0
    # a fed step is never faster than the bare one by more than timing noise
    assert res["feed_ratio"] <= 1.5
    assert res["cpus_per_gpu_needed"] == pytest.approx(
        res["step_img_per_s"] / res["data_img_per_cpu_s"], rel=2e-2)
    assert res["data_cpus"] <= 2.0  # the session's local Ray has 2 CPUs
    if res["data_cpus_busy"] is not None:
        assert 0.0 < res["data_cpus_busy"] <= 2.5
    s = res["settings"]
    assert s["size"] == 64 and s["steps"] == 4 and s["img_per_step"] == 40
    assert s["device"] == "cpu" and s["device_name"] == "cpu"
