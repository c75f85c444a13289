"""``multimix prepare --ray`` (issue #18): the same per-file function run by Ray Data tasks gives
byte-identical shards, the same manifest (apart from ``created``) and the same report as the
single-process path. One local Ray (the session's ``ray_local``), a tiny input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from multimix.data import prepare as prep


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(70):
        a = np.array(Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize(
            (20 + i % 7, 24), Image.Resampling.BICUBIC))
        d = root / f"g{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / (f"x{i}.jpg" if i % 2 else f"x{i}.png"))
    shutil.copy(root / "g0" / "x0.png", root / "g1" / "dup.png")
    (root / "g2" / "bad.png").write_bytes(b"not an image")
    return root


def test_ray_prepare_equals_the_single_process_output(ray_local, tree, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.setattr(prep, "RAY_BATCH", 24)  # 3 blocks and tasks: order must hold
    kw = dict(layout="images", image_size=16, shard_rows=16, progress=True)
    a = prep.prepare(str(tree), str(tmp_path / "a"), workers=1, **kw)
    b = prep.prepare(str(tree), str(tmp_path / "b"), ray=True, **kw)
    assert "prepare src (Ray): 72/72 images" in capsys.readouterr().err
    assert a["num_rows"] == 71 and a["skipped"] == 1 and len(a["shards"]) == 5
    assert a["duplicate_groups"] == [["g0/x0", "g1/dup"]]
    a.pop("created"), b.pop("created")
    assert a == b
    for rel in a["shards"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == json.loads(
        (tmp_path / "b" / "report.json").read_text())


def test_ray_is_chosen_by_flag_or_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert prep.use_ray(None) is False and prep.use_ray(True) is True
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert prep.use_ray(None) is True and prep.use_ray(False) is False


def test_ray_prepare_reads_and_writes_s3(ray_local, s3_server, tree, tmp_path):
    """s3:// in and out on Ray (files read in the tasks through the pickled S3 filesystem): the
    same shards as the local single-process run."""
    from multimix.config import StorageConfig
    from multimix.data import storage

    bucket = s3_server.make_bucket("mm-prepare-ray")
    st = StorageConfig(**s3_server.storage_overrides())
    for f in sorted(p for p in tree.rglob("*") if p.is_file()):
        storage.write_bytes(f"s3://{bucket}/src/{f.relative_to(tree).as_posix()}",
                            f.read_bytes(), st)
    kw = dict(layout="images", image_size=16, shard_rows=32, progress=False)
    a = prep.prepare(str(tree), str(tmp_path / "a"), workers=1, source_name="src", **kw)
    b = prep.prepare(f"s3://{bucket}/src", f"s3://{bucket}/out", ray=True, storage_cfg=st, **kw)
    assert a["shard_info"] == b["shard_info"] and a["num_rows"] == b["num_rows"] == 71
    assert a["duplicate_groups"] == b["duplicate_groups"] and b["skipped"] == 1
    for rel in a["shards"]:
        assert (tmp_path / "a" / rel).read_bytes() == storage.read_bytes(
            f"s3://{bucket}/out/{rel}", st)
