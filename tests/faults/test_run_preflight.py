"""wrong inputs to ``train`` / ``tune`` / ``experiment paper-table`` fail
before Ray starts, with one line naming the key, and write nothing into the datasets; a labeled
or validation pool that lost undecodable rows is refused unless ``data.allow_skipped`` allows
it (Ray-free: ``init_ray`` is replaced by a tripwire)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from multimix import train as T
from multimix.cli import main
from multimix.config import load_config
from multimix.data import pipeline, verify
from multimix.preflight import check_inputs
from multimix.testing import kermany_rows, v7_rows, write_dataset

pytestmark = pytest.mark.realdata

SIZE = 32


@pytest.fixture(scope="module")
def sets(shared_data, tmp_path_factory) -> dict:
    """Tiny real sets at 32 px: cls (40 Kermany), seg (16 V7), and a cls set whose rows
    ``BAD`` hold undecodable image bytes."""
    root = tmp_path_factory.mktemp("preflight")
    cls_rows = kermany_rows(shared_data, 40, SIZE)
    write_dataset(str(root / "cls"), cls_rows, "cls", SIZE, shards=2)
    write_dataset(str(root / "seg"), v7_rows(shared_data, 16, SIZE), "seg", SIZE, shards=2)
    bad = [dict(r) for r in cls_rows]
    for i, r in enumerate(bad):  # every row but 10: the pools lose rows whatever the split picks
        if i % 4:
            r["image_bytes"] = b"\x89PNG\r\n\x1a\n garbage"
    write_dataset(str(root / "bad"), bad, "cls", SIZE, shards=2)
    for name in ("cls", "seg", "bad"):
        verify.add_shard_info(str(root / name))
    return {k: root / k for k in ("cls", "seg", "bad")}


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a run gets as far as starting Ray."""
    def tripwire(cfg, **kw):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(T, "init_ray", tripwire)


def _args(cls, seg, runs, *extra) -> list[str]:
    out = ["-c", "cpu-small", "--set", f"data.image_size={SIZE}", "--set", f"data.cls_data={cls}",
           "--set", f"data.seg_data={seg}", "--set", "data.cls_labeled=10",
           "--set", "data.seg_labeled=4", "--set", "data.val_fraction=0.2",
           "--set", f"run.storage_path={runs}"]
    for e in extra:
        out += ["--set", e]
    return out


def _cfg(sets, tmp_path, *extra):
    return load_config("cpu-small", [a for a in _args(sets["cls"], sets["seg"], tmp_path / "runs",
                                                      *extra)[2:] if a != "--set"])


def _fails(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line; return the message."""
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


def _files(*roots) -> set:
    return {p for r in roots for p in Path(r).rglob("*")}


def test_inputs_pass(sets, tmp_path):
    got = check_inputs(_cfg(sets, tmp_path), pools=True)
    assert got.classes == ["NORMAL", "PNEUMONIA"]
    assert len(got.splits["cls"].labeled) == 10 and len(got.splits["seg"].labeled) == 4
    assert len(got.pools["cls_labeled"]) == 10 and got.pools["cls_val"].skipped == 0
    assert not (sets["cls"] / "splits").exists()  # computed, not written


@pytest.mark.parametrize("case", ["seg_as_cls", "cls_as_seg", "missing", "classes", "budget",
                                  "no_unlabeled", "storage", "shard"])
def test_train_refused_before_ray(sets, tmp_path, capsys, no_ray, case):
    cls, seg, runs = sets["cls"], sets["seg"], tmp_path / "runs"
    extra: list = []
    if case == "seg_as_cls":
        cls, want = seg, (f"data.cls_data: {seg} is a segmentation dataset (task=seg); give a "
                          "classification dataset")
    elif case == "cls_as_seg":
        seg, want = cls, (f"data.seg_data: {cls} is a classification dataset (task=cls); give "
                          "a segmentation dataset")
    elif case == "missing":
        cls = tmp_path / "nope"
        want = (f"data.cls_data: not a prepared dataset: {cls}/manifest.json missing (write one "
                "with `multimix prepare`)")
    elif case == "classes":
        extra = ["model.num_classes=3", "objective.decision=argmax"]
        want = f"model.num_classes: is 3 but {cls} has classes ['NORMAL', 'PNEUMONIA']"
    elif case == "budget":
        extra, want = ["data.cls_labeled=35"], "data.cls_labeled: asked for 35 labeled images"
    elif case == "no_unlabeled":
        extra, want = ["data.cls_labeled=all"], ("data.cls_labeled: 'all' leaves no unlabeled "
                                                 f"images in {cls}, but variant 'multimix'")
    elif case == "storage":
        runs = tmp_path / "a-file"
        runs.write_text("x")
        want = f"run.storage_path: {runs}/"
    else:
        cls = Path(shutil.copytree(cls, tmp_path / "cls"))
        (cls / "data/part-00001.parquet").unlink()
        want = (f"data.cls_data: {cls}/data/part-00001.parquet: missing (listed in "
                f"{cls}/manifest.json)")
    before = _files(sets["cls"], sets["seg"], cls)
    line = _fails(capsys, ["train", *_args(cls, seg, runs, *extra)])
    assert line.startswith(f"multimix train: error: {want}"), line
    assert _files(sets["cls"], sets["seg"], cls) == before  # no split file, nothing written
    assert not runs.is_dir()


def test_skipped_labeled_rows_refused_unless_allowed(sets, tmp_path, capsys, no_ray):
    bad = sets["bad"]
    line = _fails(capsys, ["train", *_args(bad, sets["seg"], tmp_path / "runs")])
    assert line.startswith(f"multimix train: error: {bad}: ")
    assert re.search(r": \d+ of the 10 rows of the cls_labeled pool( and \d+ of the \d+ rows "
                     r"of the cls_val pool)? could not be decoded; e\.g\. ", line), line
    assert "--set data.allow_skipped=" in line and line.endswith(" to train without them)")
    assert not (bad / "splits").exists()
    # allowed: the checks pass (Ray would start next)
    cfg = _cfg(sets, tmp_path, f"data.cls_data={bad}", "data.allow_skipped=10")
    got = check_inputs(cfg, pools=True)
    assert capsys.readouterr().out.startswith("[multimix] data.allow_skipped=10: training "
                                              "without ")
    lost = pipeline.skipped_counts(got.pools)
    assert lost["skipped_cls_labeled"] > 0
    assert lost["skipped_cls_labeled"] + len(got.pools["cls_labeled"]) == 10
    with pytest.raises(AssertionError, match="Ray was started"):
        T.train(cfg)
    assert not (bad / "splits").exists()  # written only once Ray and the resources are up


def test_tune_and_experiment_refused_before_ray(sets, tmp_path, capsys, no_ray):
    seg, cls = sets["seg"], sets["cls"]
    line = _fails(capsys, ["tune", *_args(seg, seg, tmp_path / "runs"),
                           "--grid", "optim.seed=0,1"])
    assert line == (f"multimix tune: error: data.cls_data: {seg} is a segmentation dataset "
                    "(task=seg); give a classification dataset")
    # a budget of the grid that does not fit, found before any trial runs
    line = _fails(capsys, ["tune", *_args(cls, seg, tmp_path / "runs"),
                           "--grid", "budget=10:4,10:40"])
    assert line.startswith("multimix tune: error: data.seg_labeled: asked for 40 labeled images")
    line = _fails(capsys, ["experiment", "paper-table", "--cls-data", str(seg), "--seg-data",
                           str(seg), "--rows", "enc", "--seeds", "1", "--budgets", "10:4",
                           "--preset", "cpu-small", "--set", f"data.image_size={SIZE}",
                           "--set", f"run.storage_path={tmp_path / 'runs'}"])
    assert line == (f"multimix experiment: error: data.cls_data: {seg} is a segmentation "
                    "dataset (task=seg); give a classification dataset")
    assert not (seg / "splits").exists() and not (cls / "splits").exists()
    assert not (tmp_path / "runs").exists()


def test_cluster_keys_refused_first(sets, tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:1")  # never reached
    line = _fails(capsys, ["train", *_args(sets["cls"], sets["seg"], tmp_path / "runs",
                                           "storage.access_key_id=AKIAXXXX",
                                           "storage.secret_access_key=inline-secret-xyz")])
    assert line.startswith("multimix train: error: storage.access_key_id/secret_access_key/"
                           "session_token are for local runs")
    assert "inline-secret-xyz" not in line


def test_search_check_reads_each_dataset_once(sets, tmp_path, monkeypatch):
    """``tune`` checks every combination of its searched inputs (here 2 budgets x 3 variants)
    but opens each dataset once and reads each budget's split columns once."""
    from collections import Counter

    from multimix.data import dataset
    from multimix.tune import Search, check_search_inputs, parse_grid

    calls: Counter = Counter()
    for mod, name in ((dataset, "read_table"), (dataset, "open_dataset")):
        def counted(uri, *a, _real=getattr(mod, name), _name=name, **k):
            calls[(_name, Path(uri).name)] += 1
            return _real(uri, *a, **k)
        monkeypatch.setattr(mod, name, counted)
    search = Search(grid=parse_grid(["budget=10:4,20:8", "model.variant=multimix,umtl,enc",
                                     "objective.threshold=0.6,0.9"]))
    check_search_inputs(_cfg(sets, tmp_path), search)
    # per dataset: the shard check once and the split columns once, whatever the budgets;
    # unshared, each of the 6 combinations would read them again (and each budget's split
    # read the columns and checked the shards again)
    assert calls == {("read_table", "cls"): 1, ("read_table", "seg"): 1,
                     ("open_dataset", "cls"): 1, ("open_dataset", "seg"): 1}
    assert not (sets["cls"] / "splits").exists() and not (tmp_path / "runs").exists()
    # a budget that does not fit is still found, in whichever combination it comes
    search = Search(grid=parse_grid(["model.variant=enc,multimix", "budget=10:4,10:40"]))
    with pytest.raises(Exception, match="^data.seg_labeled: asked for 40 labeled images"):
        check_search_inputs(_cfg(sets, tmp_path), search)
