"""``scripts/gpu_check.sh`` on this CPU-only machine, reduced (``--quick``): the CUDA parts are
skipped with a line saying why, the Ray parts run (or are skipped with a line under
``MULTIMIX_NO_RAY=1``, which makes ``ray`` unimportable in every process the script starts),
and the JSON + Markdown summary hold what ran. The parts left out here with ``--skip`` have
their own tests (tests/core/test_collectives.py, tests/ray/test_bench_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *args: str, no_ray: bool = False):
    env = dict(os.environ, PYTHON=sys.executable, MULTIMIX_NO_RAY="1" if no_ray else "0")
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--quick", "--out", str(out),
                           "--budget", "1500", *args], capture_output=True, text=True, env=env,
                          timeout=1600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    return proc.stdout, doc, md


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_check_without_ray_runs_the_torch_parts(tmp_path):
    out, doc, md = _run(tmp_path, "--skip", "collectives", no_ray=True)
    assert "[gpu-check] SKIP bench step cuda bf16+channels_last+compile: no CUDA device" in out
    assert "[gpu-check] SKIP bench train cpu: Ray made unavailable (MULTIMIX_NO_RAY=1)" in out
    assert ("[gpu-check] SKIP train 2 epochs + evaluate: Ray made unavailable "
            "(MULTIMIX_NO_RAY=1)") in out
    steps = doc["steps"]
    assert doc["ok"] and doc["host"]["cuda"] is False and doc["host"]["ray"] is None
    step = steps["bench step cpu fp32 32²"]
    assert step["status"] == "ok" and step["result"]["img_per_s"] > 0
    assert step["result"]["settings"]["device"] == "cpu"
    for v in ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile"):
        assert steps[f"bench step cuda {v}"]["status"] == "skipped"
    assert steps["train 2 epochs + evaluate"]["status"] == "skipped"
    assert "| bench step cpu fp32 32² | ok |" in md
    assert "| train 2 epochs + evaluate | skipped |" in md


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_check_runs_training_through_ray(tmp_path):
    pytest.importorskip("ray")
    out, doc, md = _run(tmp_path, "--skip", "collectives", "--skip", "bench_step",
                        "--skip", "bench_train")
    step = doc["steps"]["train 2 epochs + evaluate"]
    assert step["status"] == "ok", step
    r = step["result"]
    assert r["epochs"] == 2 and r["use_gpu"] is False and r["size"] == 64
    assert 0.0 <= r["final"]["val_cls_auc"] <= 1.0 and r["final"]["train_loss"] > 0
    assert Path(r["evaluation_report"]).is_file() and Path(r["evaluation_json"]).is_file()
    assert (tmp_path / "work" / "runs" / "gpu-check" / "history.json").is_file()
    log = (tmp_path / "gpu_check.log").read_text()
    assert "$ multimix train --config cpu-small --evaluate" in log
    assert doc["host"]["ray"] and "[gpu-check] OK   train 2 epochs + evaluate" in out
    assert "## train 2 epochs + evaluate" in md


def test_gpu_node_imports_without_ray_boto3_isal():
    """The GPU image has no Ray, boto3 or isal: what gpu_check runs without Ray must import."""
    code = ("import sys, argparse\n"
            "for m in ('ray', 'boto3', 'isal'):\n"
            "    sys.modules[m] = None\n"
            "from multimix import cli, train, evaluate, predict\n"
            "from multimix.bench import collectives, step, data, train as bench_train\n"
            "import multimix.bench as b\n"
            "b.add_arguments(argparse.ArgumentParser())\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
