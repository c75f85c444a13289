"""`multimix bench data` runs and reports its numbers (tiny sizes; not a timed test)."""

from __future__ import annotations

import argparse
import json

import pytest

from multimix.bench import data as bench


def test_bench_data_json_no_e2e(capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--size", "64", "--n", "8", "--reps", "1", "--no-e2e", "--json",
                         "--synthetic", "--no-malloc-tuning"])
    assert bench.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("img_per_s_per_core", "baseline_img_per_s_per_core", "ratio"):
        assert out[key] > 0
    assert out["source"] == "synthetic" and out["malloc_tuned"] is False


@pytest.mark.slow
def test_bench_data_e2e_local(ray_local, capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--size", "64", "--n", "16", "--reps", "1", "--e2e-passes", "1",
                         "--json", "--synthetic", "--batch", "8", "--e2e-rows", "16"])
    assert bench.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["e2e_img_per_s_per_core"] > 0 and out["e2e_s3"].startswith("skipped")
    for key in ("decode_augment_img_per_s_per_core", "e2e_vs_bare", "e2e_vs_decode_augment",
                "e2e_img_per_cpu_s", "object_store_put_ms_per_img",
                "e2e_steady_img_per_s_per_core", "e2e_transport_img_per_s_per_core",
                "e2e_transport_img_per_cpu_s", "e2e_transport_vs_bare"):
        assert out[key] > 0, key
    assert out["e2e_shuffle_buffer_rows"] == 0  # data.shuffle_buffer_rows default
    assert all(out[f"e2e{t}_consumer_cpu_ms_per_img"] >= 0
               for t in ("", "_transport"))
    assert not any("read_parquet" in k or "sharding" in k for k in out)  # one reader, one mode
    assert out["png_level"] == 0 and out["png_kb_per_img"] > 64 * 65 / 1024  # stored, as prepare


def test_bench_data_table(capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--size", "32", "--n", "4", "--reps", "1", "--no-e2e", "--synthetic"])
    assert bench.run(args) == 0
    text = capsys.readouterr().out
    assert "decode + fast pair" in text and "fast / paper" in text
