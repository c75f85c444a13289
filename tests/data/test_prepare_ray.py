"""``multimix prepare --ray``: the same per-file function run by Ray Data tasks gives
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


def test_ray_prepare_equals_the_single_process_output(ray_local, tree, tmp_path, capsys):
    # 5 chunks of 16 records: 5 tasks, each writing its shard; the order must hold
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


def test_ray_tasks_write_the_shards_and_strict_leaves_nothing(ray_local, tree, tmp_path):
    """--strict on Ray: the chunk holding the bad file writes nothing, the driver stops at it
    and removes the shards other tasks wrote; no manifest, nothing left under data/."""
    from multimix.errors import DataError

    out = tmp_path / "strict"
    with pytest.raises(DataError, match=r"bad\.png.*--strict"):
        prep.prepare(str(tree), str(out), layout="images", image_size=16, shard_rows=8,
                     progress=False, ray=True, strict=True)
    assert not (out / "manifest.json").exists() and not list(out.glob("data/*"))


def test_a_chunk_past_the_byte_cap_is_split_into_numbered_shards(tmp_path):
    from multimix.data import storage

    rows = [{"id": f"r{i}", "source": "s", "task": "unlabeled", "image": bytes([i]) * 100,
             "hash": f"{i:064x}", "path": f"r{i}.png", "orig_height": 4, "orig_width": 4}
            for i in range(5)]
    target = prep.ShardTarget(str(tmp_path / "ds"), "part-", shard_bytes=250)
    infos = prep.write_chunk(target, 3, rows)
    assert [i["path"] for i in infos] == ["data/part-00003.parquet", "data/part-00003-1.parquet",
                                          "data/part-00003-2.parquet"]
    assert [i["rows"] for i in infos] == [2, 2, 1]
    got = [r for i in infos for r in prep.pq.read_table(tmp_path / "ds" / i["path"])
           .column("id").to_pylist()]
    assert got == [r["id"] for r in rows]
    assert infos[0]["sha256"] == prep.hashlib.sha256(storage.read_bytes(
        str(tmp_path / "ds" / infos[0]["path"]))).hexdigest()
    assert prep.write_chunk(target, 4, []) == []


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
