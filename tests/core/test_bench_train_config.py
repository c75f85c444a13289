"""``bench train --device cpu`` picks a worker that fits the local machine (the paper preset
asks 4 CPUs per worker) and says so; values given with --set are kept. Ray-free."""

from __future__ import annotations

import argparse

from multimix.bench.train import _config, add_arguments


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_paper_on_two_cpus_fits_and_says_so(capsys):
    cfg = _config(_args("--device", "cpu", "--cpus", "2"), "/data", "/runs")
    assert (cfg.scaling.cpus_per_worker, cfg.scaling.data_cpus_per_task) == (1.0, 0.5)
    assert capsys.readouterr().err.strip() == (
        "[bench train] paper on 2 local CPUs: scaling.cpus_per_worker 1 (was 4), "
        "scaling.data_cpus_per_task 0.5 (was 1); --set to choose others")
    big = _config(_args("--device", "cpu", "--cpus", "16"), "/data", "/runs")
    assert big.scaling.cpus_per_worker == 4 and capsys.readouterr().err == ""


def test_set_values_are_kept(capsys):
    cfg = _config(_args("--device", "cpu", "--cpus", "2", "--set",
                        "scaling.cpus_per_worker=1.5"), "/data", "/runs")
    assert cfg.scaling.cpus_per_worker == 1.5 and cfg.scaling.data_cpus_per_task == 0.5
