"""Validation / evaluation pools streamed from their shards (Ray-free): the same
batches and the same metrics as the in-memory pool of the same ids, undecodable rows counted and
left out, missing ids refused, and the labeled-pool size limit checked before decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimix.config import load_config
from multimix.data import pipeline as P
from multimix.data.images import encode_png
from multimix.data.pools import StreamedPool, decoded_mb, eval_batches, load_labeled_pool
from multimix.errors import DataError
from multimix.testing import kermany_rows, v7_rows, write_dataset

SIZE = 32


def _cfg(cls_uri="", seg_uri="", **data):
    return load_config("cpu-small", {"data": {"image_size": SIZE, "cls_data": cls_uri,
                                              "seg_data": seg_uri, **data}})


@pytest.fixture(scope="module")
def sets(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    cls_rows = kermany_rows(shared_data, 40, SIZE)
    good = encode_png(cls_rows[0]["image"])
    cls_rows.insert(17, {"id": "BAD/truncated", "image_bytes": good[:90], "label": 1})
    seg_rows = v7_rows(shared_data, 14, SIZE)
    # 3 shards of 4-row groups: every pass crosses shards and row groups
    return {"cls": write_dataset(str(root / "cls"), cls_rows, "cls", SIZE, shards=3,
                                 row_group_rows=4),
            "seg": write_dataset(str(root / "seg"), seg_rows, "seg", SIZE, shards=3,
                                 row_group_rows=4),
            "cls_ids": [r["id"] for r in cls_rows], "seg_ids": [r["id"] for r in seg_rows]}


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["ids"] == y["ids"]
        for k in x:
            if k != "ids":
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.realdata
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_streamed_batches_are_the_in_memory_batches(sets, task):
    """Every rank's batches (batch 5, 1-3 ranks) equal the in-memory pool's of the same ids,
    in the streamed order (storage order), with the undecodable row counted and left out."""
    ids = [i for i in sets[f"{task}_ids"][::-1]]  # asked in another order than stored
    cfg = _cfg(**{f"{task}_data": sets[task]})
    pool = StreamedPool(sets[task], ids, cfg).scan()
    bad = 1 if task == "cls" else 0
    assert pool.task == task and len(pool) == len(ids) - bad and pool.skipped == bad
    assert sorted(pool.ids) == sorted(i for i in ids if i != "BAD/truncated")
    if bad:
        assert pool.skipped_examples[0][0] == "BAD/truncated"
    mem = load_labeled_pool(sets[task], pool.ids, cfg)
    for world in (1, 2, 3):
        for rank in range(world):
            _same_batches(list(eval_batches(pool, 5, rank, world)),
                          list(eval_batches(mem, 5, rank, world)))
    head = pool.head(3)
    assert head.ids == pool.ids[:3] and np.array_equal(head.images, mem.images[:3])


@pytest.mark.realdata
def test_streamed_pool_unscanned_counts_while_scored_and_metrics_match(sets):
    """Not scanned first (``multimix evaluate``): the pass skips and counts the bad row, and
    ``validate`` gives the in-memory pool's metrics exactly."""
    from multimix.model import MultiMixNet
    from multimix.validate import validate

    cfg = _cfg(sets["cls"], sets["seg"])
    torch.manual_seed(0)
    model = MultiMixNet(width=0.125)
    cls = StreamedPool(sets["cls"], sets["cls_ids"][:20], cfg)  # the bad row is the 18th
    seg = StreamedPool(sets["seg"], sets["seg_ids"][:6], cfg)
    got = validate(model, "cpu", cls=cls, seg=seg, batch_size=8)
    assert cls.skipped == 1 and "BAD/truncated" not in cls.ids
    want = validate(model, "cpu", cls=load_labeled_pool(sets["cls"], cls.ids, cfg),
                    seg=load_labeled_pool(sets["seg"], seg.ids, cfg), batch_size=8)
    assert got.cls.ids == want.cls.ids and got.seg.ids == want.seg.ids
    assert np.array_equal(got.cls.probs, want.cls.probs)
    assert got.flat() == pytest.approx(want.flat(), nan_ok=True, rel=0, abs=0)


@pytest.mark.realdata
def test_streamed_pool_missing_id(sets):
    with pytest.raises(DataError, match=r"1 id\(s\) not in the dataset, e.g. \['nope'\]"):
        StreamedPool(sets["cls"], sets["cls_ids"][:3] + ["nope"], _cfg(sets["cls"]))


class _Split:
    def __init__(self, labeled, val):
        self.labeled, self.val, self.unlabeled = labeled, val, []


@pytest.mark.realdata
def test_streamed_pool_from_a_relative_path_is_scored_from_another_directory(
        sets, tmp_path, monkeypatch):
    """A pool made from a relative dataset path (``make demo``: ``out/demo/...``) is scored in
    Train workers, whose working directory differs: it keeps the absolute path."""
    import os
    import pickle

    uri = sets["cls"]
    monkeypatch.chdir(os.path.dirname(uri))
    pool = StreamedPool(os.path.basename(uri), sets["cls_ids"][:6], _cfg())
    monkeypatch.chdir(tmp_path)  # another process's working directory
    moved = pickle.loads(pickle.dumps(pool))
    assert [i for b in eval_batches(moved, 4) for i in b["ids"]] == pool.ids
    assert moved.uri == os.path.abspath(uri)


@pytest.mark.realdata
def test_load_pools_streams_val_and_limits_labeled(sets):
    """``load_pools``: labeled pools in memory, validation pools streamed (scanned: the bad row
    counted, check_skipped's contract kept); a labeled pool over ``data.max_labeled_mb`` is
    refused before any decoding, naming the pool, its size and the key."""
    ids = [i for i in sets["cls_ids"] if i != "BAD/truncated"]
    splits = {"cls": _Split(ids[:10], ids[10:] + ["BAD/truncated"])}
    pools = P.load_pools(_cfg(sets["cls"]), splits)
    assert pools["cls_labeled"].images.shape == (10, SIZE, SIZE)
    assert isinstance(pools["cls_val"], StreamedPool) and pools["cls_val"].skipped == 1
    assert P.skipped_counts(pools) == {"skipped_cls_labeled": 0, "skipped_cls_val": 1}
    with pytest.raises(DataError, match="1 of the 31 rows of the cls_val pool"):
        P.check_skipped(_cfg(sets["cls"]), pools, splits)
    P.check_skipped(_cfg(sets["cls"], allow_skipped=1), pools, splits)

    limit = decoded_mb(10, SIZE, seg=False) * 0.9
    with pytest.raises(DataError, match=r"cls_labeled pool of .*: 10 rows .* > "
                                        r"data.max_labeled_mb"):
        P.load_pools(_cfg(sets["cls"], max_labeled_mb=limit), splits)
    assert decoded_mb(4, 256, seg=True) == 4 * 3 * 256 * 256 / 2 ** 20
