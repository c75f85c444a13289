"""The data layer on real chest X-rays: the row-group reader (local Parquet and S3, views vs
source, skipped rows, passes per execution, block sizes), the worker's stream cursors and
batches (uneven streams across 2 workers, split as Ray Train's DataConfig does), the driver's
datasets and steps."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from multimix.config import load_config
from multimix.data import pipeline as P
from multimix.data import readers as R
from multimix.data.batches import StreamCursor, TrainBatches, open_streams
from multimix.data.decode import binary_cells
from multimix.data.pools import eval_batches, load_labeled_pool
from multimix.data.state import create_state, skipped_rows
from multimix.data.augment import Augmenter, row_keys
from multimix.data.images import encode_png
from multimix.data.prepare import row_order_key
from multimix.errors import DataError
from multimix.testing import kermany_rows, synthetic_rows, v7_rows, write_dataset
from multimix.variants import streams_for

SIZE = 64


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


@pytest.mark.realdata
def test_local_pairs_and_labeled_pool(real_sets, ray_local):
    cfg = _cfg(real_sets["cls"], real_sets["seg"])
    ids = sorted(real_sets["cls_rows"])[5:]
    ds = R.stream_dataset(cfg.data.cls_data, ids, cfg, stream="unl_cls", debug=True)
    _check_pairs(_take_all(ds), real_sets["cls_rows"], cfg, len(ids))

    pool = load_labeled_pool(cfg.data.seg_data, sorted(real_sets["seg_rows"])[:6], cfg)
    assert pool.images.shape == (6, SIZE, SIZE) and pool.masks.max() <= 1
    for rid, img, m in zip(pool.ids, pool.images, pool.masks):
        assert np.array_equal(img, real_sets["seg_rows"][rid]["image"])
        assert np.array_equal(m, real_sets["seg_rows"][rid]["mask"])
    batches = list(eval_batches(pool, 4))
    assert [b["seg_img"].shape[0] for b in batches] == [4, 2]
    assert str(batches[0]["seg_mask"].dtype) == "torch.uint8"


@pytest.mark.realdata
def test_s3_same_as_local(real_sets, s3_server, ray_local):
    import pyarrow.fs as pafs

    bucket = "mm-pipe"
    s3_server.make_bucket(bucket)
    st = load_config(None, {"storage": s3_server.storage_overrides()}).storage
    from multimix.data import storage

    fs, _ = storage.resolve(f"s3://{bucket}/cls", st)
    pafs.copy_files(real_sets["cls"], f"{bucket}/cls", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    cfg = _cfg(f"s3://{bucket}/cls", storage=s3_server.storage_overrides())
    ids = sorted(real_sets["cls_rows"])[:20]
    ds = R.stream_dataset(cfg.data.cls_data, ids, cfg, stream="unl_cls", debug=True)
    _check_pairs(_take_all(ds), real_sets["cls_rows"], cfg, len(ids))
    pool = load_labeled_pool(cfg.data.cls_data, ids[:5], cfg)
    assert pool.labels.tolist() == [real_sets["cls_rows"][i]["label"] for i in ids[:5]]


@pytest.mark.realdata
def test_corrupt_row_skipped_and_counted(real_sets, tmp_path, ray_local):
    rows = list(real_sets["cls_rows"].values())[:6]
    good = encode_png(rows[0]["image"])
    rows = [dict(r) for r in rows] + [{"id": "BAD/truncated", "image_bytes": good[:100],
                                       "label": 0}]
    uri = write_dataset(str(tmp_path / "bad"), rows, "cls", SIZE)
    cfg = _cfg(uri)
    state = create_state()
    ds = R.stream_dataset(uri, None, cfg, stream="unl_cls", state=state, debug=True)
    got = _take_all(ds)
    assert len(got) == 6 and "BAD/truncated" not in got
    info = skipped_rows(state)
    assert info["counts"] == {"unl_cls": 1}
    assert info["examples"]["unl_cls"][0][0] == "BAD/truncated"
    pool = load_labeled_pool(uri, [r["id"] for r in rows], cfg)
    assert len(pool) == 6 and pool.skipped == 1


@pytest.mark.realdata
@pytest.mark.slow
def test_two_workers_uneven_streams_same_step_count(real_sets, ray_local):
    """2 workers; unlabeled-cls pool of 37 rows, unlabeled-seg pool of 7 (shorter than one batch
    per worker), labeled pools of 5 and 3: every worker yields exactly steps_per_epoch batches
    from its share of one split dataset per stream (as Ray Train's DataConfig splits it),
    through cursors kept across the two epochs (the short stream restarts)."""
    cfg = _cfg(real_sets["cls"], real_sets["seg"], model={"variant": "multimix"},
               data={"unlabeled_seg_from": "seg"})
    cls_ids = sorted(real_sets["cls_rows"])
    seg_ids = sorted(real_sets["seg_rows"])

    class S:  # a Split-like object
        def __init__(self, labeled, unlabeled):
            self.labeled, self.unlabeled, self.val = labeled, unlabeled, []

    splits = {"cls": S(cls_ids[:5], cls_ids[5:42]), "seg": S(seg_ids[:3], seg_ids[3:10])}
    state = create_state()
    datasets = P.build_datasets(cfg, splits, state=state)
    assert P.dataset_config(datasets)._datasets_to_split == ["unl_cls", "unl_seg"]
    shards = {name: ds.streaming_split(2, equal=True) for name, ds in datasets.items()}
    cls_pool = load_labeled_pool(cfg.data.cls_data, splits["cls"].labeled, cfg)
    seg_pool = load_labeled_pool(cfg.data.seg_data, splits["seg"].labeled, cfg)
    steps = 6
    results, errors, restarts = {}, [], {}

    def worker(rank):
        try:
            mine = {name: its[rank] for name, its in shards.items()}
            streams = open_streams(cfg, mine, rank, 0, state=state)
            out = []
            for epoch in range(2):
                out.append([b for b in TrainBatches(cfg, streams, cls_pool, seg_pool, rank,
                                                    epoch, steps_per_epoch=steps)])
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
    passes = R.passes_per_execution(cfg)
    for rank in (0, 1):
        assert restarts[rank] >= 2
        assert ray_local.get(state.get_pass.remote("unl_seg")) == (restarts[rank] - 1) * passes


def test_steps_per_epoch_rule():
    cfg = _cfg(optim={"steps_per_epoch": None})
    assert P.steps_per_epoch(cfg, 100, 2) == 100 // (4 * 2)
    assert P.steps_per_epoch(_cfg(optim={"steps_per_epoch": 7}), 100, 2) == 7
    assert streams_for("enc") == ("cls",)
    with pytest.raises(DataError, match="needs a labeled cls pool"):
        TrainBatches(_cfg(model={"variant": "enc"}), {}, None, None, 0, 0, 1)
    with pytest.raises(DataError, match="needs the dataset shard 'unl_seg'"):
        TrainBatches(_cfg(), {"unl_cls": None}, [1], [1], 0, 0, 1)  # pools: anything with len


@pytest.mark.parametrize("seg_augment", [False, True])
def test_labeled_seg_batches_augment_image_mask_and_ignore_alike(seg_augment):
    """The labeled segmentation stream (Ray-free): ``augment.seg_augment`` applies the one flip +
    crop of ``Augmenter.geometric`` to image, mask and ignore alike (a pixel rule linking them
    survives), and off, rows are the pool's rows untouched."""
    from multimix.data.pools import LabeledPool

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, SIZE, SIZE), dtype=np.uint8)
    pool = LabeledPool(ids=[f"s{i}" for i in range(6)], images=images,
                       masks=(images > 128).astype(np.uint8), ignore=(images < 30).astype(np.uint8))
    cfg = _cfg(model={"variant": "unet"}, augment={"seg_augment": seg_augment})
    batches = list(TrainBatches(cfg, {}, None, pool, 0, 0, steps_per_epoch=5))
    assert len(batches) == 5
    changed = 0
    for b in batches:
        img, m, ig = (b[k][:, 0].numpy() for k in ("seg_img", "seg_mask", "seg_ignore"))
        assert img.shape == (4, SIZE, SIZE)
        assert np.array_equal(m, (img > 128).astype(np.uint8))  # the same warp on all three
        assert np.array_equal(ig, (img < 30).astype(np.uint8))
        same = [any(np.array_equal(x, p) for p in images) for x in img]
        changed += same.count(False)
        if not seg_augment:
            assert all(same)
    if seg_augment:  # most draws move the image (flip or a non-zero crop offset)
        assert changed >= 10


@pytest.mark.parametrize("sampling", ["uniform", "balanced"])
def test_labeled_cls_batches_by_cls_sampling(sampling):
    """The labeled classification stream (Ray-free): ``data.cls_sampling=uniform`` keeps the
    pool's class ratio (here 1 : 9), ``balanced`` draws each class about equally; both are the
    same batches for the same seed, and the labels match the images drawn."""
    from multimix.data.pools import LabeledPool

    labels = np.array([0] * 6 + [1] * 54, dtype=np.int64)
    images = np.repeat(np.arange(60, dtype=np.uint8)[:, None, None], SIZE, 1).repeat(SIZE, 2)
    pool = LabeledPool(ids=[f"c{i}" for i in range(60)], images=images, labels=labels)
    # constant images (value = index): the weak view (flip, reflect-pad crop) keeps them
    cfg = _cfg(model={"variant": "enc"}, data={"cls_batch": 16, "cls_sampling": sampling})

    def draw():
        return list(TrainBatches(cfg, {}, pool, None, 0, 0, steps_per_epoch=50))

    batches = draw()
    y = np.concatenate([b["cls_label"].numpy() for b in batches])
    centre = np.concatenate([b["cls_img"][:, 0, SIZE // 2, SIZE // 2].numpy() for b in batches])
    assert np.array_equal(labels[centre.astype(np.int64)], y)  # each label is its image's
    frac0 = float(np.mean(y == 0))
    if sampling == "uniform":
        assert 0.05 <= frac0 <= 0.16, frac0  # 800 draws at p = 0.1
    else:
        assert 0.44 <= frac0 <= 0.56, frac0  # at p = 0.5
        # every image of the minority class is drawn, not one of them over and over
        assert set(centre[y == 0].tolist()) == set(range(6))
    again = draw()
    assert all(np.array_equal(a["cls_label"], b["cls_label"]) for a, b in zip(batches, again))


def _classes(batch) -> set:
    """The classes (id prefixes) of an unlabeled debug batch."""
    return {i.split("/")[0] for i in batch["unl_id"]}


def _two_epochs_of_unlabeled_batches(uri, ids, cfg) -> list:
    """Two epochs of ``TrainBatches`` (batches of 8, one worker, ``len(ids) // 8`` steps)
    streaming ``ids`` of ``uri`` with their ids attached (``debug``), as training does."""
    pool = load_labeled_pool(uri, ids[:2], cfg)
    state = create_state()
    ds = R.stream_dataset(uri, ids, cfg, stream="unl_cls", state=state, debug=True,
                          passes=R.passes_per_execution(cfg))
    streams = open_streams(cfg, {"unl_cls": ds.streaming_split(1, equal=True)[0]}, 0, 0, state)
    return [list(TrainBatches(cfg, streams, pool, None, 0, epoch,
                              steps_per_epoch=len(ids) // 8)) for epoch in range(2)]


@pytest.mark.realdata
@pytest.mark.slow
def test_class_sorted_dataset_batches_mix_classes(real_sets, tmp_path, ray_local):
    """A dataset stored in id order (class folder first: all NORMAL, then all PNEUMONIA; what
    multimix prepare wrote before it stored rows in hashed order): the row-group reader reads
    several row groups per task from a per-pass permutation and shuffles them, so the unlabeled
    batches still mix classes, and the row-group order changes between passes."""
    rows = sorted(real_sets["cls_rows"].values(), key=lambda r: r["id"])  # class-sorted
    uri = write_dataset(str(tmp_path / "sorted"), rows, "cls", SIZE, shards=2, row_group_rows=4)
    cfg = _cfg(uri, data={"unlabeled_batch": 8}, model={"variant": "enc-ssl"},
               optim={"epochs": 2})
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
    a = R.task_groups(0, 20, 4, 0, 0, "unl_cls")
    assert a == R.task_groups(0, 20, 4, 0, 0, "unl_cls") != R.task_groups(0, 20, 4, 0, 1, "unl_cls")


@pytest.mark.realdata
def test_one_execution_spans_passes(real_sets, ray_local):
    """row_groups with ``passes=3``: one execution yields every row 3 times, pass after pass
    (one task at a time here), each pass's views rendered for augmentation pass ``base + k``
    (``base`` = the state actor's value): re-rendered from the id they match exactly."""
    cfg = _cfg(real_sets["cls"])
    ids = sorted(real_sets["cls_rows"])[:24]
    state = create_state()
    ray_local.get(state.set_pass.remote("unl_cls", 40))
    ds = R.stream_dataset(cfg.data.cls_data, ids, cfg, stream="unl_cls", state=state,
                          debug=True, passes=3)
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
    # passes per execution: the epochs (at most MAX_PASSES)
    assert R.passes_per_execution(cfg) == min(cfg.optim.epochs, R.MAX_PASSES)
    assert R.passes_per_execution(_cfg(optim={"epochs": 10_000})) == R.MAX_PASSES


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
        for stream, views in (("unl_cls", 2), ("unl_seg", 1)):
            ds = R.stream_dataset(uri, None, cfg, stream=stream)
            one_yield = R.block_bytes(64) * views
            target = ds.context.target_max_block_size
            assert one_yield * 2 / 3 < target <= one_yield, (stream, target)
            assert target == R.block_target(64, stream)
        assert ctx.target_max_block_size == 128 << 20
        assert R.block_target(256, "unl_cls") == 2 * R.block_target(256, "unl_seg") > 1 << 20
        ctx.target_max_block_size = 1 << 20
        ds = R.stream_dataset(uri, None, cfg, stream="unl_cls")
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
            cells = binary_cells(col)
            assert [None if c is None else bytes(c) for c in cells] == want
            # views into the Arrow buffer (no copies), as unsigned bytes
            assert all(isinstance(c, memoryview) and c.format == "B" for c in cells
                       if c is not None)
    big = pa.array([bytes(range(256)) * 4], pa.binary())
    (cell,) = binary_cells(big)
    assert np.frombuffer(cell, np.uint8).ctypes.data == big.buffers()[2].address
    assert binary_cells(pa.array([None, None])) == [None, None]  # all-null column
    assert binary_cells(pa.array(["x"], pa.string())) == ["x"]  # other types: as Python values


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
    c = StreamCursor(shard, 4, "unl_cls")
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
    c = StreamCursor(shard, 4, "unl_cls", shuffle_rows=2)
    c.next()
    kw = shard.calls[0]
    assert kw["batch_size"] == 4 and kw["local_shuffle_buffer_size"] == 4
    empty = StreamCursor(_FakeShard([]), 4, "unl_seg")
    with pytest.raises(DataError, match="unl_seg"):
        empty.next()


@pytest.mark.realdata
def test_augmenter_hook_renders_the_views(real_sets, ray_local):
    """``stream_dataset(augmenter=...)`` replaces what renders the views in the map tasks:
    with ``bench data``'s :class:`Unaugmented` both views are the stored image itself (what
    its ``e2e_transport_*`` figures carry)."""
    from multimix.bench.data import Unaugmented

    cfg = _cfg(real_sets["cls"])
    ids = sorted(real_sets["cls_rows"])[:12]
    rows = _take_all(R.stream_dataset(cfg.data.cls_data, ids, cfg, stream="unl_cls",
                                      debug=True, augmenter=Unaugmented()))
    assert sorted(rows) == ids
    for rid, r in rows.items():
        src = real_sets["cls_rows"][rid]["image"]
        assert np.array_equal(r["weak_img"], src) and np.array_equal(r["strong_img"], src)


def test_each_split_dataset_gets_the_readahead_cap():
    """data.readahead_mb caps each streaming dataset's object-store budget (Ray Data reads
    ahead until it is full); null leaves Ray's default."""
    from multimix.config import ConfigError

    cfg = load_config("cpu-small", ["data.readahead_mb=64"])
    dc = P.dataset_config({"unl_cls": None, "unl_seg": None}, cfg)
    opts = dc._user_execution_options
    assert set(opts) == {"unl_cls", "unl_seg"}
    assert all(o.resource_limits.object_store_memory == 64 * 2**20 for o in opts.values())
    assert P.dataset_config({"unl_cls": None}, load_config(
        "cpu-small", ["data.readahead_mb=null"]))._user_execution_options is None
    with pytest.raises(ConfigError, match="data.readahead_mb"):
        load_config("cpu-small", ["data.readahead_mb=0"])
