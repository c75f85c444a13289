"""files side: the manifest's shard records, atomic writes, and `prepare --overwrite`
that never loses the previous dataset (a killed rerun, a full disk). Ray-free, tiny images."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimix.data import dataset
from multimix.data import prepare as prep
from multimix.data import storage
from multimix.errors import StorageError


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _folder(root: Path, n: int = 6, seed: int = 0) -> Path:
    """ROOT/{NORMAL,PNEUMONIA}/*.png, ``n`` noise images per class, 32x32."""
    rng = np.random.default_rng(seed)
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(n):
            _save(root / cls / f"{cls[0].lower()}{i}.png",
                  rng.integers(0, 256, (32, 32), dtype=np.uint8))
    return root


def _prepare(src: Path, out: Path, **kw) -> dict:
    kw = {"image_size": 16, "shard_rows": 4, "workers": 1, "progress": False, **kw}
    return prep.prepare(str(src), str(out), **kw)


def _ids(out: Path) -> list[str]:
    return sorted(dataset.read_table(str(out), ["id"]).column("id").to_pylist())


def _no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp")]


def test_manifest_records_every_shard_with_rows_bytes_and_sha256(tmp_path):
    out = tmp_path / "out"
    m = _prepare(_folder(tmp_path / "src"), out)
    info = m["shard_info"]
    assert [i["path"] for i in info] == m["shards"] and len(info) == 3  # 12 rows, 4 per shard
    assert all(set(i) == {"path", "rows", "bytes", "sha256"} for i in info)
    assert sum(i["rows"] for i in info) == m["num_rows"] == 12
    for i in info:
        data = (out / i["path"]).read_bytes()
        assert i["bytes"] == len(data)
        assert i["sha256"] == hashlib.sha256(data).hexdigest()
        assert i["rows"] == prep.pq.read_metadata(out / i["path"]).num_rows
    assert json.loads((out / "manifest.json").read_text())["shard_info"] == info
    assert _no_temp_files(out) == []


def _disk_full(monkeypatch) -> None:
    """Every file opened through ``os.fdopen`` (the atomic writer's temporary file) gets the
    first 3 bytes of a write onto the disk, then ENOSPC."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:3])  # part of it reached the disk, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))


def test_write_bytes_replaces_atomically_and_a_full_disk_keeps_the_old_file(tmp_path,
                                                                           monkeypatch):
    target = tmp_path / "d" / "manifest.json"
    storage.write_text(str(target), "old\n")
    assert target.read_text() == "old\n" and oct(target.stat().st_mode & 0o777) == "0o644"
    storage.write_text(str(target), "new\n")
    assert target.read_text() == "new\n"

    _disk_full(monkeypatch)
    with pytest.raises(StorageError) as e:
        storage.write_text(str(target), "a much longer new text\n")
    assert str(e.value) == f"{target}: no space left on device (disk full)"
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]


def test_a_killed_overwrite_keeps_the_old_dataset_and_the_next_run_cleans_up(tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "out"
    old = _prepare(_folder(tmp_path / "a", n=6, seed=1), out)
    old_ids = _ids(out)
    (out / "splits").mkdir()
    (out / "splits" / "s.json").write_text("{}")
    src_b = _folder(tmp_path / "b", n=5, seed=2)
    (src_b / "NORMAL" / "extra.png").write_bytes((src_b / "NORMAL" / "n0.png").read_bytes())

    real = prep._results

    def killed(*a, **kw):  # the process dies after 6 rows (1 new shard written)
        for k, item in enumerate(real(*a, **kw)):
            if k == 6:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(prep, "_results", killed)
    with pytest.raises(KeyboardInterrupt):
        _prepare(src_b, out, overwrite=True)
    # the old dataset is complete and readable: its manifest, its shards, its splits
    assert dataset.read_manifest(str(out)) == old and _ids(out) == old_ids
    assert (out / "splits" / "s.json").exists()
    orphans = set(storage.list_files(str(out / "data"))) - {s[5:] for s in old["shards"]}
    assert orphans  # the killed run's shards, named by no manifest
    (out / "data" / ".part-00001.parquet.k1ll3d.tmp").write_bytes(b"half a shard")

    monkeypatch.setattr(prep, "_results", real)
    new = _prepare(src_b, out, overwrite=True)
    assert new["num_rows"] == 11 and len(_ids(out)) == 11 and "NORMAL/extra" in _ids(out)
    assert not set(new["shards"]) & set(old["shards"])
    # the old shards, the orphans, the temp file and the old splits are gone; only the new
    # shards remain
    assert sorted("data/" + f for f in storage.list_files(str(out / "data"))) == sorted(
        new["shards"])
    assert not (out / "splits").exists() and _no_temp_files(out) == []


def test_a_failing_manifest_write_leaves_the_previous_manifest(tmp_path, monkeypatch):
    """The new manifest is the commit point: if writing it fails (disk full), the previous one
    and every shard it names are still there."""
    out = tmp_path / "out"
    old = _prepare(_folder(tmp_path / "a", n=4, seed=3), out)
    real = storage.write_text

    def full(uri, text, st=None):
        if uri.endswith("manifest.json"):
            raise StorageError(f"{uri}: no space left on device (disk full)")
        return real(uri, text, st)

    monkeypatch.setattr(storage, "write_text", full)
    with pytest.raises(StorageError, match="no space left"):
        _prepare(_folder(tmp_path / "b", n=3, seed=4), out, overwrite=True)
    assert dataset.read_manifest(str(out)) == old
    assert len(_ids(out)) == old["num_rows"] == 8


def test_overwrite_on_s3_replaces_the_dataset_and_records_the_uploaded_bytes(s3_server,
                                                                            tmp_path):
    from multimix.config import StorageConfig

    bucket = s3_server.make_bucket("mm-overwrite-faults")
    st = StorageConfig(**s3_server.storage_overrides())
    uri = f"s3://{bucket}/ds"
    old = _prepare(_folder(tmp_path / "a", n=3, seed=5), uri, storage_cfg=st)
    new = _prepare(_folder(tmp_path / "b", n=5, seed=6), uri, storage_cfg=st, overwrite=True)
    assert dataset.read_manifest(uri, st) == new and not set(new["shards"]) & set(old["shards"])
    assert sorted(storage.list_files(uri, st)) == sorted(new["shards"] + ["manifest.json",
                                                                          "report.json"])
    for i in new["shard_info"]:
        data = storage.read_bytes(storage.join(uri, i["path"]), st)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (i["bytes"], i["sha256"])
    assert len(dataset.read_table(uri, ["id"], st)) == new["num_rows"] == 10


def test_tune_and_table_reports_are_replaced_whole_on_a_full_disk(tmp_path, monkeypatch):
    """results.csv / results.md / best.yaml / paper_table.* and plots go through
    ``storage.replace_local``: a full disk keeps the previous file whole, no temporary left."""
    from multimix import plots

    target = tmp_path / "exp" / "results.csv"
    storage.replace_local(target, "trial,score\nt1,0.5\n")
    _disk_full(monkeypatch)
    with pytest.raises(StorageError, match="no space left on device"):
        storage.replace_local(target, "trial,score\nt1,0.5\nt2,0.7\n")
    with pytest.raises(StorageError, match="no space left on device"):
        plots.plot_learning_curves({"t1": ([0, 1], [0.4, 0.5])}, "val_score",
                                   tmp_path / "exp" / "learning_curves.png")
    assert target.read_text() == "trial,score\nt1,0.5\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.csv"]
