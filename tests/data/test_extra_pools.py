"""Extra unlabeled pools and the run-time contamination guard, Ray-free parts."""

from __future__ import annotations

import pytest

from multimix.config import ConfigError, load_config


# ---------------------------------------------------------------------------------------------
# config keys


def test_extra_pool_keys_default_and_round_trip():
    cfg = load_config("cpu-small")
    assert cfg.data.unlabeled_data == [] and cfg.data.unlabeled_weights is None
    assert cfg.data.eval_data == [] and cfg.data.contamination_guard is True
    cfg = load_config("cpu-small", ["data.unlabeled_data=[/a, s3://b/c]",
                                    "data.unlabeled_weights=[1, 0.5, 2]",
                                    "data.unlabeled_seg_from=s3://b/c"])
    assert cfg.data.unlabeled_data == ["/a", "s3://b/c"]
    assert cfg.data.unlabeled_weights == [1.0, 0.5, 2.0]
    assert load_config(cfg.to_dict()).data == cfg.data


@pytest.mark.parametrize("sets, message", [
    (["data.unlabeled_data=/a"], "data.unlabeled_data: expected a list of str"),
    (["data.unlabeled_data=[/a, 3]"], "data.unlabeled_data[1]: expected a string"),
    (["data.unlabeled_data=[/a, /a]"], "data.unlabeled_data: lists /a twice"),
    (["data.cls_data=/c", "data.unlabeled_data=[/c/]"], "data.unlabeled_data[0]: is data.cls"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_weights=[1]"],
     "data.unlabeled_weights: needs 2 weights"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_weights=[0, 0]"],
     "data.unlabeled_weights: must be >= 0 and not all 0"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_weights=[1, -1]"],
     "data.unlabeled_weights: must be >= 0"),
    (["data.unlabeled_seg_from=extra"], "data.unlabeled_seg_from: needs data.unlabeled_data"),
    (["data.unlabeled_data=[/a]", "data.unlabeled_seg_from=/b"],
     "data.unlabeled_seg_from: must be one of cls, seg, extra, cls+extra or a URI"),
    (["data.near_threshold=64"], "data.near_threshold: must be in [0, 63]"),
    (["data.eval_data=['']"], "data.eval_data[0]: must be a dataset URI"),
    (["data.contamination_guard=1"], "data.contamination_guard: expected true or false"),
])
def test_extra_pool_keys_refused_with_one_line_naming_the_key(sets, message):
    with pytest.raises(ConfigError) as info:
        load_config("cpu-small", sets)
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# weights → per-source shares of each pass (the reader's ReadPlan, Ray-free)


def _shares(plan, rows_per_group, passes=range(6)):
    """Rows each source gives each pass (row groups picked × rows per group)."""
    import numpy as np

    src_of = np.repeat(np.arange(len(plan.counts)), plan.counts)
    out = []
    for p in passes:
        got = np.bincount(src_of[R.pass_groups(plan, p)], minlength=len(plan.counts))
        out.append(got * np.asarray(rows_per_group))
    return out


from multimix.data import readers as R  # noqa: E402


def test_no_weights_reads_every_row_group_once_per_pass_as_before():
    plan = R.plan_reads([20], [20 * 256], None, seed=3, stream="unl_cls")
    assert sorted(R.pass_groups(plan, 5).tolist()) == list(range(20))
    # one source, no weights: the same order the single-pool reader always had
    assert R._slot_groups(plan, 1, 4, 5) == R.task_groups(1, 20, 4, 3, 5, "unl_cls")
    plan = R.plan_reads([20, 3], [20 * 256, 3 * 256], None, seed=0, stream="unl_cls")
    assert sorted(R.pass_groups(plan, 0).tolist()) == list(range(23))


def test_weights_give_each_source_its_share_of_every_pass():
    # a big pool (40 groups of 256 rows), a small one (2 groups), a middle one (10 groups)
    counts, rows = [40, 2, 10], [40 * 256, 2 * 256, 10 * 256]
    plan = R.plan_reads(counts, rows, [2, 1, 1], seed=0, stream="unl_cls")
    total = sum(rows)
    for got in _shares(plan, [256, 256, 256]):
        assert got.sum() == pytest.approx(total, abs=3 * 256)  # a pass ≈ the pools' rows
        for share, want in zip(got / got.sum(), [0.5, 0.25, 0.25]):
            assert share == pytest.approx(want, abs=256 / total * 2)
    # the big pool continues across passes (26 of its 40 row groups a pass: passes 0 and 1
    # visit all 40), the small one is repeated within a pass
    assert plan.per_pass[0] == 26 and plan.per_pass[1] > 2
    first = set(R.pass_groups(plan, 0).tolist()) & set(range(40))
    assert len(first) == 26
    both = {g for p in (0, 1) for g in R.pass_groups(plan, p).tolist() if g < 40}
    assert both == set(range(40))
    # weight 0 leaves a source out; the order is seeded (same plan, same pass: same groups)
    plan0 = R.plan_reads(counts, rows, [1, 0, 0], seed=0, stream="unl_cls")
    assert all(g < 40 for g in R.pass_groups(plan0, 1).tolist())
    assert R.pass_groups(plan, 4).tolist() == R.pass_groups(plan, 4).tolist()
    assert R.pass_groups(plan, 4).tolist() != R.pass_groups(plan, 5).tolist()


def test_an_empty_source_gives_its_share_to_the_others():
    plan = R.plan_reads([4, 10], [0, 10 * 256], [1, 1], seed=0, stream="unl_cls")
    assert plan.per_pass == (0, 10)  # a pass still holds the pools' rows


def test_weights_count_filtered_rows():
    """A source read through an id filter (cls_data's unlabeled part: 1/4 of its rows) gets
    proportionally more row groups for the same share."""
    plan = R.plan_reads([8, 8], [8 * 64, 8 * 256], [1, 1], seed=0, stream="unl_cls")
    got = _shares(plan, [64, 256])[0]
    assert got[0] == pytest.approx(got[1], rel=0.15)


# ---------------------------------------------------------------------------------------------
# the contamination guard at run time (Ray-free: reads only id/hash/phash columns)


def _picture(k: int, size: int = 96):
    """A distinct smooth random picture (its phash is ~128 bits from any other's)."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(k)
    noise = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8), dtype=np.uint8))
    return noise.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A cls dataset (NORMAL/PNEUMONIA, 24 pictures + an exact copy of a validation picture)
    and an extra unlabeled pool (12 pictures of its own + exact, resized and re-encoded copies
    of validation pictures), prepared at 32 px; the split is made here."""
    import shutil
    from types import SimpleNamespace

    from multimix.data.prepare import prepare

    root = tmp_path_factory.mktemp("planted")
    files = {}
    for k in range(24):
        name = f"{('NORMAL', 'PNEUMONIA')[k % 2]}/p{k:02d}.png"
        (root / "cls" / name).parent.mkdir(parents=True, exist_ok=True)
        _picture(k).save(root / "cls" / name)
        files[name[:-4]] = root / "cls" / name
    val, lab = ["NORMAL/p00", "PNEUMONIA/p01", "NORMAL/p02", "PNEUMONIA/p03"], ["NORMAL/p04"]
    shutil.copy(files["NORMAL/p00"], root / "cls" / "NORMAL" / "dup00.png")  # inside cls_data
    (root / "extra" / "own").mkdir(parents=True)
    (root / "extra" / "copy").mkdir()
    for k in range(100, 112):
        _picture(k).save(root / "extra" / "own" / f"e{k}.png")
    shutil.copy(files["PNEUMONIA/p01"], root / "extra" / "copy" / "exact01.png")
    shutil.copy(files["NORMAL/p04"], root / "extra" / "copy" / "exact04.png")  # a labeled one
    from PIL import Image

    copy = root / "extra" / "copy"  # resized and re-encoded copies of validation pictures
    Image.open(files["NORMAL/p02"]).resize((61, 61)).save(copy / "small02.jpg", quality=70)
    Image.open(files["PNEUMONIA/p03"]).resize((150, 150)).save(copy / "big03.png")
    cls = prepare(str(root / "cls"), str(root / "cls_ds"), layout="folders", image_size=32,
                  workers=1, progress=False)
    extra = prepare(str(root / "extra"), str(root / "extra_ds"), layout="images", image_size=32,
                    workers=1, progress=False, shard_rows=5)  # 4 shards
    ids = sorted([*files, "NORMAL/dup00"])
    assert cls["num_rows"] == 25 and extra["num_rows"] == 16 and extra["task"] == "unlabeled"
    split = SimpleNamespace(labeled=lab, val=val,
                            unlabeled=[i for i in ids if i not in val + lab])
    cfg = load_config("cpu-small", [f"data.cls_data={root / 'cls_ds'}", "model.variant=enc-ssl",
                                    f"data.unlabeled_data=[{root / 'extra_ds'}]",
                                    "data.image_size=32"])
    return SimpleNamespace(root=root, cfg=cfg, splits={"cls": split},
                           cls=str(root / "cls_ds"), extra=str(root / "extra_ds"))


def test_guard_removes_planted_copies_of_labeled_and_validation_images(planted, capsys):
    from multimix.data import pipeline as P

    excluded, report = P.contamination_guard(planted.cfg, planted.splits)
    assert excluded == {planted.cls: {"NORMAL/dup00"},
                        planted.extra: {"copy/exact01", "copy/exact04", "copy/small02",
                                        "copy/big03"}}
    pools = {p["name"]: p for p in report["pools"]}
    assert pools[planted.extra]["removed"] == {"exact": 2, "near": 2}
    assert pools[planted.extra]["kept"] == 12 and pools[planted.cls]["removed"]["exact"] == 1
    assert pools[planted.cls]["rows"] == 20  # the unlabeled part only
    assert report["removed"] == {"exact": 3, "near": 2} and report["exact_only"] == []
    assert report["threshold"] == 31 and len(report["protected"]) == 1
    kinds = {e[0]: (e[1], e[3]) for e in pools[planted.extra]["examples"]}
    assert kinds["copy/small02"] == ("near", "NORMAL/p02")
    assert kinds["copy/exact01"] == ("exact", "PNEUMONIA/p01")
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "removed 3 exact (sha256) + 2 near" in line
    # the streams leave them out; steps per epoch count what is left
    sources, weights = P.stream_sources(planted.cfg, planted.splits, "unl_cls", excluded)
    assert [s.uri for s in sources] == [planted.cls, planted.extra] and weights is None
    assert sources[1].accepts(["copy/big03", "own/e100"]) == [1]
    from multimix.data.readers import source_rows
    from multimix.data.dataset import open_dataset

    assert [source_rows(s, open_dataset(s.uri)) for s in sources] == [19, 12]


def test_guard_reads_a_pool_in_chunks_of_whole_shards(planted, monkeypatch, capsys):
    from multimix.data import overlap
    from multimix.data import pipeline as P

    chunks = list(overlap.iter_hashes(planted.extra, chunk_rows=6))
    assert [len(c) for c in chunks] == [10, 6] and chunks[0].phash.shape == (10, 4)
    assert len(list(overlap.iter_hashes(planted.extra, chunk_rows=None))) == 1
    whole = P.contamination_guard(planted.cfg, planted.splits)
    monkeypatch.setattr(overlap, "GUARD_CHUNK_ROWS", 1)  # one shard at a time
    assert P.contamination_guard(planted.cfg, planted.splits) == whole


def test_guard_protects_eval_sets_and_can_be_turned_off(planted, capsys):
    from multimix.data import pipeline as P

    cfg = load_config(planted.cfg.to_dict(), ["data.near_threshold=0",
                                             f"data.eval_data=[{planted.extra}]"])
    excluded, report = P.contamination_guard(cfg, planted.splits)
    # threshold 0: the resized copies are no longer caught; the eval set protects itself
    assert report["threshold"] == 0 and len(report["protected"]) == 2
    assert len(excluded[planted.extra]) == 16
    off = load_config(planted.cfg.to_dict(), ["data.contamination_guard=false"])
    assert P.contamination_guard(off, planted.splits) == ({}, {"enabled": False})
    enc = load_config(planted.cfg.to_dict(), ["model.variant=enc"])  # no unlabeled stream
    assert P.contamination_guard(enc, planted.splits)[1]["pools"] == []


def test_preflight_opens_every_extra_pool_and_names_the_key(planted, tmp_path):
    from multimix.errors import UserError
    from multimix.preflight import check_inputs

    base = load_config(planted.cfg.to_dict(), ["data.cls_labeled=5"]).to_dict()
    bad = load_config(base, [f"data.unlabeled_data=[{planted.extra}, {tmp_path / 'nope'}]"])
    with pytest.raises(UserError, match=r"^data.unlabeled_data\[1\]: .*nope"):
        check_inputs(bad, storage=False)
    # all labeled: the extra pool alone feeds the unlabeled stream
    got = check_inputs(load_config(base, ["data.cls_labeled=all"]), storage=False)
    assert got.splits["cls"].unlabeled == []
    with pytest.raises(UserError, match="leaves no unlabeled images .* or data.unlabeled_data"):
        check_inputs(load_config(base, ["data.cls_labeled=all", "data.unlabeled_data=[]"]),
                     storage=False)


@pytest.mark.parametrize("frm, uris, weights", [
    ("cls", ["cls"], None),
    ("extra", ["e1", "e2"], [2.0, 3.0]),
    ("cls+extra", ["cls", "e1", "e2"], [1.0, 2.0, 3.0]),
    ("/e2", ["e2"], None),
])
def test_unlabeled_seg_from_names_the_pools(frm, uris, weights):
    from types import SimpleNamespace

    from multimix.data import pipeline as P

    cfg = load_config("cpu-small", ["data.cls_data=/cls", "data.unlabeled_data=[/e1, /e2]",
                                    "data.unlabeled_weights=[1, 2, 3]",
                                    f"data.unlabeled_seg_from={frm}"])
    split = SimpleNamespace(labeled=["a"], val=["b"], unlabeled=["c", "d"])
    sources, w = P.stream_sources(cfg, {"cls": split}, "unl_seg", {"/e2": frozenset({"x"})})
    assert [s.uri.lstrip("/") for s in sources] == uris and w == weights
    assert all(s.exclude == ({"x"} if s.uri == "/e2" else set()) for s in sources)
    assert all((s.ids == {"c", "d"}) if s.uri == "/cls" else s.ids is None for s in sources)
    # the pools the guard checks: each once, whatever the streams share
    assert sorted(s.uri for s in P.unlabeled_pools(cfg, {"cls": split})) == \
        sorted({"/cls", "/e1", "/e2", *("/" + u for u in uris)})


def test_tune_makes_the_pool_paths_absolute(tmp_path, monkeypatch):
    from multimix.tune import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config("cpu-small", [
        "data.unlabeled_data=[rel/a, s3://b/c]", "data.unlabeled_seg_from=rel/a",
        "data.eval_data=[ev]"]))
    assert cfg.data.unlabeled_data == [str(tmp_path / "rel/a"), "s3://b/c"]
    assert cfg.data.unlabeled_seg_from == str(tmp_path / "rel/a")
    assert cfg.data.eval_data == [str(tmp_path / "ev")]


def test_preflight_refuses_an_extra_pool_of_another_size_and_a_missing_eval_set(planted,
                                                                                tmp_path):
    import numpy as np

    from multimix.errors import UserError
    from multimix.preflight import check_inputs
    from multimix.testing import write_dataset

    rows = [{"id": f"r{i}", "image": np.full((64, 64), i, np.uint8)} for i in range(4)]
    big = write_dataset(str(tmp_path / "big"), rows, "unlabeled", 64, shards=1)
    base = load_config(planted.cfg.to_dict(), ["data.cls_labeled=5"]).to_dict()
    with pytest.raises(UserError, match=r"^data.unlabeled_data\[1\]: .*big was prepared at "
                                        r"64², but data.image_size is 32"):
        check_inputs(load_config(base, [f"data.unlabeled_data=[{planted.extra}, {big}]"]),
                     storage=False)
    with pytest.raises(UserError, match=r"^data.eval_data\[0\]: .*nope"):
        check_inputs(load_config(base, [f"data.eval_data=[{tmp_path / 'nope'}]"]),
                     storage=False)


def test_paper_table_protects_its_evaluation_sets(monkeypatch, tmp_path):
    """``experiment paper-table --eval-cls/--eval-seg`` puts the sets into data.eval_data
    (absolute paths) for every trial's guard; stops before Tune starts."""
    import argparse

    from multimix import experiment, tune

    seen = {}

    class Stop(Exception):
        pass

    def fake_tune(cfg, search, restart=False):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(tune, "tune", fake_tune)
    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    experiment.add_arguments(p)
    args = p.parse_args(["paper-table", "--cls-data", "c", "--seg-data", "s", "--eval-cls", "k2",
                         "--eval-seg", "g", "k2", "--preset", "cpu-small", "--rows", "enc"])
    with pytest.raises(Stop):
        experiment.run(args)
    assert seen["cfg"].data.eval_data == [str(tmp_path / "k2"), str(tmp_path / "g")]
