"""a damaged prepared dataset fails on read with one line naming the shard, and
``multimix verify`` lists every problem (Ray-free; damaged COPIES of a tiny real dataset)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from multimix.cli import main
from multimix.config import load_config
from multimix.data import dataset
from multimix.data import verify
from multimix.data.pools import load_labeled_pool
from multimix.data.dataset import read_table
from multimix.errors import DataError
from multimix.testing import kermany_rows, write_dataset

pytestmark = pytest.mark.realdata

SIZE = 32
N = 40


@pytest.fixture(scope="module")
def pristine(shared_data, tmp_path_factory) -> Path:
    """40 real Kermany images at 32 px in 4 shards (8-row groups), with ``shard_info``."""
    root = tmp_path_factory.mktemp("verify") / "kermany"
    write_dataset(str(root), kermany_rows(shared_data, N, SIZE), "cls", SIZE, shards=4,
                  row_group_rows=8)
    verify.add_shard_info(str(root))
    return root


@pytest.fixture
def ds(pristine, tmp_path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "kermany"))


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def _cfg():
    return load_config("cpu-small", [f"data.image_size={SIZE}"])


def _read_fails(root: Path) -> str:
    """Every reader refuses the dataset with the same one line; returns it."""
    msgs = set()
    for read in (lambda: dataset.open_dataset(str(root)),
                 lambda: read_table(str(root), ["id"]),
                 lambda: load_labeled_pool(str(root), [], _cfg())):
        with pytest.raises(DataError) as exc:
            read()
        msgs.add(str(exc.value))
    assert len(msgs) == 1, msgs
    msg = msgs.pop()
    assert "\n" not in msg
    return msg


def _verify_cli(capsys, *roots) -> tuple[int, list]:
    rc = main(["verify", *map(str, roots)])
    return rc, capsys.readouterr().out.strip().splitlines()


def test_intact_dataset_reads_and_verifies(ds, capsys):
    data = dataset.open_dataset(str(ds))
    assert sum(s.rows for s in data.shards) == N
    assert [s.rel for s in data.shards] == _manifest(ds)["shards"]
    assert sum(n for _, _, n in data.row_groups()) == N
    assert read_table(str(ds), ["id"]).num_rows == N
    rc, out = _verify_cli(capsys, ds)
    assert rc == 0 and len(out) == 1
    assert out[0].startswith(f"{ds}: ok: 4 shard(s), {N} rows") and "sha256 match" in out[0]


def test_truncated_shard_named(ds, capsys):
    shard = ds / "data/part-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = _read_fails(ds)
    assert msg == (f"{shard}: {len(data) // 2} bytes, manifest says {len(data)} "
                   "(truncated or replaced)")
    # a dataset prepared before shard_info: the footer read names the shard
    m = _manifest(ds)
    del m["shard_info"]
    _write_manifest(ds, m)
    dataset._MEMO.clear()
    msg = _read_fails(ds)
    assert msg.startswith(f"{shard}: not a readable Parquet file (truncated or damaged: ")
    rc, out = _verify_cli(capsys, ds)
    assert rc == 1 and out == [msg]


def test_missing_shard_named(ds, capsys):
    (ds / "data/part-00002.parquet").unlink()
    msg = _read_fails(ds)
    assert msg == f"{ds}/data/part-00002.parquet: missing (listed in {ds}/manifest.json)"
    rc, out = _verify_cli(capsys, ds)
    assert rc == 1 and out == [msg]


def test_row_count_mismatch_named(ds):
    m = _manifest(ds)
    true_rows = m["shard_info"][3]["rows"]
    m["shard_info"][3]["rows"] = 1000
    _write_manifest(ds, m)
    assert _read_fails(ds) == f"{ds}/data/part-00003.parquet: {true_rows} rows, manifest says 1000"


def test_old_manifest_more_rows_than_shards(ds, capsys):
    """The issue's case: a manifest (no shard_info) says 10,000 rows over the real ones."""
    m = _manifest(ds)
    del m["shard_info"]
    m["num_rows"] = 10000
    _write_manifest(ds, m)
    assert _read_fails(ds) == (f"{ds}: the 4 listed shard(s) hold {N} rows, manifest says "
                               "num_rows=10000")


def test_old_manifest_lists_half_the_shards(ds, capsys):
    """The issue's case: a manifest lists 2 of 4 shards; verify also names the unlisted files."""
    m = _manifest(ds)
    del m["shard_info"]
    m["shards"] = m["shards"][:2]
    _write_manifest(ds, m)
    msg = _read_fails(ds)
    assert msg == f"{ds}: the 2 listed shard(s) hold {N // 2} rows, manifest says num_rows={N}"
    rc, out = _verify_cli(capsys, ds)
    assert rc == 1 and out == [
        msg,
        f"{ds}/data/part-00002.parquet: a shard file the manifest does not list",
        f"{ds}/data/part-00003.parquet: a shard file the manifest does not list"]


def test_flipped_bytes_caught_by_checksum(ds, capsys, pristine):
    """Same size, same footer, damaged pages: only the sha256 sees it (verify, and readers of
    a small local dataset)."""
    shard = ds / "data/part-00000.parquet"
    data = bytearray(shard.read_bytes())
    for i in range(200, 1200, 7):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert dataset.checksum_on_read(str(ds), _manifest(ds))
    msg = _read_fails(ds)
    assert msg.startswith(f"{shard}: sha256 ") and msg.endswith("(damaged)")
    rc, out = _verify_cli(capsys, ds, pristine)
    assert rc == 1 and out[0] == msg and out[1].startswith(f"{pristine}: ok: ")
    assert len(out) == 2


def test_old_manifest_verify_says_no_checksums(ds, capsys):
    m = _manifest(ds)
    del m["shard_info"]
    _write_manifest(ds, m)
    assert dataset.open_dataset(str(ds)).manifest.get("shard_info") is None
    rc, out = _verify_cli(capsys, ds)
    assert rc == 0 and "no checksums recorded" in out[0] and "cannot be checked" in out[0]


def test_not_a_dataset(tmp_path, capsys):
    rc, out = _verify_cli(capsys, tmp_path)
    assert rc == 1 and out == [f"not a prepared dataset: {tmp_path}/manifest.json missing "
                               "(write one with `multimix prepare`)"]


def test_s3_dataset_checked_and_verified(pristine, s3_server, capsys):
    """On S3: the footer checks name the s3:// shard; sha256 is left to `multimix verify`
    (a second download), which checks it."""
    from multimix.config import StorageConfig

    client = s3_server.client()
    bucket = s3_server.make_bucket("faults-verify")
    for f in sorted(pristine.rglob("*")):
        if f.is_file():
            client.put_object(Bucket=bucket, Key=f"k/{f.relative_to(pristine)}",
                              Body=f.read_bytes())
    uri = f"s3://{bucket}/k"
    st = StorageConfig(**s3_server.storage_overrides())
    data = dataset.open_dataset(uri, st)
    assert sum(s.rows for s in data.shards) == N and not dataset.checksum_on_read(uri,
                                                                                 data.manifest)
    sets = [f"storage.{k}={v}" for k, v in s3_server.storage_overrides().items()]
    rc = main(["verify", uri, *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[0].startswith(f"{uri}: ok: 4 shard(s)") and "sha256 match" in out[0]
    client.delete_object(Bucket=bucket, Key="k/data/part-00001.parquet")
    with pytest.raises(DataError) as exc:
        dataset.open_dataset(uri, st)
    assert str(exc.value) == (f"{uri}/data/part-00001.parquet: missing (listed in "
                              f"{uri}/manifest.json)")


def test_shard_schema_checked(ds, capsys):
    """A shard rewritten by another tool: nullability may differ (it reads), a column type
    may not (named)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = ds / "data/part-00002.parquet"
    t = pq.read_table(shard)
    loose = pa.schema([f.with_nullable(True) for f in t.schema])
    pq.write_table(t.cast(loose), shard, row_group_size=8)
    verify.add_shard_info(str(ds))
    assert read_table(str(ds), ["id", "image"]).num_rows == N
    t = t.set_column(t.schema.get_field_index("label"), "label",
                     t.column("label").cast(pa.int64()))
    pq.write_table(t, shard, row_group_size=8)
    verify.add_shard_info(str(ds))
    assert _read_fails(ds) == (f"{shard}: column 'label' is int64, but int32 in "
                               f"{ds}/data/part-00000.parquet")
