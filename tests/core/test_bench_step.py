"""``multimix bench step --json`` at a tiny size: the JSON keys (not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys

KEYS = {"img_per_s", "baseline_img_per_s", "ratio", "peak_mem_mb", "baseline_peak_mem_mb",
        "mem_ratio", "settings"}


def test_bench_step_json():
    cmd = [sys.executable, "-m", "multimix.bench.step", "--size", "32", "--batch", "2",
           "--width", "0.25", "--iters", "1", "--warmup", "1", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert KEYS <= set(res)
    assert res["img_per_s"] > 0 and res["baseline_img_per_s"] > 0
    assert res["ratio"] > 0
    assert res["peak_mem_mb"] is not None and res["baseline_peak_mem_mb"] is not None
    s = res["settings"]
    assert s["images_per_step"] == 10 and s["size"] == 32 and s["device"] == "cpu"


def test_bench_step_registered_in_cli():
    from multimix.bench import SUBCOMMANDS

    assert SUBCOMMANDS["step"][0] == "multimix.bench.step"
    import argparse

    from multimix.bench import step

    p = argparse.ArgumentParser()
    step.add_arguments(p)
    a = p.parse_args(["--size", "64", "--channels-last", "--precision", "bf16", "--json"])
    assert a.size == 64 and a.channels_last and a.precision == "bf16" and a.json
