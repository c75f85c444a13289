"""multimix.data.storage and prepare/split on a real S3 server (SeaweedFS, fixture ``s3_server``):
round trips through pyarrow and Ray Data, clear errors, and no secret in any output."""

from __future__ import annotations

import argparse
import io
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from multimix.config import StorageConfig
from multimix.data import dataset
from multimix.data import prepare as prep
from multimix.data import splits as sp
from multimix.data import storage
from multimix.data.images import decode_png
from multimix.errors import DataError, StorageError

AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


# ---------------------------------------------------------------------------------------------
# no server needed


def test_resolve_local_paths(tmp_path, monkeypatch):
    fs, path = storage.resolve(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    assert storage.resolve(f"file://{tmp_path}/b")[1] == str(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("rel/x")[1] == str(tmp_path / "rel" / "x")
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket name"):
        storage.resolve("s3:///x")


def test_resolve_s3_settings_without_network():
    st = StorageConfig(endpoint="http://127.0.0.1:9", region="eu-west-1", access_key_id="AK",
                       secret_access_key="SK")
    fs, path = storage.resolve("s3://bucket/a//b/", st)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b"
    assert fs.region == "eu-west-1"
    with pytest.raises(StorageError, match="must be set together"):
        storage.resolve("s3://b/x", StorageConfig(access_key_id="AK"))
    with pytest.raises(StorageError, match="storage.endpoint"):
        storage.resolve("s3://b/x", StorageConfig(endpoint="ftp://host"))
    assert storage._endpoint_parts("https://minio.example:9000") == ("minio.example:9000",
                                                                      "https")
    assert storage._endpoint_parts("host:9000") == ("host:9000", "https")


def test_a_uri_that_lost_a_slash_is_an_error_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("s3:/bucket/x", "./s3:/bucket/x", "file:/x"):
        with pytest.raises(StorageError, match="missing slash"):
            storage.resolve(bad)
        with pytest.raises(StorageError, match="missing slash"):
            with storage.staged_output(bad):
                pass
    assert not any(tmp_path.iterdir())  # nothing was created
    assert storage.resolve("s3_x/y")[1] == str(tmp_path / "s3_x" / "y")


def test_pickled_filesystems_carry_no_keys_unless_the_config_sets_them(monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEYID0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-0123456789")
    chain = StorageConfig(endpoint="http://127.0.0.1:9", region="eu-west-1")
    blob = pickle.dumps(storage.resolve("s3://b/x", chain)[0])
    assert b"ENVKEYID0001" not in blob and b"env-secret-0123456789" not in blob
    explicit = StorageConfig(endpoint="http://127.0.0.1:9", region="eu-west-1",
                             access_key_id="CFGKEYID0001", secret_access_key="cfg-secret-0123")
    assert b"cfg-secret-0123" in pickle.dumps(storage.resolve("s3://b/x", explicit)[0])
    # what train/tune hand to Ray: the same endpoint and region, no keys
    keyless = storage.chain_storage(explicit)
    assert (keyless.endpoint, keyless.region) == (explicit.endpoint, explicit.region)
    assert b"cfg-secret-0123" not in pickle.dumps(storage.resolve("s3://b/x", keyless)[0])


def test_export_keys_puts_config_keys_into_the_environment(monkeypatch):
    for v in AWS_VARS:
        monkeypatch.delenv(v, raising=False)
    assert storage.export_keys(StorageConfig(endpoint="http://h:1")) is False
    assert "AWS_ACCESS_KEY_ID" not in __import__("os").environ
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stale-token")
    assert storage.export_keys(StorageConfig(access_key_id="AK1", secret_access_key="SK1"))
    env = __import__("os").environ
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("AK1", "SK1")
    assert "AWS_SESSION_TOKEN" not in env  # not mixed with another identity's token
    with pytest.raises(StorageError, match="must be set together"):
        storage.export_keys(StorageConfig(secret_access_key="SK1"))


def test_join_and_local_helpers(tmp_path):
    assert storage.join("s3://b/p/", "data", "x.parquet") == "s3://b/p/data/x.parquet"
    assert storage.join(str(tmp_path), "m.json") == str(tmp_path / "m.json")
    uri = storage.join(str(tmp_path), "deep", "f.txt")
    storage.write_text(uri, "hi")
    assert storage.read_text(uri) == "hi" and storage.exists(uri)
    assert storage.list_files(str(tmp_path)) == ["deep/f.txt"]
    storage.delete_dir(str(tmp_path / "deep"))
    assert not storage.exists(uri)
    with pytest.raises(DataError, match="no such file"):
        storage.read_bytes(uri)


# ---------------------------------------------------------------------------------------------
# against the S3 server


def _bucket(s3_server) -> str:
    return s3_server.make_bucket(f"mm-{uuid.uuid4().hex[:10]}")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20), np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def aws_env(monkeypatch, s3_server):
    """The server's settings as AWS_* environment variables only (no --set)."""
    for v in AWS_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return s3_server


def _cli(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return module.run(p.parse_args(argv))


def test_s3_source_to_s3_dataset_round_trip_without_leaking_the_secret(aws_env, capfd,
                                                                       tmp_path):
    s3 = aws_env
    bucket = _bucket(s3)
    client = s3.client()
    for i in range(40):  # > one pool chunk: the decoding processes read from S3 too
        client.put_object(Bucket=bucket, Key=f"raw/{'AB'[i % 2]}/img{i:02d}.png", Body=_png(i))
    client.put_object(Bucket=bucket, Key="raw/B/broken.png", Body=b"\x89PNG broken")
    out = f"s3://{bucket}/prepared/v1"
    assert _cli(prep, [f"s3://{bucket}/raw", "--out", out, "--size", "16", "--workers", "2"]) == 0
    assert _cli(sp, [out, "--labeled", "10"]) == 0
    captured = capfd.readouterr()
    assert "40 rows (A 20, B 20)" in captured.out and "1 skipped" in captured.out
    assert f"{out}/splits/L10-V0.1-S0.json" in captured.out

    st = StorageConfig(endpoint=s3.endpoint, region=s3.region, access_key_id=s3.access_key,
                       secret_access_key=s3.secret_key)
    m = dataset.read_manifest(out, st)
    assert m["num_rows"] == 40 and m["skipped"] == 1 and m["source"] == "raw"
    table = dataset.read_table(out, ["id", "image", "label"], st)
    assert table.num_rows == 40 and decode_png(table.column("image")[0].as_py()).shape == (16, 16)
    assert len(sp.ensure_split(out, 10, 0.1, 0, st).labeled) == 10  # reused from S3

    # the secret is nowhere: not in stdout/stderr, not in any object written
    everything = captured.out + captured.err
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="prepared/")["Contents"]:
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        assert s3.secret_key.encode() not in body, obj["Key"]
        assert s3.access_key.encode() not in body, obj["Key"]
    assert s3.secret_key not in everything and s3.access_key not in everything


@pytest.mark.slow
def test_s3_dataset_reads_with_ray_data(s3_server, ray_local, tmp_path):
    st = StorageConfig(endpoint=s3_server.endpoint, region=s3_server.region,
                       access_key_id=s3_server.access_key,
                       secret_access_key=s3_server.secret_key)
    out = f"s3://{_bucket(s3_server)}/demo"
    prep.prepare_demo(out, n_cls=24, n_seg=8, image_size=32, storage_cfg=st, shard_rows=10)
    uri = storage.join(out, "cls")
    m = dataset.read_manifest(uri, st)
    assert len(m["shards"]) == 3
    fs, _ = storage.resolve(uri, st)
    # read by directory: Ray 2.60 lists a *list* of paths in threads that race on an optional
    # fsspec import (ImportError without aiohttp); one directory is listed once
    ds = ray_local.data.read_parquet(storage.resolve(storage.join(uri, "data"), st)[1],
                                     filesystem=fs).select_columns(["id", "image", "label"])
    rows = ds.take_all()
    assert len(rows) == 24
    assert sorted(r["id"] for r in rows) == sorted(dataset.read_table(uri, ["id"], st).column(
        "id").to_pylist())
    assert {decode_png(r["image"]).shape for r in rows} == {(32, 32)}
    assert sorted(int(r["label"]) for r in rows) == [0] * 12 + [1] * 12


def test_wrong_credentials_are_one_clear_error(s3_server, tmp_path):
    bucket = _bucket(s3_server)
    bad = StorageConfig(endpoint=s3_server.endpoint, region=s3_server.region,
                        access_key_id=s3_server.access_key,
                        secret_access_key="wrong-secret-value-42")
    with pytest.raises(StorageError) as err:
        prep.prepare_demo(f"s3://{bucket}/x", n_cls=4, n_seg=2, image_size=16, storage_cfg=bad)
    msg = str(err.value)
    assert msg.startswith(f"access denied to s3://{bucket}/x")
    assert "AWS_ACCESS_KEY_ID" in msg and "wrong-secret-value-42" not in msg
    with pytest.raises(StorageError, match="access denied"):
        dataset.read_manifest(f"s3://{bucket}/x", bad)


def test_missing_bucket_is_one_clear_error_and_is_not_created(s3_server, tmp_path):
    st = StorageConfig(endpoint=s3_server.endpoint, region=s3_server.region,
                       access_key_id=s3_server.access_key,
                       secret_access_key=s3_server.secret_key)
    name = f"absent-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "src"
    for c in ("A", "B"):
        (src / c).mkdir(parents=True)
        (src / c / "x.png").write_bytes(_png(1))
    with pytest.raises(StorageError, match=f"bucket '{name}' does not exist at "
                                           f"{s3_server.endpoint}"):
        prep.prepare(str(src), f"s3://{name}/ds", image_size=16, storage_cfg=st, progress=False)
    with pytest.raises(StorageError, match=f"bucket '{name}' does not exist"):
        storage.write_bytes(f"s3://{name}/f.txt", b"x", st)
    with pytest.raises(StorageError, match=f"bucket '{name}' does not exist"):
        dataset.read_manifest(f"s3://{name}/ds", st)
    buckets = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert name not in buckets


def test_unreachable_endpoint_is_a_storage_error():
    st = StorageConfig(endpoint="http://127.0.0.1:9", access_key_id="a",
                       secret_access_key="b-secret")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        storage.exists("s3://bucket/x", st)


def test_staged_output_lands_on_s3_and_a_missing_bucket_fails_first(s3_server, tmp_path):
    bucket = _bucket(s3_server)
    st = StorageConfig(endpoint=s3_server.endpoint, region=s3_server.region,
                       access_key_id=s3_server.access_key, secret_access_key=s3_server.secret_key)
    uri = f"s3://{bucket}/eval/run1"
    with storage.staged_output(uri, st) as d:
        (d / "report.md").write_text("# ok")
        (d / "plots").mkdir()
        (d / "plots" / "roc.png").write_bytes(b"png")
        assert storage.output_uri(uri, d, d / "plots" / "roc.png") == f"{uri}/plots/roc.png"
    assert storage.list_files(uri, st) == ["plots/roc.png", "report.md"]
    assert storage.read_text(f"{uri}/report.md", st) == "# ok"
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        with storage.staged_output("s3://no-such-bucket-x/out", st):
            raise AssertionError("the block must not run")
    local = tmp_path / "out"
    with storage.staged_output(str(local)) as d:
        assert d == local and d.is_dir()
        assert storage.output_uri(str(local), d, d / "a.txt") == str(local / "a.txt")
