"""``multimix bench scale`` at a modest N (6,000 rows, 32 px, one epoch of 2 steps): the corpus is
a valid prepared ``unlabeled`` dataset reused on the second call, and the JSON has every figure
with sane values (no timing assertions)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from multimix.bench import scale as B


def test_corpus_is_a_prepared_unlabeled_set_and_is_reused(tmp_path):
    from multimix.data.dataset import open_dataset

    uri = str(tmp_path / "c")
    man = B.write_corpus(uri, 300, 32, base=8)
    assert man["task"] == "unlabeled" and man["num_rows"] == 300 and man["image_size"] == 32
    assert man["duplicate_groups"] == []  # every row distinct (index stamped in)
    ds = open_dataset(uri)
    assert sum(s.rows for s in ds.shards) == 300
    stamp = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns
    assert B.write_corpus(uri, 300, 32, base=8)["created"] == man["created"]  # reused
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns == stamp
    assert B.write_corpus(uri, 200, 32, base=8)["num_rows"] == 200  # other N: written again


@pytest.mark.slow
def test_bench_scale_json_has_sane_figures(ray_local, tmp_path, capsys):
    p = argparse.ArgumentParser()
    B.add_arguments(p)
    args = p.parse_args(["--rows", "6000", "--size", "32", "--steps", "2", "--epochs", "1",
                         "--work",
                         str(tmp_path / "work"), "--json"])
    assert B.run(args) == 0
    res = json.loads(capsys.readouterr().out)  # --json: stdout is the JSON line alone
    assert set(B.KEYS) <= set(res)
    assert res["baseline"]["rows"] == 5000 and res["scaled"]["rows"] == 6000
    for key in ("baseline", "scaled"):
        r = res[key]
        assert set(B.RUN_KEYS) <= set(r)
        assert 50 < r["driver_peak_mb"] < 16_000
        assert len(r["train_worker_peak_mb"]) == 1  # cpu-small: one Train worker
        assert all(50 < m < 16_000 for m in r["train_worker_peak_mb"])
        assert r["largest_peak_mb"] == max(r["driver_peak_mb"], r["ray_worker_peak_mb"],
                                           *r["train_worker_peak_mb"])
        assert r["object_store_peak_mb"] is None or r["object_store_peak_mb"] >= 0
        assert r["steps_per_s"] > 0 and math.isfinite(r["steps_per_s"])
    assert res["peak_mem_ratio"] == pytest.approx(
        res["scaled"]["largest_peak_mb"] / res["baseline"]["largest_peak_mb"], rel=5e-3)
    assert res["steps_per_s_ratio"] == pytest.approx(
        res["scaled"]["steps_per_s"] / res["baseline"]["steps_per_s"], rel=5e-3)
    assert 0.5 < res["peak_mem_ratio"] < 2 and res["steps_per_s_ratio"] > 0  # sane, not a goal
