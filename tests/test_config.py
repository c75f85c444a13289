"""multimix.config: presets, --set overrides, type and range validation, secrets kept out."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from multimix.config import (
    Config,
    ConfigError,
    StorageConfig,
    list_presets,
    load_config,
    parse_overrides,
)

AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(autouse=True)
def _no_aws_env(monkeypatch):
    for v in AWS_VARS:
        monkeypatch.delenv(v, raising=False)


def test_defaults_are_the_papers_hyper_parameters_and_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    o = cfg.objective
    assert (o.threshold, o.lambda_u, o.alpha, o.beta) == (0.7, 0.25, 5.0, 0.01)
    assert (cfg.data.image_size, cfg.optim.lr, cfg.optim.step_size) == (256, 1e-4, 8)


def test_presets_load_and_inherit():
    assert {"paper", "cpu-small"} <= set(list_presets())
    paper = load_config("paper")
    small = load_config("cpu-small")
    assert paper.scaling.use_gpu is True and paper.data.image_size == 256
    assert small.data.image_size == 64 and small.model.width == 0.5
    assert small.objective == paper.objective  # inherited through `base: paper`
    assert small.optim.lr == 1e-3 and small.optim.gamma == paper.optim.gamma


def test_yaml_file_with_base_and_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"base": "cpu-small", "objective": {"threshold": 0.9}}))
    cfg = load_config(str(f), ["objective.threshold=0.8", "data.cls_labeled=all",
                               "optim.steps_per_epoch=null", "model.variant=enc-ssl"])
    assert cfg.objective.threshold == 0.8 and cfg.data.cls_labeled == "all"
    assert cfg.optim.steps_per_epoch is None and cfg.model.variant == "enc-ssl"
    assert cfg.data.image_size == 64
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_parse_overrides_types_and_errors():
    out = parse_overrides(["a.b=0.5", "a.c=true", "a.d=null", "e=all", "a.f=7", "g.h=x=y",
                           "s="])
    assert out == {"a": {"b": 0.5, "c": True, "d": None, "f": 7}, "e": "all", "g": {"h": "x=y"},
                   "s": ""}
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="not a section"):
        parse_overrides(["a=1", "a.b=2"])


@pytest.mark.parametrize("override,match", [
    (["objective.treshold=0.5"], "unknown key objective.treshold"),
    (["nosuch.key=1"], "unknown key nosuch"),
    (["data=3"], "data: expected a mapping"),
    (["optim.epochs=ten"], "optim.epochs: expected an integer"),
    (["optim.epochs=2.5"], "optim.epochs: expected an integer"),
    (["optim.epochs=true"], "optim.epochs: expected an integer"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["optim.channels_last=1"], "optim.channels_last: expected true or false"),
    (["optim.precision=fp8"], "optim.precision: expected 'none' or 'bf16'"),
    (["data.cls_labeled=some"], "data.cls_labeled: expected"),
    (["data.unlabeled_data=3"], "data.unlabeled_data: expected a list"),
])
def test_wrong_keys_and_types_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


@pytest.mark.parametrize("override,match", [
    ("objective.threshold=0", "objective.threshold: must be in the open interval"),
    ("objective.threshold=1", "objective.threshold: must be in the open interval"),
    ("objective.threshold=1.5", "objective.threshold: must be in the open interval"),
    ("objective.lambda_u=-0.1", "objective.lambda_u: must be >= 0"),
    ("objective.alpha=-1", "objective.alpha: must be >= 0"),
    ("objective.beta=-0.01", "objective.beta: must be >= 0"),
    ("data.image_size=100", "data.image_size: must be a positive multiple of 32"),
    ("data.image_size=0", "data.image_size"),
    ("data.cls_labeled=0", "data.cls_labeled: must be a positive"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("model.variant=resnet", "model.variant: must be one of"),
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("augment.magnitude=11", "augment.magnitude"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("data.shuffle_buffer_rows=-1", "data.shuffle_buffer_rows: must be >= 0"),
])
def test_out_of_range_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, [override])
    assert "got" in str(err.value)


def test_use_gpu_needs_a_gpu_per_worker():
    with pytest.raises(ConfigError, match="scaling.gpus_per_worker: must be > 0 when "
                                          "scaling.use_gpu is true, got 0"):
        load_config("cpu-small", ["scaling.use_gpu=true"])  # cpu-small: gpus_per_worker 0
    assert load_config("cpu-small", ["scaling.use_gpu=true",
                                     "scaling.gpus_per_worker=0.5"]).scaling.gpus_per_worker == 0.5


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["objective.threshold=0.01", "objective.lambda_u=0",
                             "data.image_size=32", "data.val_fraction=0", "optim.lr=1",
                             "data.shuffle_buffer_rows=0"])
    assert cfg.data.image_size == 32 and cfg.objective.lambda_u == 0.0
    assert isinstance(cfg.optim.lr, float)  # ints widen to floats


def test_secrets_stay_out_of_repr_and_to_dict_but_reach_the_config(monkeypatch):
    cfg = load_config(None, ["storage.access_key_id=AKIDSECRETID",
                             "storage.secret_access_key=very-secret-value",
                             "storage.endpoint=http://127.0.0.1:8333"])
    assert cfg.storage.secret_access_key == "very-secret-value"
    for text in (repr(cfg), str(cfg), repr(cfg.storage), str(cfg.to_dict()),
                 yaml.safe_dump(cfg.to_dict())):
        assert "very-secret-value" not in text and "AKIDSECRETID" not in text
    assert cfg.to_dict()["storage"] == {"endpoint": "http://127.0.0.1:8333", "region": None}
    assert cfg.to_dict(include_secrets=True)["storage"]["secret_access_key"] == (
        "very-secret-value")
    # round trip: a dict written by to_dict() loads back to an equal config (minus secrets)
    again = load_config(cfg.to_dict())
    assert dataclasses.replace(again, storage=StorageConfig()) == dataclasses.replace(
        cfg, storage=StorageConfig())


def test_storage_takes_endpoint_and_region_but_never_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.local:9000")
    cfg = load_config()
    st = cfg.storage
    assert (st.region, st.endpoint) == ("eu-central-1", "http://s3.local:9000")
    # keys stay with the AWS chain of whichever process uses the filesystem
    assert (st.access_key_id, st.secret_access_key, st.session_token) == (None, None, None)
    assert "envsecret" not in repr(cfg) and "envsecret" not in str(cfg.to_dict(True))
    explicit = load_config(None, ["storage.region=us-west-2"])
    assert explicit.storage.region == "us-west-2"  # the config wins over the environment


@pytest.mark.parametrize("key,value,now", [("reader", "read_parquet", "row-group reader"),
                                           ("reader", "row_groups", "row-group reader"),
                                           ("sharding", "per_worker", "split across")])
def test_removed_data_keys_are_one_clear_error(tmp_path, key, value, now):
    """data.reader / data.sharding were removed: setting one (even to the value now always
    used), by --set or in a YAML file, is one line naming the key and what is used now."""
    with pytest.raises(ConfigError, match=f"^data.{key} was removed: .*{now}") as err:
        load_config("cpu-small", [f"data.{key}={value}"])
    assert "\n" not in str(err.value)
    path = tmp_path / "old.yaml"
    path.write_text(f"base: paper\ndata:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=f"^data.{key} was removed"):
        load_config(str(path))


def test_a_stored_config_with_removed_keys_still_loads():
    """Checkpoints written before data.reader / data.sharding were removed hold them (with
    the values now always used): a checkpoint's config drops them and loads."""
    from multimix.config import without_removed_keys

    old = load_config("cpu-small").to_dict()
    old["data"].update(reader="row_groups", sharding="streaming_split")
    assert load_config(without_removed_keys(old)) == load_config("cpu-small")
    assert old["data"]["reader"] == "row_groups"  # the input is left as it was


def test_set_values_are_read_by_the_type_of_their_field():
    # YAML alone reads 2024_01 as the integer 202401 and true as a bool: a string field keeps
    # the text as written
    cfg = load_config("cpu-small", ["run.name=2024_01", "model.variant=enc"])
    assert cfg.run.name == "2024_01"
    assert load_config("cpu-small", ["run.name=true"]).run.name == "true"
    assert parse_overrides(["run.name=007"]) == {"run": {"name": "007"}}
    # numbers, booleans and null still parse where the field wants them
    cfg = load_config("cpu-small", ["optim.epochs=3", "data.cls_labeled=50", "optim.lr=0.5"])
    assert (cfg.optim.epochs, cfg.data.cls_labeled, cfg.optim.lr) == (3, 50, 0.5)
    assert parse_overrides(["storage.endpoint=null"]) == {"storage": {"endpoint": None}}
    assert load_config("cpu-small", ["data.cls_labeled=all"]).data.cls_labeled == "all"
    # PyYAML reads 1e-4 (no dot) as a string; a float field takes it as the number
    assert load_config("cpu-small", ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)
    assert load_config({"optim": {"lr": "2.5E-3"}}).optim.lr == pytest.approx(2.5e-3)
    # a YAML file is read as YAML: there a string field needs quotes
    with pytest.raises(ConfigError, match="run.name: expected a string, got 3"):
        load_config({"run": {"name": 3}})
    # a value that fits neither way is still an error naming the field
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'abc'"):
        load_config("cpu-small", ["optim.lr=abc"])
    with pytest.raises(ConfigError, match="optim.epochs: expected an integer"):
        load_config("cpu-small", ["optim.epochs=2.5"])
    # unknown keys pass through unparsed by type and are reported by load_config
    assert parse_overrides(["nosuch.key=2024_01"]) == {"nosuch": {"key": 202401}}
