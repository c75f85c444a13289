"""The Ray Data input pipeline: prepared Parquet shards → decoded, augmented uint8 batches.

Driver side (before ``TorchTrainer``)::

    state = create_state()                                   # pass counter + skipped-row counter
    datasets = build_datasets(cfg, splits, state=state)      # {"unl_cls": ..., "unl_seg": ...}
    trainer = TorchTrainer(train_fn, train_loop_config={..., "data_state": state},
                           datasets=datasets, dataset_config=dataset_config(datasets), ...)

Worker side (inside the train loop)::

    shards = {name: ray.train.get_dataset_shard(name) for name in STREAM_DATASETS
              if name in datasets_needed}
    cls_pool = load_labeled_pool(cfg.data.cls_data, splits["cls"].labeled, cfg)   # once
    seg_pool = load_labeled_pool(cfg.data.seg_data, splits["seg"].labeled, cfg)   # once
    for epoch in range(start, cfg.optim.epochs):
        for batch in TrainBatches(cfg, shards, cls_pool, seg_pool, rank, world, epoch,
                                  state=state, steps_per_epoch=steps):
            engine.train_step(model, batch, ...)

What runs where:

- unlabeled pools *stream*, through one of two readers (``data.reader``), each fused with
  one generator ``map_batches`` on CPU tasks that decodes the PNGs and renders the weak AND
  the strong view of the same image (classification stream) or the plain image
  (unlabeled-segmentation stream), yielding blocks of ~16 MB of pixels per view:

  * ``read_parquet`` (default): ``ray.data.read_parquet`` on the shards (local or ``s3://``
    through :func:`multimix.data.storage.resolve`), shard order shuffled per pass, read units
    of ~:data:`TASK_ROWS` rows (Ray 2.60 bin-packs row groups), each unit's rows shuffled in
    the map. Mixing relies on ``multimix prepare``'s hashed row order (every row group mixes
    classes). Ray lists the files again on every pass (its footer reader starts actors):
    measured ~2 s per pass on this 2-core VM, nothing next to a pass over a large pool.
  * ``row_groups``: multimix's own reader: ``from_items`` slots, each task reading several
    row groups that a seeded permutation (new every pass) scatters over the dataset and
    shuffling their rows together; footers are read once, on the driver. No per-pass listing,
    so it is the faster one on small pools and few CPUs (the ``cpu-small`` preset), and it
    mixes classes even on a class-sorted dataset.

  Measured on this 2-core VM with Ray 2.60 (4,096 rows per pass at 256², weak+strong,
  consumed through ``streaming_split``; ``multimix bench data`` prints these): row_groups
  ~790 img/s/core, first batch of a pass after ~1.2 s, ~1,440 after it; read_parquet ~460
  img/s/core, first batch after ~2.8 s, ~1,180 after it. Each pass is a new Ray Data
  execution whose resource budget is zero for its first 1-2 s (Ray's autoscaling coordinator
  answers asynchronously; one task runs meanwhile). Train's ``DataConfig`` splits either
  across workers with ``streaming_split(n, equal=True)``.
- the map reads the PNG bytes in place (:func:`binary_cells`: views of the Arrow buffers).
- :func:`configure_data_context` lowers Ray Data's target block size below one yielded block:
  at the default (128 MiB) Ray merged a task's yields and released them only when the task
  ended, so a pass's first batch waited for whole tasks.
- labeled pools are small: loaded once per worker, decoded to ``uint8`` arrays
  (:class:`LabeledPool`), sampled with replacement (seeded by seed/rank/epoch/step); their weak
  view (a flip + crop slice) is rendered on the worker (a few µs per image).
- every worker yields exactly ``steps_per_epoch`` batches: a stream that runs short restarts
  its shard (all workers restart at the same step, since ``equal=True`` shards have the same
  size), so DDP never waits on a missing batch.
- augmentation parameters are a pure function of ``(seed, pass, stream, row id)``
  (:func:`multimix.data.augment.row_keys`); the *pass* (``epoch * 1000 + restart``) is set by
  the workers on a tiny state actor before each pass and read by the map tasks.
- undecodable rows are dropped in the map task and counted on the state actor
  (:func:`skipped_rows`) and in the task's log; they never fail the run.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from multimix.data import storage
from multimix.data.augment import Augmenter, mix_keys, row_keys
from multimix.data.prepare import ROW_ORDER as _ROW_ORDER
from multimix.data.prepare import read_manifest
from multimix.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "STREAM_DATASETS",
    "streams_for",
    "create_state",
    "skipped_rows",
    "configure_data_context",
    "shard_paths",
    "stream_dataset",
    "build_datasets",
    "dataset_config",
    "steps_per_epoch",
    "LabeledPool",
    "load_labeled_pool",
    "TrainBatches",
    "eval_batches",
]

#: names of the Ray Datasets handed to TorchTrainer (and split across workers)
STREAM_DATASETS = ("unl_cls", "unl_seg")

_VARIANT_STREAMS = {
    "unet": {"seg"},
    "enc": {"cls"},
    "enc-ssl": {"cls", "unl"},
    "umtl": {"cls", "seg"},
    "umtl-s": {"cls", "seg"},
    "umtl-ssl": {"cls", "unl", "seg"},
    "umtl-ssl-s": {"cls", "unl", "seg"},
    "multimix": {"cls", "unl", "seg", "useg"},
}

_PASS_STRIDE = 1000  # pass = epoch * 1000 + restart index within the epoch


def streams_for(variant: str) -> set:
    """Which of the streams ``cls`` / ``unl`` / ``seg`` / ``useg`` a model variant consumes."""
    try:
        return set(_VARIANT_STREAMS[variant])
    except KeyError:
        raise DataError(f"model.variant: unknown variant {variant!r}") from None


# ---------------------------------------------------------------------------------------------
# shared state: the augmentation pass of each stream, and skipped rows


def _state_class():
    import ray

    @ray.remote(num_cpus=0)
    class PipelineState:
        def __init__(self):
            self._pass: dict = {}
            self._skipped: dict = {}
            self._examples: dict = {}

        def set_pass(self, stream: str, value: int) -> None:
            self._pass[stream] = int(value)

        def get_pass(self, stream: str) -> int:
            return self._pass.get(stream, 0)

        def add_skipped(self, stream: str, n: int, examples: list) -> None:
            self._skipped[stream] = self._skipped.get(stream, 0) + int(n)
            ex = self._examples.setdefault(stream, [])
            ex.extend(examples[: max(0, 10 - len(ex))])

        def skipped(self) -> dict:
            return {"counts": dict(self._skipped), "examples": dict(self._examples)}

    return PipelineState


def create_state():
    """A small actor (0 CPUs) holding each stream's augmentation pass and the skipped-row counts.

    Pass the handle to :func:`build_datasets` and (through ``train_loop_config``) to
    :class:`TrainBatches`.
    """
    return _state_class().remote()


def skipped_rows(state) -> dict:
    """``{"counts": {stream: n}, "examples": {stream: [(id, reason), ...]}}`` so far."""
    import ray

    return ray.get(state.skipped.remote())


def configure_data_context(progress_bars: bool = False, image_size: Optional[int] = None):
    """Ray Data settings for this pipeline (call on the driver before building datasets; a
    Dataset keeps a copy of the context it was built under).

    With ``image_size``, the target block size is lowered to 3/4 of one yielded block
    (:func:`block_bytes`): Ray Data's output buffer merges a task's yields until they pass
    the target (128 MiB by default), which held back every augmented block until its task
    ended (measured: the first batch of a pass arrived only when the pass's tasks finished).
    Below one yield, each block leaves the task as soon as it is rendered.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.verbose_progress = False
    try:
        ctx.print_on_execution_start = False
    except Exception:  # pragma: no cover - attribute missing in other versions
        pass
    if image_size is not None:
        target = max(1 << 20, block_bytes(image_size) * 3 // 4)
        if ctx.target_max_block_size is None or ctx.target_max_block_size > target:
            ctx.target_max_block_size = target
    return ctx


def block_bytes(size: int) -> int:
    """Pixel bytes of one view of one block a pipeline task yields (``_yield_rows(size)``
    rows of ``size``² ``uint8``)."""
    return _yield_rows(size) * size * size


# ---------------------------------------------------------------------------------------------
# the map function (runs in Ray Data tasks)


def binary_cells(col) -> list:
    """An Arrow binary column (``Array`` or ``ChunkedArray``) → one value per row: a zero-copy
    ``memoryview`` into the column's data buffer, or ``None`` for a null.

    Stands in for ``col.to_pylist()`` / ``take`` + ``to_pylist`` (both copy every image into a
    new ``bytes``; a chunked ``take`` first concatenates all chunks): the decoder reads the
    stored PNG where Arrow put it. The views keep the Arrow buffers alive. Columns of another
    type (e.g. all-null, binary views) fall back to ``to_pylist()``.
    """
    import pyarrow as pa

    out: list = []
    for arr in (col.chunks if isinstance(col, pa.ChunkedArray) else [col]):
        t = arr.type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            out.extend(arr.to_pylist())
            continue
        n = len(arr)
        if not n:
            continue
        _, offs, data = arr.buffers()[:3]
        width = 8 if pa.types.is_large_binary(t) else 4
        offsets = np.frombuffer(offs, np.int64 if width == 8 else np.int32, count=n + 1,
                                offset=arr.offset * width).tolist()
        mv = memoryview(data if data is not None else b"").cast("B")  # Arrow exports "b"
        cells = [mv[offsets[i]:offsets[i + 1]] for i in range(n)]
        if arr.null_count:
            for i in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).tolist():
                cells[i] = None
        out.extend(cells)
    return out


def _decode_rows(batch: Mapping[str, Any], size: int, columns: Sequence[str],
                 keep: Optional[frozenset]) -> tuple[list, dict, list]:
    """Decode the PNG columns of the rows to keep; returns (ids, arrays, skipped [(id, why)]).

    Pixels go straight from the decoder into preallocated ``(N, size, size)`` arrays (no
    per-row lists, no ``np.stack``); masks are binarised in place, once per batch.
    """
    from multimix.data.images import decode_png

    ids = [i if isinstance(i, str) else str(i) for i in batch["id"]]
    rows = [r for r, rid in enumerate(ids) if keep is None or rid in keep]
    out = {c: np.empty((len(rows), size, size), np.uint8) for c in columns}
    good_ids: list = []
    skipped: list = []
    k = 0
    for r in rows:
        try:
            for c in columns:
                data = batch[c][r] if c in batch else None
                if data is None and c != "image":
                    out[c][k] = 0
                    continue
                a = decode_png(data)
                if a.shape != (size, size):
                    raise DataError(f"image is {a.shape[0]}x{a.shape[1]}, expected {size}x{size}")
                out[c][k] = a
        except Exception as exc:  # noqa: BLE001 - any bad row is skipped, never fatal
            skipped.append((ids[r], str(exc)[:200]))
            continue
        good_ids.append(ids[r])
        k += 1
    for c in columns:
        out[c] = out[c][:k]
        if c != "image":
            np.greater(out[c], 127, out=out[c])  # 0/255 → {0, 1}, in place
    return good_ids, out, skipped


def _map_fn(batch: Mapping[str, Any], *, mode: str, stream: str, size: int, aug: Augmenter,
            augment: bool, seed: int, keep: Optional[frozenset], state, epoch: int,
            debug: bool, pass_no: Optional[int] = None) -> dict:
    columns = ("image", "mask", "ignore") if mode == "seg" else ("image",)
    ids, arrays, skipped = _decode_rows(batch, size, columns, keep)
    if skipped:
        logger.warning("multimix pipeline: skipped %d undecodable row(s) in stream %s, e.g. %s",
                       len(skipped), stream, skipped[:3])
        if state is not None:
            state.add_skipped.remote(stream, len(skipped), skipped[:10])
    if pass_no is None:
        pass_no = _current_pass(state, stream, epoch)
    keys = row_keys(ids, seed, pass_no, stream)
    img = arrays["image"]
    if mode == "pair":
        weak, strong = aug.pair(img, keys)
        out = {"unl_weak": weak, "unl_strong": strong}
    elif mode == "useg":
        out = {"useg_img": aug.weak(img, keys) if augment else img}
    elif mode == "seg":
        if augment:
            img, m, ig = aug.geometric(keys, img, arrays["mask"], arrays["ignore"])
        else:
            m, ig = arrays["mask"], arrays["ignore"]
        out = {"seg_img": img, "seg_mask": m, "seg_ignore": ig}
    else:
        raise ValueError(f"unknown pipeline mode {mode!r}")
    if debug:
        out["id"] = np.array(ids, dtype=object)
    return out


def _current_pass(state, stream: str, epoch: int) -> int:
    """The augmentation pass (set by the Train workers before each pass; ``epoch`` without a
    state actor)."""
    if state is None:
        return epoch
    import ray

    return int(ray.get(state.get_pass.remote(stream)))


# ---------------------------------------------------------------------------------------------
# driver side


def shard_paths(uri: str, storage_cfg=None):
    """``(pyarrow filesystem, [shard paths])`` of a prepared dataset."""
    manifest = read_manifest(uri, storage_cfg)
    fs, root = storage.resolve(uri, storage_cfg)
    shards = manifest.get("shards") or []
    if not shards:
        raise DataError(f"{uri}: the manifest lists no shards")
    return fs, [f"{root.rstrip('/')}/{s}" for s in shards], manifest


def stream_dataset(uri: str, ids: Optional[Sequence[str]], cfg, *, mode: str,
                   stream: Optional[str] = None, augment: bool = True, state=None,
                   epoch: int = 0, debug: bool = False, batch_size: Optional[int] = None,
                   reader: Optional[str] = None):
    """A Ray Dataset of decoded (and augmented) rows of ``uri`` restricted to ``ids``.

    Args:
        mode: ``"pair"`` → columns ``unl_weak``, ``unl_strong`` (weak and strong view of the same
            image); ``"useg"`` → ``useg_img`` (weak view when ``augment``); ``"seg"`` →
            ``seg_img``, ``seg_mask``, ``seg_ignore`` (flip+crop applied jointly when ``augment``).
            All ``uint8 (N, H, W)``.
        state: :func:`create_state` handle (augmentation pass, skipped counts) or None (pass =
            ``epoch``; skipped rows only logged).
        debug: add an ``id`` column (to check views against their source).
        batch_size: rows per yielded block (default :func:`_yield_rows`).
        reader: ``"read_parquet"`` or ``"row_groups"`` (default ``cfg.data.reader``).
    """
    stream = stream or mode
    reader = reader or cfg.data.reader
    size = cfg.data.image_size
    fs, paths, manifest = shard_paths(uri, cfg.storage)
    columns = ["id", "image"] + (["mask", "ignore"] if mode == "seg" else [])
    if batch_size is None:
        batch_size = _yield_rows(size)
    common = dict(columns=columns, batch_size=batch_size, mode=mode, stream=stream, size=size,
                  aug=Augmenter.from_config(cfg.augment, size), augment=augment,
                  seed=int(cfg.optim.seed), keep=frozenset(ids) if ids is not None else None,
                  state=state, epoch=epoch, debug=debug)
    if reader == "row_groups":
        return _row_group_dataset(uri, fs, paths, cfg, common)
    if reader == "read_parquet":
        return _read_parquet_dataset(uri, fs, paths, manifest, cfg, common)
    raise DataError(f"data.reader: unknown reader {reader!r} (read_parquet or row_groups)")


def _map_kwargs(cfg) -> dict:
    import ray.data

    kwargs: dict = {"num_cpus": cfg.scaling.data_cpus_per_task}
    if cfg.scaling.data_concurrency is not None:
        kwargs["compute"] = ray.data.TaskPoolStrategy(size=int(cfg.scaling.data_concurrency))
    return kwargs


def _read_parquet_dataset(uri: str, fs, paths: list, manifest: dict, cfg, common: dict):
    """``ray.data.read_parquet`` → one generator ``map_batches`` (decode, shuffle, augment),
    fused by Ray Data into a single task per read unit.

    - read units: Ray 2.60's Parquet reader (DataSource V2) bin-packs *row groups*, up to
      128 MiB per read task by default (a whole small dataset in one task); the bin is set to
      ~:data:`TASK_ROWS` rows of this dataset (and at most a quarter of it) so the CPUs share
      the work. Its footer listing starts 32 actors per pass by default; one per 64 shards here.
      Both through Ray's ``RAY_DATA_PARQUET_*`` variables, set only while the dataset is built
      and never over a value the user exported (older Rays ignore them).
    - mixing: shard order is shuffled per pass (seeded ``FileShuffleConfig``, reseeded each
      execution); ``multimix prepare`` stores rows in a hashed order, so every row group mixes
      classes; each map call shuffles its rows; the workers' local shuffle buffer mixes blocks.
    - ``batch_size=None`` and the same CPU/compute settings on read and map are what let Ray
      fuse them (a map with a fixed ``batch_size`` after a read is not fused).
    """
    import ray.data

    if manifest.get("row_order") != _ROW_ORDER:
        logger.warning(
            "%s was prepared in id order (class-sorted; an older multimix prepare): "
            "read_parquet shuffles whole row groups, so batches may hold a single class. "
            "Re-run multimix prepare, or set data.reader=row_groups.", uri)
    with storage.storage_errors(uri, cfg.storage):
        total = sum(max(0, i.size or 0) for i in fs.get_file_info(paths))
    rows = max(1, int(manifest.get("num_rows") or 1))
    bin_bytes = int(max(total / rows, min(TASK_ROWS * total / rows, total / 4)))
    knobs = {"RAY_DATA_PARQUET_BIN_PACKING_BYTES": str(bin_bytes),
             "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": str(max(1, min(32, -(-len(paths) // 64))))}
    kwargs = _map_kwargs(cfg)
    read_kwargs: dict = {"num_cpus": kwargs["num_cpus"]}
    if cfg.scaling.data_concurrency is not None:
        read_kwargs["concurrency"] = int(cfg.scaling.data_concurrency)
    seed = mix_keys(common["seed"], zlib.crc32(common["stream"].encode())) % (2**31)
    with _env_defaults(knobs), storage.storage_errors(uri, cfg.storage):
        ds = ray.data.read_parquet(
            paths, filesystem=fs, shuffle=ray.data.FileShuffleConfig(seed=seed), **read_kwargs)
    ds = ds.select_columns(common["columns"])
    return ds.map_batches(partial(_block_map_fn, **common), batch_size=None,
                          batch_format="pyarrow", zero_copy_batch=True, **kwargs)


class _env_defaults:
    """Set environment variables for a block of code, leaving alone any the user exported."""

    def __init__(self, values: Mapping[str, str]):
        self.values = {k: v for k, v in values.items() if k not in os.environ}

    def __enter__(self):
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k in self.values:
            os.environ.pop(k, None)


def _block_map_fn(batch, *, columns, batch_size, state, stream, epoch, seed, keep, **kw):
    """One ``pyarrow.Table`` block from ``read_parquet`` → shuffled, decoded, augmented
    blocks of ``batch_size`` rows (generator UDF). The PNGs are read in place
    (:func:`binary_cells`), not copied into Python ``bytes``."""
    from multimix.data.allocator import keep_freed_memory

    keep_freed_memory()  # once per worker process: reuse freed block memory (see allocator.py)
    ids = [v if isinstance(v, str) else str(v) for v in batch.column("id").to_pylist()]
    sel = np.arange(len(ids))
    if keep is not None:
        sel = np.flatnonzero([v in keep for v in ids])
    if not len(sel):
        return
    pass_no = _current_pass(state, stream, epoch)
    order = sel[np.random.default_rng([seed, pass_no, zlib.crc32(ids[sel[0]].encode()), 13]
                                      ).permutation(len(sel))].tolist()
    yield from _render_rows(batch, ids, order, columns=columns, batch_size=batch_size,
                            stream=stream, seed=seed, state=state, epoch=epoch,
                            pass_no=pass_no, **kw)


def _render_rows(table, ids: list, order: list, *, columns, batch_size, **kw):
    """Rows ``order`` (indices into the ``pyarrow.Table`` ``table``, whose ids are ``ids``) →
    decoded, augmented blocks of ``batch_size`` rows through :func:`_map_fn`; the PNG columns
    are read in place (:func:`binary_cells`). Shared by both readers' map functions."""
    cells = {c: binary_cells(table.column(c)) for c in columns
             if c != "id" and c in table.column_names}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {c: [v[i] for i in idx] for c, v in cells.items()}
        batch["id"] = [ids[i] for i in idx]
        yield _map_fn(batch, keep=None, **kw)


def _row_group_dataset(uri: str, fs, paths: list, cfg, common: dict):
    """multimix's own reader: ``from_items`` slots → a generator ``map_batches`` that reads
    row groups with pyarrow (footers read once, here), picked by a seeded per-pass permutation
    (no per-pass listing; see the module docstring)."""
    import pyarrow.parquet as pq
    import ray.data

    groups = []
    with storage.storage_errors(uri, cfg.storage):
        for path in paths:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            groups.extend((path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                          if meta.row_group(g).num_rows)
    if not groups:
        raise DataError(f"{uri}: the Parquet shards hold no rows")
    total = sum(g[2] for g in groups)
    # Few, large tasks: one per ~TASK_ROWS rows (at least min(row groups, 4) so the CPUs stay
    # busy), each reading several row groups that a seeded per-pass permutation scatters over
    # the dataset, and shuffling their rows together.
    n_tasks = min(len(groups), max(min(len(groups), 4), -(-total // TASK_ROWS)))
    per_task = -(-len(groups) // n_tasks)
    n_tasks = -(-len(groups) // per_task)
    fn = partial(_read_map_fn, fs=fs, groups=tuple(groups), per_task=per_task, **common)
    ds = ray.data.from_items([{"slot": k} for k in range(n_tasks)], override_num_blocks=n_tasks)
    return ds.map_batches(fn, batch_size=1, batch_format="numpy", zero_copy_batch=True,
                          **_map_kwargs(cfg))


#: rows of the worker-side local shuffle buffer (at least 8 batches)
SHUFFLE_ROWS = 256

#: rows one pipeline task reads, decodes and augments (several row groups)
TASK_ROWS = 1024


def _yield_rows(size: int) -> int:
    """Rows per block a task yields: ~16 MB of pixels per view (256 rows at 256²), so blocks
    are few (little per-block overhead) but a task still streams several of them."""
    return max(16, min(1024, (16 << 20) // max(1, size * size)))


def _task_groups(slot: int, n_groups: int, per_task: int, seed: int, pass_no: int,
                 stream: str) -> list:
    """Row groups of task ``slot`` in pass ``pass_no``: a seeded permutation of all row groups,
    new every pass, cut into consecutive runs of ``per_task``."""
    perm = np.random.default_rng([seed, pass_no, zlib.crc32(stream.encode()), 7]
                                 ).permutation(n_groups)
    return sorted(int(g) for g in perm[slot * per_task:(slot + 1) * per_task])


def _read_map_fn(items, *, fs, groups, per_task, columns, batch_size, state, stream, epoch,
                 seed, keep, **kw):
    """Read a task's row groups, shuffle their rows together and yield decoded/augmented
    blocks of ``batch_size`` rows (generator UDF)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from multimix.data.allocator import keep_freed_memory

    keep_freed_memory()  # once per worker process: reuse freed block memory (see allocator.py)
    pass_no = _current_pass(state, stream, epoch)  # once per task: a task belongs to one pass
    for slot in np.asarray(items["slot"]).tolist():
        tables = []
        for g in _task_groups(int(slot), len(groups), per_task, seed, pass_no, stream):
            path, group, _ = groups[g]
            with fs.open_input_file(path) as f:
                t = pq.ParquetFile(f).read_row_group(group, columns=columns)
            if keep is not None:
                ids = t.column("id").to_pylist()
                sel = [i for i, v in enumerate(ids) if v in keep]
                if len(sel) != len(ids):
                    t = t.take(pa.array(sel, pa.int64()))
            if t.num_rows:
                tables.append(t)
        if not tables:
            continue
        table = pa.concat_tables(tables)
        order = np.random.default_rng([seed, pass_no, int(slot), 11]
                                      ).permutation(table.num_rows).tolist()
        yield from _render_rows(table, table.column("id").to_pylist(), order, columns=columns,
                                batch_size=batch_size, stream=stream, seed=seed, state=state,
                                epoch=epoch, pass_no=pass_no, **kw)


def build_datasets(cfg, splits: Mapping[str, Any], state=None) -> dict:
    """The streaming datasets a variant needs: ``{"unl_cls": ..., "unl_seg": ...}``.

    Args:
        splits: ``{"cls": Split, "seg": Split}`` (objects with ``labeled``, ``val`` and
            ``unlabeled`` id lists; a task the variant does not use may be missing).
        state: :func:`create_state` handle (strongly recommended for training).

    ``unl_cls`` yields ``unl_weak``/``unl_strong``; ``unl_seg`` yields ``useg_img`` drawn from
    the unlabeled classification images (``data.unlabeled_seg_from="cls"``, the paper) or the
    segmentation images beyond the label budget (``"seg"``).
    """
    configure_data_context(image_size=cfg.data.image_size)
    need = streams_for(cfg.model.variant)
    out: dict = {}
    if "unl" in need:
        out["unl_cls"] = stream_dataset(cfg.data.cls_data, _split(splits, "cls").unlabeled, cfg,
                                        mode="pair", stream="unl_cls", state=state)
    if "useg" in need:
        src = cfg.data.unlabeled_seg_from
        uri = cfg.data.cls_data if src == "cls" else cfg.data.seg_data
        out["unl_seg"] = stream_dataset(uri, _split(splits, src).unlabeled, cfg, mode="useg",
                                        stream="unl_seg", augment=cfg.augment.seg_augment,
                                        state=state)
    return out


def _split(splits: Mapping[str, Any], task: str):
    sp = splits.get(task) if isinstance(splits, Mapping) else getattr(splits, task, None)
    if sp is None:
        raise DataError(f"no {task} split given (needed by this model variant)")
    return sp


def dataset_config(datasets: Mapping[str, Any]):
    """``ray.train.DataConfig`` that splits every streaming dataset across the Train workers."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split=list(datasets))


def steps_per_epoch(cfg, n_unlabeled: int, world_size: int, n_labeled: int = 0) -> int:
    """Global optimizer steps per epoch: ``optim.steps_per_epoch``, else the unlabeled pool //
    (unlabeled_batch × workers) (labeled pool // (cls_batch × workers) for variants without one)."""
    if cfg.optim.steps_per_epoch:
        return int(cfg.optim.steps_per_epoch)
    if n_unlabeled:
        return max(1, n_unlabeled // (cfg.data.unlabeled_batch * world_size))
    return max(1, n_labeled // (max(cfg.data.cls_batch, 1) * world_size))


# ---------------------------------------------------------------------------------------------
# labeled pools (in memory, per worker)


@dataclass
class LabeledPool:
    """Decoded labeled rows: ``images`` ``uint8 (N, H, W)``; ``labels`` ``int64 (N,)`` (cls) or
    ``masks``/``ignore`` ``uint8 (N, H, W)`` in {0, 1} (seg). ``skipped``: undecodable rows."""

    ids: list
    images: np.ndarray
    labels: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    ignore: Optional[np.ndarray] = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def load_labeled_pool(uri: str, ids: Sequence[str], cfg) -> LabeledPool:
    """Read and decode the rows ``ids`` of a prepared dataset (pyarrow only; no Ray tasks).

    Undecodable rows are skipped, counted in ``skipped`` and logged.

    Raises:
        DataError: no row could be loaded, or an id is missing from the dataset.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    size = cfg.data.image_size
    fs, paths, manifest = shard_paths(uri, cfg.storage)
    seg = manifest.get("task") == "seg"
    cols = ["id", "image"] + (["mask", "ignore"] if seg else ["label"])
    ids = list(ids)
    with storage.storage_errors(uri, cfg.storage):
        try:
            table = pq.ParquetDataset(
                paths, filesystem=fs, filters=pc.field("id").isin(pa.array(ids, pa.string()))
            ).read(columns=cols)
        except pa.ArrowInvalid as exc:
            raise DataError(f"cannot read the Parquet shards of {uri}: {exc}") from None
    order = {v: i for i, v in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in order]
    if missing:
        raise DataError(f"{uri}: {len(missing)} id(s) not in the dataset, e.g. {missing[:3]}")
    table = table.take(pa.array([order[i] for i in ids], pa.int64()))
    batch = {c: table.column(c).to_pylist() for c in cols}
    good, arrays, skipped = _decode_rows(batch, size, ("image", "mask", "ignore") if seg
                                         else ("image",), None)
    if skipped:
        logger.warning("multimix: skipped %d undecodable labeled row(s) of %s, e.g. %s",
                       len(skipped), uri, skipped[:3])
    if not good:
        raise DataError(f"{uri}: none of the {len(ids)} labeled rows could be decoded")
    labels = None
    if not seg:
        pos = {v: i for i, v in enumerate(batch["id"])}
        labels = np.asarray([batch["label"][pos[i]] for i in good], dtype=np.int64)
    return LabeledPool(ids=good, images=arrays["image"], labels=labels,
                       masks=arrays.get("mask") if seg else None,
                       ignore=arrays.get("ignore") if seg else None, skipped=len(skipped))


# ---------------------------------------------------------------------------------------------
# worker side


def _to_tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)


class _Cycler:
    """Fixed-size batches from a Ray Data shard, restarting the shard when it runs out."""

    def __init__(self, shard, batch_size: int, stream: str, state, epoch: int, seed: int,
                 rank: int):
        self.shard, self.b, self.stream = shard, batch_size, stream
        self.state, self.epoch, self.seed, self.rank = state, epoch, seed, rank
        self.restart = 0
        self.buf: dict = {}
        self.it = None

    def _start_pass(self):
        if self.state is not None:
            import ray

            ray.get(self.state.set_pass.remote(self.stream,
                                               self.epoch * _PASS_STRIDE + self.restart))
        # The tasks already shuffle the rows of their read unit; this buffer (a few hundred
        # rows: ~32 MB of pairs at 256²) also mixes the blocks of concurrent tasks.
        self.it = iter(self.shard.iter_batches(
            batch_size=self.b, batch_format="numpy", prefetch_batches=4,
            local_shuffle_buffer_size=max(8 * self.b, SHUFFLE_ROWS),
            local_shuffle_seed=mix_keys(self.seed, self.epoch, self.restart, self.rank) % (2**31)))
        self.restart += 1

    def next(self) -> dict:
        empty_passes = 0
        got = True
        while not self.buf or len(next(iter(self.buf.values()))) < self.b:
            if self.it is None:
                self._start_pass()
                got = False
            try:
                part = next(self.it)
            except StopIteration:
                self.it = None
                if not got:
                    empty_passes += 1
                    if empty_passes >= 2:
                        raise DataError(
                            f"stream {self.stream}: this worker's shard is empty (pool smaller "
                            "than the number of workers?)") from None
                continue
            got = True
            if not self.buf:
                self.buf = {k: np.asarray(v) for k, v in part.items()}
            else:
                self.buf = {k: np.concatenate([self.buf[k], np.asarray(part[k])])
                            for k in self.buf}
        out = {k: v[: self.b] for k, v in self.buf.items()}
        self.buf = {k: v[self.b:] for k, v in self.buf.items()}
        return out

    def close(self):
        self.it = None


class TrainBatches:
    """One epoch of training batches on one Train worker (DESIGN §3 format, torch uint8).

    Args:
        cfg: the run's :class:`~multimix.config.Config`.
        shards: ``{"unl_cls": DataIterator, "unl_seg": DataIterator}`` from
            ``ray.train.get_dataset_shard`` (only those the variant uses).
        labeled_cls_pool, labeled_seg_pool: :class:`LabeledPool` (or None when unused).
        rank, world_size, epoch: this worker's rank, the number of workers, the epoch.
        state: the :func:`create_state` handle given to :func:`build_datasets` (or None).
        steps_per_epoch: global steps per epoch (see :func:`steps_per_epoch`); defaults to
            ``cfg.optim.steps_per_epoch``.

    Iterating yields exactly ``steps_per_epoch`` dicts on every worker.
    """

    def __init__(self, cfg, shards: Mapping[str, Any], labeled_cls_pool: Optional[LabeledPool],
                 labeled_seg_pool: Optional[LabeledPool], rank: int, world_size: int,
                 epoch: int, state=None, steps_per_epoch: Optional[int] = None):
        self.cfg, self.shards = cfg, dict(shards or {})
        self.cls_pool, self.seg_pool = labeled_cls_pool, labeled_seg_pool
        self.rank, self.world_size, self.epoch, self.state = rank, world_size, epoch, state
        steps = steps_per_epoch or cfg.optim.steps_per_epoch
        if not steps:
            raise DataError("optim.steps_per_epoch is not set: pass steps_per_epoch= "
                            "(see multimix.data.pipeline.steps_per_epoch)")
        self.steps = int(steps)
        self.need = streams_for(cfg.model.variant)
        self.aug = Augmenter.from_config(cfg.augment, cfg.data.image_size)
        for s, pool in (("cls", self.cls_pool), ("seg", self.seg_pool)):
            if s in self.need and (pool is None or len(pool) == 0):
                raise DataError(f"variant {cfg.model.variant} needs a labeled {s} pool")
        for s, name in (("unl", "unl_cls"), ("useg", "unl_seg")):
            if s in self.need and name not in self.shards:
                raise DataError(f"variant {cfg.model.variant} needs the dataset shard {name!r}")

    def __len__(self) -> int:
        return self.steps

    def _labeled(self, pool: LabeledPool, n: int, step: int, stream: str):
        seed = self.cfg.optim.seed
        tag = 1 if stream == "cls" else 2
        rng = np.random.default_rng([seed, self.rank, self.epoch, step, tag])
        idx = rng.integers(0, len(pool), size=n)
        keys = np.array([mix_keys(seed, self.rank, self.epoch, step, j, tag)
                         for j in range(n)], dtype=np.uint64)
        return idx, keys

    def __iter__(self) -> Iterator[dict]:
        import torch

        d = self.cfg.data
        seed = self.cfg.optim.seed
        cyclers = {}
        if "unl" in self.need:
            cyclers["unl"] = _Cycler(self.shards["unl_cls"], d.unlabeled_batch, "unl_cls",
                                     self.state, self.epoch, seed, self.rank)
        if "useg" in self.need:
            cyclers["useg"] = _Cycler(self.shards["unl_seg"], d.unlabeled_seg_batch, "unl_seg",
                                      self.state, self.epoch, seed, self.rank)
        try:
            for step in range(self.steps):
                batch: dict = {}
                if "cls" in self.need:
                    idx, keys = self._labeled(self.cls_pool, d.cls_batch, step, "cls")
                    batch["cls_img"] = _to_tensor(self.aug.weak(self.cls_pool.images[idx], keys))
                    batch["cls_label"] = torch.from_numpy(self.cls_pool.labels[idx].astype(np.int64))
                if "seg" in self.need:
                    idx, keys = self._labeled(self.seg_pool, d.seg_batch, step, "seg")
                    img, m, ig = (self.seg_pool.images[idx], self.seg_pool.masks[idx],
                                  self.seg_pool.ignore[idx])
                    if self.cfg.augment.seg_augment:
                        img, m, ig = self.aug.geometric(keys, img, m, ig)
                    batch["seg_img"], batch["seg_mask"], batch["seg_ignore"] = (
                        _to_tensor(img), _to_tensor(m), _to_tensor(ig))
                if "unl" in cyclers:
                    u = cyclers["unl"].next()
                    batch["unl_weak"] = _to_tensor(u["unl_weak"])
                    batch["unl_strong"] = _to_tensor(u["unl_strong"])
                    if "id" in u:
                        batch["unl_id"] = list(u["id"])
                if "useg" in cyclers:
                    batch["useg_img"] = _to_tensor(cyclers["useg"].next()["useg_img"])
                yield batch
        finally:
            for c in cyclers.values():
                c.close()


def eval_batches(pool: LabeledPool, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[dict]:
    """Validation/evaluation batches of a labeled pool: decode only, no augmentation.

    Rows are split across ranks by stride (``rank::world_size``); yields ``cls_img`` +
    ``cls_label`` (classification pool) or ``seg_img`` + ``seg_mask`` + ``seg_ignore``, plus
    ``ids`` (list of row ids).
    """
    import torch

    idx = np.arange(rank, len(pool), world_size)
    for s in range(0, len(idx), batch_size):
        sel = idx[s:s + batch_size]
        out: dict = {"ids": [pool.ids[i] for i in sel]}
        if pool.masks is not None:
            out["seg_img"] = _to_tensor(pool.images[sel])
            out["seg_mask"] = _to_tensor(pool.masks[sel])
            out["seg_ignore"] = _to_tensor(pool.ignore[sel])
        else:
            out["cls_img"] = _to_tensor(pool.images[sel])
            out["cls_label"] = torch.from_numpy(pool.labels[sel])
        yield out
