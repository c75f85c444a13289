"""multimix.data.splits: determinism, stratification, duplicate groups, budgets, storage."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

import pytest

from multimix.config import ConfigError
from multimix.data import dataset
from multimix.data import prepare as prep
from multimix.data import splits as sp
from multimix.errors import DataError, UserError


def _pool(n_per_class=(60, 180), dup_every=0):
    """ids/labels/hashes: class 0 then class 1; every ``dup_every``-th id of class 1 duplicates
    the previous one (same hash)."""
    ids, labels, hashes = [], [], []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            ids.append(f"c{c}/im{i:04d}")
            labels.append(c)
            dup = dup_every and c == 1 and i % dup_every == 1
            hashes.append(hashes[-1] if dup else f"h{c}-{i}")
    return ids, labels, hashes


def _parts(s: sp.Split) -> dict[str, str]:
    out = {}
    for part in ("labeled", "val", "unlabeled"):
        for i in getattr(s, part):
            assert i not in out, f"{i} in two parts"
            out[i] = part
    return out


def test_partition_and_determinism_independent_of_input_order():
    ids, labels, hashes = _pool()
    a = sp.make_split(ids, labels, hashes, 40, 0.1, seed=3)
    assert set(_parts(a)) == set(ids) and len(_parts(a)) == len(ids)
    rows = list(zip(ids, labels, hashes))
    random.Random(1).shuffle(rows)
    b = sp.make_split(*map(list, zip(*rows)), 40, 0.1, seed=3)
    assert (a.labeled, a.val, a.unlabeled) == (b.labeled, b.val, b.unlabeled)
    c = sp.make_split(ids, labels, hashes, 40, 0.1, seed=4)
    assert c.labeled != a.labeled
    assert a.labeled == sorted(a.labeled)


def test_stratified_val_and_budget():
    ids, labels, hashes = _pool((60, 180))
    s = sp.make_split(ids, labels, hashes, 40, 0.1, seed=0, class_names=["NORMAL", "PNEUMONIA"])
    lab = dict(zip(ids, labels))
    assert Counter(lab[i] for i in s.val) == {0: 6, 1: 18}
    assert Counter(lab[i] for i in s.labeled) == {0: 10, 1: 30}  # 1:3, as the pool
    assert len(s.unlabeled) == 240 - 24 - 40
    assert s.counts["labeled"] == {"NORMAL": 10, "PNEUMONIA": 30}
    # tiny budgets still see every class
    s2 = sp.make_split(ids, labels, hashes, 2, 0.1, seed=0)
    assert Counter(lab[i] for i in s2.labeled) == {0: 1, 1: 1}


def test_all_and_no_validation():
    ids, labels, hashes = _pool((10, 20))
    s = sp.make_split(ids, labels, hashes, "all", 0.1, seed=0)
    assert len(s.val) == 3 and len(s.labeled) == 27 and s.unlabeled == []
    s0 = sp.make_split(ids, labels, hashes, 5, 0.0, seed=0)
    assert s0.val == [] and len(s0.labeled) == 5 and len(s0.unlabeled) == 25


def test_segmentation_is_unstratified():
    ids = [f"v7_{i}" for i in range(50)]
    s = sp.make_split(ids, None, None, 10, 0.1, seed=0, budget_key="data.seg_labeled")
    assert (len(s.val), len(s.labeled), len(s.unlabeled)) == (5, 10, 35)
    assert s.counts["labeled"] == {"all": 10}


@pytest.mark.parametrize("seed", range(8))
def test_duplicates_stay_together(seed):
    ids, labels, hashes = _pool((30, 90), dup_every=3)
    s = sp.make_split(ids, labels, hashes, 25, 0.2, seed=seed)
    part = _parts(s)
    groups = Counter(hashes)
    assert sum(v > 1 for v in groups.values()) == 30
    for h in groups:
        members = [i for i, hh in zip(ids, hashes) if hh == h]
        assert len({part[i] for i in members}) == 1, members
    assert len(s.labeled) == 25  # exact budget despite groups of two


def test_budget_too_large_names_the_key_and_the_pool():
    ids, labels, hashes = _pool((10, 20))
    with pytest.raises(ConfigError, match=r"data.cls_labeled: .*1000.*only 27"):
        sp.make_split(ids, labels, hashes, 1000, 0.1, seed=0)
    with pytest.raises(ConfigError, match="data.seg_labeled"):
        sp.make_split(ids, None, None, 31, 0.0, seed=0, budget_key="data.seg_labeled")
    with pytest.raises(ConfigError, match="data.cls_labeled: must be a positive"):
        sp.make_split(ids, labels, hashes, 0, 0.1, seed=0)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        sp.make_split(ids, labels, hashes, 5, 1.0, seed=0)


def test_json_round_trip_and_name():
    ids, labels, hashes = _pool((10, 20))
    s = sp.make_split(ids, labels, hashes, 7, 0.1, seed=2)
    assert s.name == "L7-V0.1-S2" and sp.split_name("all", 0.25, 0) == "Lall-V0.25-S0"
    assert sp.Split.from_json(s.to_json()) == s
    with pytest.raises(DataError, match="not a split file"):
        sp.Split.from_json('{"labeled": []}')


@pytest.fixture(scope="module")
def demo_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    prep.prepare_demo(str(out), n_cls=40, n_seg=20, image_size=16)
    return out


def test_store_split_writes_the_checked_split_once(demo_ds, monkeypatch):
    """A run writes the split its checks made (``ensure_split(write=False)``): written when
    missing or different, left alone when the file holds the same ids."""
    from multimix.data import storage

    uri = str(demo_ds / "cls")
    s = sp.ensure_split(uri, 12, 0.1, 0, write=False)
    path = demo_ds / "cls" / "splits" / "L12-V0.1-S0.json"
    assert not path.exists()  # the checks write nothing
    sp.store_split(uri, s)
    assert sp.Split.from_json(path.read_text()) == s
    writes = []
    monkeypatch.setattr(storage, "write_text", lambda *a, **k: writes.append(a))
    sp.store_split(uri, s)  # same ids: not rewritten
    assert writes == []
    monkeypatch.undo()
    stale = sp.Split.from_json(path.read_text())
    stale.val = stale.val[:-1]
    path.write_text(stale.to_json())
    sp.store_split(uri, s)  # other ids: replaced
    assert sp.Split.from_json(path.read_text()) == s


def test_ensure_split_writes_then_reuses_the_file(demo_ds):
    uri = str(demo_ds / "cls")
    s = sp.ensure_split(uri, 10, 0.1, 0)
    path = demo_ds / "cls" / "splits" / "L10-V0.1-S0.json"
    assert path.is_file() and sp.Split.from_json(path.read_text()) == s
    assert len(s.labeled) == 10 and s.counts["labeled"] == {"NORMAL": 5, "PNEUMONIA": 5}
    # reused: an edited file (same dataset fingerprint) is returned as stored
    d = json.loads(path.read_text())
    d["labeled"] = d["labeled"][:3]
    path.write_text(json.dumps(d))
    assert sp.ensure_split(uri, 10, 0.1, 0).labeled == d["labeled"]
    # a split file from another dataset (fingerprint differs) is replaced
    d["fingerprint"] = "something else"
    path.write_text(json.dumps(d))
    assert sp.ensure_split(uri, 10, 0.1, 0) == s
    with pytest.raises(ConfigError, match="data.seg_labeled"):
        sp.ensure_split(str(demo_ds / "seg"), 100, 0.1, 0, budget_key="data.seg_labeled")
    with pytest.raises(DataError, match="not a prepared dataset"):
        sp.ensure_split(str(demo_ds), 10, 0.1, 0)


def _cli(argv):
    p = argparse.ArgumentParser()
    sp.add_arguments(p)
    return sp.run(p.parse_args(argv))


def test_cli_split(demo_ds, capsys):
    assert _cli([str(demo_ds / "seg"), "--labeled", "all", "--val", "0.2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert str(demo_ds / "seg" / "splits" / "Lall-V0.2-S1.json") in out
    assert "labeled 16; val 4; unlabeled 0" in out
    assert _cli([str(demo_ds / "cls"), "--labeled", "4"]) == 0
    assert "labeled 4 (NORMAL 2, PNEUMONIA 2)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="data.seg_labeled: asked for 99"):
        _cli([str(demo_ds / "seg"), "--labeled", "99"])
    with pytest.raises(SystemExit):
        _cli([str(demo_ds / "seg"), "--labeled", "some"])
    with pytest.raises(UserError, match="--val"):
        _cli([str(demo_ds / "seg"), "--labeled", "3", "--val", "1.5"])


@pytest.mark.realdata
def test_kermany_split_is_stratified_and_keeps_duplicates_together(kermany_prepared):
    s = sp.ensure_split(str(kermany_prepared), 100, 0.1, 0)
    m = dataset.read_manifest(str(kermany_prepared))
    assert len(s.labeled) == 100
    assert s.counts["val"] == {"NORMAL": 134, "PNEUMONIA": 388}  # round(0.1 · class size)
    assert s.counts["labeled"] == {"NORMAL": 26, "PNEUMONIA": 74}  # 1,207 : 3,487 remaining
    part = _parts(s)
    assert len(part) == 5216
    for group in m["duplicate_groups"]:
        assert len({part[i] for i in group}) == 1, group
