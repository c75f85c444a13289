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


def test_baseline_step_has_the_same_objective_as_train_step():
    """The benchmark's naive step and :func:`train_step` on one batch (dropout off, same weights):
    every loss term and every gradient agree, so ``bench step`` compares costs of one objective."""
    import argparse
    import copy

    import torch

    from multimix.bench import step as bench
    from multimix.engine import build_optimizer, train_step
    from multimix.model import create_model
    from multimix.objective import TERM_KEYS

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--size", "32", "--batch", "3", "--width", "0.25", "--threads", "1"])
    cfg, device, _, _, batch = bench._setup(args)  # the benchmark's own batch and config
    cfg.model.dropout = 0.0  # the two steps draw dropout masks in different orders
    cfg.objective.threshold = 0.5  # two classes: every pseudo-label accepted, ce_pseudo > 0
    torch.manual_seed(0)
    ours = create_model(cfg.model)
    base = copy.deepcopy(ours)
    opt_ours, _ = build_optimizer(ours, cfg)
    opt_base, _ = build_optimizer(base, cfg)

    t_ours = train_step(ours, batch, opt_ours, cfg, device)
    t_base = bench.naive_train_step(base, batch, opt_base, cfg, device)

    assert set(t_ours) == set(t_base) == set(TERM_KEYS)
    for k in ("ce_sup", "ce_pseudo", "dice", "kl", "loss"):
        assert t_ours[k] > 0, f"{k} is 0: the comparison would not see a change in it"
    assert t_ours["accept_rate"] == t_base["accept_rate"] == 1.0
    for k in TERM_KEYS:
        assert abs(t_ours[k] - t_base[k]) <= 1e-5 * max(1.0, abs(t_ours[k])), \
            (k, t_ours[k], t_base[k])
    grads = [(n, a.grad, b.grad) for (n, a), b in zip(ours.named_parameters(), base.parameters())]
    assert all(ga is not None and gb is not None for _, ga, gb in grads)
    for name, ga, gb in grads:
        scale = max(float(ga.abs().max()), 1e-8)
        assert float((ga - gb).abs().max()) <= 1e-4 * scale, name
