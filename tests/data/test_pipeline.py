"""Ray Data pipeline on real chest X-rays: local Parquet and S3, views vs source, skipped rows,
uneven streams across 2 workers (streaming_split, as Ray Train's DataConfig does)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from multimix.bench.data import kermany_rows, synthetic_rows, v7_rows, write_dataset
from multimix.config import load_config
from multimix.data import pipeline as P
from multimix.data.augment import Augmenter, row_keys
from multimix.data.images import encode_png
from multimix.data.prepare import row_order_key
from multimix.variants import streams_for

SIZE = 64
READERS = ("read_parquet", "row_groups")


def _hash_order(rows):
    """Rows in ``multimix prepare``'s stored order."""
    return sorted(rows, key=lambda r: row_order_key(r["id"]))


def _cfg(cls_uri="", seg_uri="", **over):
    o = {"data": {"image_size": SIZE, "cls_data": cls_uri, "seg_data": seg_uri, "cls_batch": 4,
                  "unlabeled_batch": 4, "seg_batch": 4, "unlabeled_seg_batch": 4},
         "scaling": {"data_cpus_per_task": 0.5, "data_concurrency": 1}}
    for k, v in over.items():
        o.setdefault(k, {}).update(v)
    return load_config("cpu-small", o)


@pytest.fixture(scope="module")
def real_sets(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    cls_rows = _hash_order(kermany_rows(shared_data, 50, SIZE))
    seg_rows = _hash_order(v7_rows(shared_data, 20, SIZE))
    return {
        "cls": write_dataset(str(root / "cls"), cls_rows, "cls", SIZE),
        "seg": write_dataset(str(root / "seg"), seg_rows, "seg", SIZE),
        "cls_rows": {r["id"]: r for r in cls_rows},
        "seg_rows": {r["id"]: r for r in seg_rows},
    }


def _take_all(ds):
    rows = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in range(len(b["id"])):
            rows[str(b["id"][k])] = {c: v[k] for c, v in b.items()}
    return rows


def _check_pairs(rows, source, cfg, n_expected, pass_no=0):
    assert len(rows) == n_expected
    aug = Augmenter.from_config(cfg.augment, SIZE)
    for rid, r in rows.items():
        for c in ("weak_img", "strong_img"):
            assert r[c].dtype == np.uint8 and r[c].shape == (SIZE, SIZE)
        # the two views are of the SAME source row: re-render it from its id and the seed
        w, s = aug.pair(source[rid]["image"][None], row_keys([rid], cfg.optim.seed, pass_no,
                                                               "unl_cls"))
        assert np.array_equal(r["weak_img"], w[0]) and np.array_equal(r["strong_img"], s[0])


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.realdata
@pytest.mark.slow
def test_local_pairs_and_seg(real_sets, ray_local, reader):
    cfg = _cfg(real_sets["cls"], real_sets["seg"], data={"reader": reader})
    ids = sorted(real_sets["cls_rows"])[5:]
    ds = P.stream_dataset(cfg.data.cls_data, ids, cfg, mode="pair", stream="unl_cls", debug=True)
    _check_pairs(_take_all(ds), real_sets["cls_rows"], cfg, len(ids))

    seg = P.stream_dataset(cfg.data.seg_data, None, cfg, mode="seg", augment=True, debug=True)
    rows = _take_all(seg)
    assert len(rows) == len(real_sets["seg_rows"])
    for rid, r in rows.items():
        assert set(np.unique(r["seg_mask"])) <= {0, 1} and set(np.unique(r["seg_ignore"])) <= {0, 1}
        src = real_sets["seg_rows"][rid]
        aug = Augmenter.from_config(cfg.augment, SIZE)
        i2, m2 = aug.geometric(row_keys([rid], cfg.optim.seed, 0, "seg"), src["image"][None],
                               src["mask"][None])
        assert np.array_equal(r["seg_img"], i2[0]) and np.array_equal(r["seg_mask"], m2[0])

    pool = P.load_labeled_pool(cfg.data.seg_data, sorted(real_sets["seg_rows"])[:6], cfg)
    assert pool.images.shape == (6, SIZE, SIZE) and pool.masks.max() <= 1
    batches = list(P.eval_batches(pool, 4))
    assert [b["seg_img"].shape[0] for b in batches] == [4, 2]
    assert str(batches[0]["seg_mask"].dtype) == "torch.uint8"


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.realdata
def test_s3_same_as_local(real_sets, s3_server, ray_local, reader):
    import pyarrow.fs as pafs

    bucket = f"mm-pipe-{reader.replace('_', '-')}"
    s3_server.make_bucket(bucket)
    st = load_config(None, {"storage": s3_server.storage_overrides()}).storage
    from multimix.data import storage

    fs, _ = storage.resolve(f"s3://{bucket}/cls", st)
    pafs.copy_files(real_sets["cls"], f"{bucket}/cls", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    cfg = _cfg(f"s3://{bucket}/cls", storage=s3_server.storage_overrides(),
               data={"reader": reader})
    ids = sorted(real_sets["cls_rows"])[:20]
    ds = P.stream_dataset(cfg.data.cls_data, ids, cfg, mode="pair", stream="unl_cls", debug=True)
    _check_pairs(_take_all(ds), real_sets["cls_rows"], cfg, len(ids))
    pool = P.load_labeled_pool(cfg.data.cls_data, ids[:5], cfg)
    assert pool.labels.tolist() == [real_sets["cls_rows"][i]["label"] for i in ids[:5]]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.realdata
def test_corrupt_row_skipped_and_counted(real_sets, tmp_path, ray_local, reader):
    rows = list(real_sets["cls_rows"].values())[:6]
    good = encode_png(rows[0]["image"])
    rows = [dict(r) for r in rows] + [{"id": "BAD/truncated", "image_bytes": good[:100],
                                       "label": 0}]
    uri = write_dataset(str(tmp_path / "bad"), rows, "cls", SIZE)
    cfg = _cfg(uri, data={"reader": reader})
    state = P.create_state()
    ds = P.stream_dataset(uri, None, cfg, mode="pair", stream="unl_cls", state=state, debug=True)
    got = _take_all(ds)
    assert len(got) == 6 and "BAD/truncated" not in got
    info = P.skipped_rows(state)
    assert info["counts"] == {"unl_cls": 1}
    assert info["examples"]["unl_cls"][0][0] == "BAD/truncated"
    pool = P.load_labeled_pool(uri, [r["id"] for r in rows], cfg)
    assert len(pool) == 6 and pool.skipped == 1


@pytest.mark.parametrize("sharding", ["per_worker", "streaming_split"])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.realdata
@pytest.mark.slow
def test_two_workers_uneven_streams_same_step_count(real_sets, ray_local, reader, sharding):
    """2 workers; unlabeled-cls pool of 37 rows, unlabeled-seg pool of 7 (shorter than one batch
    per worker), labeled pools of 5 and 3: every worker yields exactly steps_per_epoch batches,
    from its own datasets (per_worker) or its share of one split dataset (streaming_split),
    through cursors kept across the two epochs (the short stream restarts)."""
    cfg = _cfg(real_sets["cls"], real_sets["seg"], model={"variant": "multimix"},
               data={"unlabeled_seg_from": "seg", "reader": reader})
    cls_ids = sorted(real_sets["cls_rows"])
    seg_ids = sorted(real_sets["seg_rows"])

    class S:  # a Split-like object
        def __init__(self, labeled, unlabeled):
            self.labeled, self.unlabeled, self.val = labeled, unlabeled, []

    splits = {"cls": S(cls_ids[:5], cls_ids[5:42]), "seg": S(seg_ids[:3], seg_ids[3:10])}
    state = P.create_state()
    if sharding == "per_worker":
        shards = P.build_datasets(cfg, splits, state=state, world_size=2)
        assert {k: len(v) for k, v in shards.items()} == {"unl_cls": 2, "unl_seg": 2}
    else:
        datasets = P.build_datasets(cfg, splits, state=state)
        assert P.dataset_config(datasets)._datasets_to_split == ["unl_cls", "unl_seg"]
        shards = {name: ds.streaming_split(2, equal=True) for name, ds in datasets.items()}
    assert set(shards) == {"unl_cls", "unl_seg"}
    cls_pool = P.load_labeled_pool(cfg.data.cls_data, splits["cls"].labeled, cfg)
    seg_pool = P.load_labeled_pool(cfg.data.seg_data, splits["seg"].labeled, cfg)
    steps = 6
    results, errors, restarts = {}, [], {}

    def worker(rank):
        try:
            mine = {name: its[rank] for name, its in shards.items()}
            streams = P.open_streams(cfg, mine, rank, 0, state=state, world_size=2,
                                     shared=sharding == "streaming_split")
            out = []
            for epoch in range(2):
                out.append([b for b in P.TrainBatches(cfg, streams, cls_pool, seg_pool, rank, 2,
                                                       epoch, state=state,
                                                       steps_per_epoch=steps)])
            results[rank] = out
            restarts[rank] = streams["unl_seg"].restart
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sorted(results) == [0, 1]
    for rank in (0, 1):
        for epoch_batches in results[rank]:
            assert len(epoch_batches) == steps
            for b in epoch_batches:
                assert b["cls_img"].shape == (4, 1, SIZE, SIZE) and str(b["cls_img"].dtype) == "torch.uint8"
                assert b["cls_label"].shape == (4,) and str(b["cls_label"].dtype) == "torch.int64"
                assert b["weak_img"].shape == b["strong_img"].shape == (4, 1, SIZE, SIZE)
                assert b["seg_mask"].shape == (4, 1, SIZE, SIZE) and b["seg_mask"].max() <= 1
                assert b["seg_ignore"].shape == (4, 1, SIZE, SIZE)
                assert b["useg_img"].shape == (4, 1, SIZE, SIZE)
    # the 7-row seg stream (3-4 rows per worker) ran out and restarted: new executions
    # numbered on passes the earlier ones did not use
    passes = P.passes_per_execution(cfg)
    for rank in (0, 1):
        assert restarts[rank] >= 2
        key = "unl_seg" if sharding == "streaming_split" else P.pass_key("unl_seg", rank, 2)
        assert ray_local.get(state.get_pass.remote(key)) == (restarts[rank] - 1) * passes


def test_steps_per_epoch_rule():
    cfg = _cfg(optim={"steps_per_epoch": None})
    assert P.steps_per_epoch(cfg, 100, 2) == 100 // (4 * 2)
    assert P.steps_per_epoch(_cfg(optim={"steps_per_epoch": 7}), 100, 2) == 7
    assert streams_for("enc") == ("cls",)


def _classes(batch) -> set:
    """The classes (id prefixes) of an unlabeled debug batch."""
    return {i.split("/")[0] for i in batch["unl_id"]}


def _two_epochs_of_unlabeled_batches(uri, ids, cfg) -> list:
    """Two epochs of ``TrainBatches`` (batches of 8, one worker, ``len(ids) // 8`` steps)
    streaming ``ids`` of ``uri`` with their ids attached (``debug``), as training does."""
    pool = P.load_labeled_pool(uri, ids[:2], cfg)
    state = P.create_state()
    ds = P.stream_dataset(uri, ids, cfg, mode="pair", stream="unl_cls", state=state, debug=True)
    shard = ds.streaming_split(1, equal=True)[0]
    return [list(P.TrainBatches(cfg, {"unl_cls": shard}, pool, None, 0, 1, epoch, state=state,
                                steps_per_epoch=len(ids) // 8)) for epoch in range(2)]


@pytest.mark.realdata
@pytest.mark.slow
def test_class_sorted_dataset_batches_mix_classes(real_sets, tmp_path, ray_local):
    """A dataset stored in id order (class folder first: all NORMAL, then all PNEUMONIA; what
    multimix prepare wrote before it stored rows in hashed order): the row_groups reader reads
    several row groups per task from a per-pass permutation and shuffles them, so the unlabeled
    batches still mix classes, and the row-group order changes between passes."""
    rows = sorted(real_sets["cls_rows"].values(), key=lambda r: r["id"])  # class-sorted
    uri = write_dataset(str(tmp_path / "sorted"), rows, "cls", SIZE, shards=2, row_group_rows=4)
    cfg = _cfg(uri, data={"unlabeled_batch": 8, "reader": "row_groups"},
               model={"variant": "enc-ssl"})
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and ids[0].startswith("NORMAL/") and ids[-1].startswith("PNEUMONIA/")
    epochs = []
    for batches in _two_epochs_of_unlabeled_batches(uri, ids, cfg):
        assert all(len(b["unl_id"]) == 8 for b in batches)
        mixed = [len(_classes(b)) == 2 for b in batches]
        assert mixed[0] and sum(mixed) >= len(mixed) - 1, [sorted(b["unl_id"]) for b in batches]
        epochs.append([i for b in batches for i in b["unl_id"]])
    assert epochs[0] != epochs[1]  # a new order (and augmentation pass) every epoch
    # the row groups a task reads: a seeded permutation, new every pass
    a = P._task_groups(0, 20, 4, 0, 0, "unl_cls")
    assert a == P._task_groups(0, 20, 4, 0, 0, "unl_cls") != P._task_groups(0, 20, 4, 0, 1, "unl_cls")


@pytest.mark.realdata
@pytest.mark.slow
def test_read_parquet_is_fused_mixes_classes_and_reshuffles(real_sets, tmp_path, ray_local,
                                                             caplog):
    """The ``read_parquet`` reader: ``ray.data.read_parquet`` fused with the decode/augment map into one
    task per read unit, split into several read units (row groups, not one task for the whole
    set); on prepare's hashed row order its batches mix classes and change between passes;
    a dataset in the old id order is named in a warning."""
    rows = _hash_order(real_sets["cls_rows"].values())
    uri = write_dataset(str(tmp_path / "hashed"), rows, "cls", SIZE, shards=2, row_group_rows=8)
    cfg = _cfg(uri, data={"unlabeled_batch": 8, "reader": "read_parquet"},
               model={"variant": "enc-ssl"})
    ids = [r["id"] for r in rows]
    epochs = []
    for batches in _two_epochs_of_unlabeled_batches(uri, ids, cfg):
        mixed = [len(_classes(b)) == 2 for b in batches]
        assert sum(mixed) >= len(mixed) - 1, [sorted(b["unl_id"]) for b in batches]
        epochs.append([i for b in batches for i in b["unl_id"]])
        assert len(set(epochs[-1])) == len(epochs[-1])  # one pass: no row twice
    assert epochs[0] != epochs[1]
    # fused read → map, several tasks (a direct iteration exposes the operator stats)
    P.stream_dataset(uri, ids, cfg, mode="pair", stream="unl_cls").materialize()
    plain = P.stream_dataset(uri, ids, cfg, mode="pair", stream="unl_cls")
    assert sum(len(b["weak_img"]) for b in plain.iter_batches(batch_size=None)) == len(ids)
    ops = [ln for ln in plain.stats().splitlines() if ln.startswith("Operator")]
    fused = [ln for ln in ops if "Read" in ln and "->MapBatches(_block_map_fn)" in ln]
    assert fused, ops
    assert int(fused[0].split(":")[1].split("tasks executed")[0]) >= 2, fused

    sorted_rows = sorted(rows, key=lambda r: r["id"])
    old = write_dataset(str(tmp_path / "id-order"), sorted_rows, "cls", SIZE)
    with caplog.at_level("WARNING", logger="multimix.data.pipeline"):
        P.stream_dataset(old, None, cfg, mode="pair")
    assert "id-order" in caplog.text and "data.reader=row_groups" in caplog.text


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("shards,row_group_rows,world", [(2, 4, 3), (1, 100, 2), (3, 4, 2)])
@pytest.mark.realdata
@pytest.mark.slow
def test_per_worker_datasets_partition_the_pool(real_sets, tmp_path, ray_local, reader, shards,
                                                row_group_rows, world):
    """The per-worker datasets of one pool (data.sharding=per_worker) hold disjoint parts that
    together are the pool, with more row groups / shards than workers and with fewer (one row
    group in one shard: rows are dealt by id hash), for both readers."""
    rows = _hash_order(real_sets["cls_rows"].values())
    uri = write_dataset(str(tmp_path / "p"), rows, "cls", SIZE, shards=shards,
                        row_group_rows=row_group_rows)
    cfg = _cfg(uri, data={"reader": reader})
    ids = [r["id"] for r in rows][:45]
    parts = [set(_take_all(P.stream_dataset(uri, ids, cfg, mode="pair", stream="unl_cls",
                                            debug=True, rank=r, world_size=world)))
             for r in range(world)]
    assert set().union(*parts) == set(ids)
    assert sum(len(p) for p in parts) == len(ids)  # disjoint
    assert all(len(p) >= len(ids) // (3 * world) for p in parts), [len(p) for p in parts]
    with pytest.raises(ValueError, match="rank 2"):
        P.stream_dataset(uri, ids, cfg, mode="pair", rank=2, world_size=2)


@pytest.mark.realdata
def test_one_execution_spans_passes(real_sets, ray_local):
    """row_groups with ``passes=3``: one execution yields every row 3 times, pass after pass
    (one task at a time here), each pass's views rendered for augmentation pass ``base + k``
    (``base`` = the state actor's value): re-rendered from the id they match exactly."""
    cfg = _cfg(real_sets["cls"], data={"reader": "row_groups"})
    ids = sorted(real_sets["cls_rows"])[:24]
    state = P.create_state()
    ray_local.get(state.set_pass.remote("unl_cls", 40))
    ds = P.stream_dataset(cfg.data.cls_data, ids, cfg, mode="pair", stream="unl_cls",
                          state=state, debug=True, passes=3)
    seen = [(str(b["id"][k]), b["weak_img"][k], b["strong_img"][k])
            for b in ds.iter_batches(batch_size=None, batch_format="numpy")
            for k in range(len(b["id"]))]
    assert len(seen) == 3 * len(ids)
    aug = Augmenter.from_config(cfg.augment, SIZE)
    src = real_sets["cls_rows"]
    for k in range(3):  # data_concurrency=1: the passes arrive in order
        chunk = seen[k * len(ids):(k + 1) * len(ids)]
        assert sorted(i for i, _, _ in chunk) == ids
        for rid, weak, strong in chunk[:6]:
            w, s = aug.pair(src[rid]["image"][None], row_keys([rid], cfg.optim.seed, 40 + k,
                                                               "unl_cls"))
            assert np.array_equal(weak, w[0]) and np.array_equal(strong, s[0])
    # passes per execution: the epochs (at most _MAX_PASSES) with row_groups, 1 with read_parquet
    assert P.passes_per_execution(cfg) == min(cfg.optim.epochs, P._MAX_PASSES)
    assert P.passes_per_execution(_cfg(data={"reader": "read_parquet"})) == 1


def test_block_target_is_three_quarters_of_one_yield(ray_local, tmp_path):
    """Ray Data merges a task's yields up to ``target_max_block_size`` (128 MiB by default:
    each task's output held back until it ended) and slices blocks of 1.5 targets or more
    (copying the rest into the next block). Every stream dataset is built with a target
    between 2/3 of one yield and one yield, whatever its mode; a smaller value the user set is
    kept, and the global context is left as it was."""
    import ray.data

    rows = synthetic_rows(16, 64)
    uri = write_dataset(str(tmp_path / "cls"), rows, "cls", 64, shards=1)
    cfg = _cfg(uri, data={"image_size": 64})
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    try:
        ctx.target_max_block_size = 128 << 20
        for mode, views in (("pair", 2), ("useg", 1)):
            for reader in ("read_parquet", "row_groups"):
                ds = P.stream_dataset(uri, None, cfg, mode=mode, reader=reader)
                one_yield = P.block_bytes(64) * views
                target = ds.context.target_max_block_size
                assert one_yield * 2 / 3 < target <= one_yield, (mode, reader, target)
                assert target == P.block_target(64, mode)
        assert ctx.target_max_block_size == 128 << 20
        assert P.block_target(256, "pair") == 2 * P.block_target(256, "useg") > 1 << 20
        ctx.target_max_block_size = 1 << 20
        ds = P.stream_dataset(uri, None, cfg, mode="pair", reader="row_groups")
        assert ds.context.target_max_block_size == 1 << 20
    finally:
        ctx.target_max_block_size = saved


def test_binary_cells_are_zero_copy_views_with_nulls_slices_and_chunks():
    import pyarrow as pa

    vals = [b"\x89PNG-a", None, b"", b"\xff\x00c" * 5, b"d"]
    for typ in (pa.binary(), pa.large_binary()):
        arr = pa.array(vals, typ)
        chunked = pa.chunked_array([arr.slice(0, 2), arr.slice(2)], typ)
        for col, want in ((arr, vals), (chunked, vals), (arr.slice(1, 3), vals[1:4]),
                          (pa.chunked_array([], typ), [])):
            cells = P.binary_cells(col)
            assert [None if c is None else bytes(c) for c in cells] == want
            # views into the Arrow buffer (no copies), as unsigned bytes
            assert all(isinstance(c, memoryview) and c.format == "B" for c in cells
                       if c is not None)
    big = pa.array([bytes(range(256)) * 4], pa.binary())
    (cell,) = P.binary_cells(big)
    assert np.frombuffer(cell, np.uint8).ctypes.data == big.buffers()[2].address
    assert P.binary_cells(pa.array([None, None])) == [None, None]  # all-null column
    assert P.binary_cells(pa.array(["x"], pa.string())) == ["x"]  # other types: as Python values


class _FakeShard:
    """Stands in for a Ray Data shard: ``iter_batches`` yields the given blocks (read-only,
    as blocks in the object store are) and records its arguments."""

    def __init__(self, blocks):
        self.blocks, self.calls = blocks, []

    def iter_batches(self, **kw):
        self.calls.append(kw)
        for n0, n in self.blocks:
            a = np.arange(n0, n0 + n, dtype=np.int64)
            a.flags.writeable = False
            yield {"weak_img": a, "strong_img": a + 1000}


def test_cursor_cuts_batches_from_whole_blocks():
    """data.shuffle_buffer_rows=0: whole blocks of uneven sizes are cut into batches in
    order, across block boundaries and across executions; every batch is writable (torch
    needs that) and only its own rows are copied."""
    shard = _FakeShard([(0, 7), (7, 3), (10, 5)])  # 15 rows per execution
    c = P._Cycler(shard, 4, "unl_cls", None, 0, 0, 0)
    got = [c.next() for _ in range(8)]  # 32 rows: two executions and a bit
    assert [kw["batch_size"] for kw in shard.calls] == [None, None, None]
    assert all("local_shuffle_buffer_size" not in kw for kw in shard.calls)
    flat = np.concatenate([b["weak_img"] for b in got])
    assert flat.tolist() == (list(range(15)) * 3)[:32]
    for b in got:
        assert b["weak_img"].shape == (4,) and b["weak_img"].flags.writeable
        np.testing.assert_array_equal(b["strong_img"], b["weak_img"] + 1000)
        b["weak_img"][0] = -1  # a copy: the block is untouched
    assert c.next()["weak_img"].tolist() == [2, 3, 4, 5]  # rows 32.. = 2.. of execution 3


def test_cursor_shuffle_buffer_and_empty_shard():
    """shuffle_rows > 0 asks Ray Data for batches through a local shuffle buffer (at least
    one batch); a shard that stays empty for two executions is an error naming the stream."""
    shard = _FakeShard([(0, 8)])
    c = P._Cycler(shard, 4, "unl_cls", None, 0, 0, 0, shuffle_rows=2)
    c.next()
    kw = shard.calls[0]
    assert kw["batch_size"] == 4 and kw["local_shuffle_buffer_size"] == 4
    empty = P._Cycler(_FakeShard([]), 4, "unl_seg", None, 0, 0, 0)
    with pytest.raises(P.DataError, match="unl_seg"):
        empty.next()


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.realdata
def test_augmenter_hook_renders_the_views(real_sets, ray_local, reader):
    """``stream_dataset(augmenter=...)`` replaces what renders the views in the map tasks:
    with ``bench data``'s :class:`Unaugmented` both views are the stored image itself (what
    its ``e2e_transport_*`` figures carry)."""
    from multimix.bench.data import Unaugmented

    cfg = _cfg(real_sets["cls"], data={"reader": reader})
    ids = sorted(real_sets["cls_rows"])[:12]
    rows = _take_all(P.stream_dataset(cfg.data.cls_data, ids, cfg, mode="pair",
                                      stream="unl_cls", debug=True, augmenter=Unaugmented()))
    assert sorted(rows) == ids
    for rid, r in rows.items():
        src = real_sets["cls_rows"][rid]["image"]
        assert np.array_equal(r["weak_img"], src) and np.array_equal(r["strong_img"], src)
