"""The Ray Data input pipeline: prepared Parquet shards → decoded, augmented uint8 batches.

Driver side (before ``TorchTrainer``), with ``data.sharding=streaming_split`` (the default)::

    state = create_state()                                   # pass counter + skipped-row counter
    datasets = build_datasets(cfg, splits, state=state)      # {"unl_cls": ..., "unl_seg": ...}
    trainer = TorchTrainer(train_fn, train_loop_config={..., "data_state": state},
                           datasets=datasets, dataset_config=dataset_config(datasets), ...)

(``data.sharding=per_worker``: ``build_datasets(cfg, splits, state=state, world_size=n)`` →
``{"unl_cls": [dataset of rank 0, ...], ...}``, handed to the workers through
``train_loop_config``; each worker iterates its own.)

Worker side (inside the train loop)::

    shards = {name: ray.train.get_dataset_shard(name) for name in datasets_needed}
    streams = open_streams(cfg, shards, rank, start_epoch, state=state, shared=True)
    cls_pool = load_labeled_pool(cfg.data.cls_data, splits["cls"].labeled, cfg)   # once
    seg_pool = load_labeled_pool(cfg.data.seg_data, splits["seg"].labeled, cfg)   # once
    for epoch in range(start_epoch, cfg.optim.epochs):
        for batch in TrainBatches(cfg, streams, cls_pool, seg_pool, rank, world, epoch,
                                  state=state, steps_per_epoch=steps):
            engine.train_step(model, batch, ...)

What runs where:

- unlabeled pools *stream*, through one of two readers (``data.reader``), each fused with
  one generator ``map_batches`` on CPU tasks that decodes the PNGs and renders the weak AND
  the strong view of the same image (classification stream) or the plain image
  (unlabeled-segmentation stream), yielding blocks of ~16 MB of pixels per view:

  * ``row_groups`` (default): multimix's own reader: ``from_items`` items ``(pass, slot)``,
    each task reading several row groups that a seeded permutation (new every pass)
    scatters over the dataset and shuffling their rows together; footers are read once, on
    the driver (:func:`row_group_index`). One execution spans :func:`passes_per_execution`
    passes (the run's epochs), so Ray's per-execution start-up is paid once per run; it
    mixes classes even on a class-sorted dataset.
  * ``read_parquet``: ``ray.data.read_parquet`` on the shards (local or ``s3://`` through
    :func:`multimix.data.storage.resolve`), shard order shuffled per pass, read units of
    ~:data:`TASK_ROWS` rows (Ray 2.60 bin-packs row groups), each unit's rows shuffled in the
    map. Mixing relies on ``multimix prepare``'s hashed row order (every row group mixes
    classes). One execution per pass: Ray lists the files again each time (its footer reader
    starts actors).

- ``data.sharding``: ``streaming_split`` (default): Ray Train splits one dataset per stream
  across the workers (``equal=True``); its executor runs in a split-coordinator actor.
  ``per_worker``: each Train worker iterates its own dataset holding its part of the pool
  (``row_groups``: every ``world_size``-th row group of each pass's permutation;
  ``read_parquet``: every ``world_size``-th shard; rows by id hash when there are fewer row
  groups / shards than workers), so the executor runs in the worker: no coordinator (whose
  loop took 25-40 % of a core on the 2-core VM), but Ray 2.60's scheduling loop does not
  sleep while the execution is backpressured with no task running, i.e. whenever the
  consumer is slower than the data: in the training process it took the GIL from training
  (the demo trained ~4x slower). For data-bound consumers only.
- every Ray Data execution starts with a resource budget of zero for its first 1-2 s (Ray
  2.60's autoscaling coordinator answers asynchronously; one task runs meanwhile), which is
  why a ``row_groups`` execution spans epochs.
  Measured on this 2-core VM (6 passes of 4,096 rows at 256², weak+strong; ``multimix bench
  data`` prints these; README has the figures).
- the map reads the PNG bytes in place (:func:`binary_cells`: views of the Arrow buffers).
- each dataset is built with Ray Data's target block size at 3/4 of one yielded block
  (:func:`block_target`): at the default (128 MiB) Ray merged a task's yields and released
  them only when the task ended; under 2/3 of a yield it sliced them and copied the rest.
- labeled pools are small: loaded once per worker, decoded to ``uint8`` arrays
  (:class:`LabeledPool`), sampled with replacement (seeded by seed/rank/epoch/step); their weak
  view (a flip + crop slice) is rendered on the worker (a few µs per image).
- each worker's cursor (:class:`_Cycler`) cuts its fixed-size unlabeled batches from whole
  blocks (their rows already shuffled by the task); ``data.shuffle_buffer_rows > 0`` puts
  Ray Data's local shuffle buffer in front of it.
- every worker yields exactly ``steps_per_epoch`` batches: a stream that runs short starts a
  new execution (per_worker: on its own; streaming_split: all workers at the same step, since
  ``equal=True`` shards have the same size), so DDP never waits on a missing batch.
- augmentation parameters are a pure function of ``(seed, pass, stream, row id)``
  (:func:`multimix.data.augment.row_keys`); the *pass* of an execution's ``k``-th pass is
  ``start_epoch * 1000 + passes rendered before it`` (:class:`_Cycler`): the workers set the
  base on a tiny state actor (key :func:`pass_key`) before each execution, the map tasks read
  it once and add ``k``.
- undecodable rows are dropped in the map task and counted on the state actor
  (:func:`skipped_rows`) and in the task's log; they never fail the run.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import deque
from functools import partial
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from multimix.data import storage
from multimix.data.augment import Augmenter, mix_keys, row_keys
from multimix.data.prepare import ROW_ORDER as _ROW_ORDER
from multimix.data.decode import binary_cells, decode_rows, to_tensor
from multimix.data.pools import LabeledPool, eval_batches, load_labeled_pool  # noqa: F401
from multimix.data.prepare import shard_paths
from multimix.errors import DataError
from multimix.variants import streams_for

logger = logging.getLogger(__name__)

__all__ = [
    "STREAM_DATASETS",
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
    "open_streams",
    "passes_per_execution",
    "pass_key",
    "TrainBatches",
    "eval_batches",
]

#: names of the Ray Datasets handed to TorchTrainer (and split across workers)
STREAM_DATASETS = ("unl_cls", "unl_seg")

_PASS_STRIDE = 1000  # pass = start epoch * 1000 + passes rendered since (see _Cycler)

#: most passes over a pool in one execution (``data.reader=row_groups``), and most task items
_MAX_PASSES = 500
_MAX_ITEMS = 4096


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


def configure_data_context(progress_bars: bool = False):
    """Ray Data settings for this pipeline (call on the driver before building datasets; a
    Dataset keeps a copy of the context it was built under). Each dataset's block size is set
    by :func:`stream_dataset` (see :func:`block_target`)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.verbose_progress = False
    try:
        ctx.print_on_execution_start = False
    except Exception:  # pragma: no cover - attribute missing in other versions
        pass
    return ctx


def block_bytes(size: int) -> int:
    """Pixel bytes of one view of one block a pipeline task yields (``_yield_rows(size)``
    rows of ``size``² ``uint8``)."""
    return _yield_rows(size) * size * size


#: uint8 arrays per yielded row of each mode (pair: weak + strong; seg: image, mask, ignore)
_VIEWS = {"pair": 2, "useg": 1, "seg": 3}


def block_target(size: int, mode: str) -> int:
    """Ray Data's ``target_max_block_size`` for a ``mode`` stream: 3/4 of one yielded block.

    Ray Data's output buffer merges a task's yields until they pass the target (128 MiB by
    default), which held every augmented block back until its task ended; blocks of 1.5
    targets or more it slices, and the slices left over are copied into the next block
    (measured: 15-20 % of the end-to-end rate with pairs at 256² under a one-view target).
    At 3/4 each yield leaves the task whole as soon as it is rendered."""
    return max(1 << 20, block_bytes(size) * _VIEWS[mode] * 3 // 4)


class _block_size:
    """Build a dataset under ``target_max_block_size = target`` (a Dataset copies the current
    DataContext when it is created), never raising a smaller value the user set."""

    def __init__(self, target: int):
        self.target = target

    def __enter__(self):
        import ray.data

        self.ctx = ray.data.DataContext.get_current()
        self.saved = self.ctx.target_max_block_size
        if self.saved is None or self.saved > self.target:
            self.ctx.target_max_block_size = self.target

    def __exit__(self, *exc):
        self.ctx.target_max_block_size = self.saved


# ---------------------------------------------------------------------------------------------
# the map function (runs in Ray Data tasks)


def _map_fn(batch: Mapping[str, Any], *, mode: str, stream: str, size: int, aug: Augmenter,
            augment: bool, seed: int, state, epoch: int,
            debug: bool, pass_no: Optional[int] = None) -> dict:
    columns = ("image", "mask", "ignore") if mode == "seg" else ("image",)
    ids, arrays, skipped = decode_rows(batch, size, columns)
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
        out = {"weak_img": weak, "strong_img": strong}
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


def _current_pass(state, key: str, epoch: int) -> int:
    """The augmentation pass of the execution under way for ``key`` (:func:`pass_key`; set by
    the Train workers before each execution; ``epoch`` without a state actor)."""
    if state is None:
        return epoch
    import ray

    return int(ray.get(state.get_pass.remote(key)))


def pass_key(stream: str, rank: int = 0, world_size: int = 1) -> str:
    """The state actor's key for the pass of ``stream``: the stream's name for a dataset
    shared by all workers (``streaming_split``) or a single worker, ``stream/rank`` for one
    of several per-worker datasets (each worker runs its own executions)."""
    return stream if world_size <= 1 else f"{stream}/{rank}"


# ---------------------------------------------------------------------------------------------
# driver side


def stream_dataset(uri: str, ids: Optional[Sequence[str]], cfg, *, mode: str,
                   stream: Optional[str] = None, augment: bool = True, state=None,
                   epoch: int = 0, debug: bool = False, batch_size: Optional[int] = None,
                   reader: Optional[str] = None, passes: int = 1, rank: int = 0,
                   world_size: int = 1, footers: Optional[dict] = None,
                   augmenter: Optional[Augmenter] = None):
    """A Ray Dataset of decoded (and augmented) rows of ``uri`` restricted to ``ids``.

    Args:
        mode: ``"pair"`` → columns ``weak_img``, ``strong_img`` (weak and strong view of the same
            image); ``"useg"`` → ``useg_img`` (weak view when ``augment``); ``"seg"`` →
            ``seg_img``, ``seg_mask``, ``seg_ignore`` (flip+crop applied jointly when ``augment``).
            All ``uint8 (N, H, W)``.
        state: :func:`create_state` handle (augmentation pass, skipped counts) or None (pass =
            ``epoch``; skipped rows only logged).
        debug: add an ``id`` column (to check views against their source).
        batch_size: rows per yielded block (default :func:`_yield_rows`).
        reader: ``"read_parquet"`` or ``"row_groups"`` (default ``cfg.data.reader``).
        passes: passes over the pool in one execution (``row_groups`` only; ``read_parquet``
            always runs one): pass ``k`` of an execution renders augmentation pass
            ``base + k``, ``base`` being the state actor's value (or ``epoch``) when its
            tasks start. See :func:`passes_per_execution`.
        rank, world_size: this dataset holds rank ``rank``'s part of the pool, for one Train
            worker of ``world_size`` that iterates it itself (``data.sharding=per_worker``):
            ``row_groups`` deals each pass's permuted row groups to the ranks in turn (rows in
            turn when there are fewer row groups than ranks); ``read_parquet`` reads every
            ``world_size``-th shard (rows by id hash when there are fewer shards than ranks).
            Its task concurrency is ``scaling.data_concurrency / world_size``.
        footers: a dict shared by calls over the same shards, so ``row_groups`` reads their
            footers once (:func:`build_datasets` passes one for all ranks).
        augmenter: what renders the views in the map tasks (default
            ``Augmenter.from_config(cfg.augment, image_size)``); any picklable object with the
            same ``pair`` / ``weak`` / ``geometric`` methods (``multimix bench data`` passes
            one that renders nothing, to measure the pipeline's own cost).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if mode not in _VIEWS:
        raise ValueError(f"unknown pipeline mode {mode!r}")
    stream = stream or mode
    reader = reader or cfg.data.reader
    size = cfg.data.image_size
    fs, paths, manifest = shard_paths(uri, cfg.storage)
    columns = ["id", "image"] + (["mask", "ignore"] if mode == "seg" else [])
    if batch_size is None:
        batch_size = _yield_rows(size)
    common = dict(columns=columns, batch_size=batch_size, mode=mode, stream=stream, size=size,
                  aug=augmenter or Augmenter.from_config(cfg.augment, size), augment=augment,
                  seed=int(cfg.optim.seed), keep=frozenset(ids) if ids is not None else None,
                  state=state, epoch=epoch, debug=debug,
                  key=pass_key(stream, rank, world_size))
    if reader == "row_groups":
        with _block_size(block_target(size, mode)):
            return _row_group_dataset(uri, fs, paths, cfg, common, passes=passes, rank=rank,
                                      world_size=world_size, footers=footers)
    if reader == "read_parquet":
        part, frac = None, 1.0
        if world_size > 1:
            if len(paths) >= world_size:
                frac, paths = len(paths[rank::world_size]) / len(paths), paths[rank::world_size]
            else:
                part = (rank, world_size)
        with _block_size(block_target(size, mode)):
            return _read_parquet_dataset(uri, fs, paths, manifest, cfg, common, part=part,
                                         world_size=world_size, row_fraction=frac)
    raise DataError(f"data.reader: unknown reader {reader!r} (read_parquet or row_groups)")


def _concurrency(cfg, world_size: int = 1) -> Optional[int]:
    """Concurrent tasks of one dataset: ``scaling.data_concurrency`` shared by the
    ``world_size`` per-worker datasets (at least one each), or None (as many as CPUs allow)."""
    c = cfg.scaling.data_concurrency
    return None if c is None else max(1, -(-int(c) // max(1, world_size)))


def _map_kwargs(cfg, world_size: int = 1) -> dict:
    import ray.data

    kwargs: dict = {"num_cpus": cfg.scaling.data_cpus_per_task}
    conc = _concurrency(cfg, world_size)
    if conc is not None:
        kwargs["compute"] = ray.data.TaskPoolStrategy(size=conc)
    return kwargs


def _read_parquet_dataset(uri: str, fs, paths: list, manifest: dict, cfg, common: dict,
                          part: Optional[tuple] = None, world_size: int = 1,
                          row_fraction: float = 1.0):
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
      classes; each map call shuffles its rows (and with ``data.shuffle_buffer_rows > 0`` a
      local shuffle buffer in each worker mixes blocks).
    - ``batch_size=None`` and the same CPU/compute settings on read and map are what let Ray
      fuse them (a map with a fixed ``batch_size`` after a read is not fused).
    - ``part=(rank, world)``: keep only the rows whose id hashes to ``rank`` (a per-worker
      dataset when there are fewer shards than workers).
    """
    import ray.data

    if manifest.get("row_order") != _ROW_ORDER:
        logger.warning(
            "%s was prepared in id order (class-sorted; an older multimix prepare): "
            "read_parquet shuffles whole row groups, so batches may hold a single class. "
            "Re-run multimix prepare, or set data.reader=row_groups.", uri)
    with storage.storage_errors(uri, cfg.storage):
        total = sum(max(0, i.size or 0) for i in fs.get_file_info(paths))
    rows = max(1, int((manifest.get("num_rows") or 1) * row_fraction))
    bin_bytes = int(max(total / rows, min(TASK_ROWS * total / rows, total / 4)))
    knobs = {"RAY_DATA_PARQUET_BIN_PACKING_BYTES": str(bin_bytes),
             "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": str(max(1, min(32, -(-len(paths) // 64))))}
    kwargs = _map_kwargs(cfg, world_size)
    read_kwargs: dict = {"num_cpus": kwargs["num_cpus"]}
    conc = _concurrency(cfg, world_size)
    if conc is not None:
        read_kwargs["concurrency"] = conc
    seed = mix_keys(common["seed"], zlib.crc32(common["stream"].encode())) % (2**31)
    with _env_defaults(knobs), storage.storage_errors(uri, cfg.storage):
        ds = ray.data.read_parquet(
            paths, filesystem=fs, shuffle=ray.data.FileShuffleConfig(seed=seed), **read_kwargs)
    ds = ds.select_columns(common["columns"])
    return ds.map_batches(partial(_block_map_fn, part=part, **common), batch_size=None,
                          batch_format="pyarrow", zero_copy_batch=True, **kwargs)


def _id_part(row_id: str, parts: int) -> int:
    """Which of ``parts`` per-worker parts a row belongs to (a stable hash of its id)."""
    return zlib.crc32(row_id.encode()) % parts


class _env_defaults:
    """Set environment variables for a block of code, leaving alone any the user exported."""

    def __init__(self, values: Mapping[str, str]):
        self.values = {k: v for k, v in values.items() if k not in os.environ}

    def __enter__(self):
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k in self.values:
            os.environ.pop(k, None)


def _block_map_fn(batch, *, columns, batch_size, state, stream, epoch, seed, keep, key,
                  part=None, **kw):
    """One ``pyarrow.Table`` block from ``read_parquet`` → shuffled, decoded, augmented
    blocks of ``batch_size`` rows (generator UDF). The PNGs are read in place
    (:func:`binary_cells`), not copied into Python ``bytes``."""
    from multimix.data.allocator import keep_freed_memory

    keep_freed_memory()  # once per worker process: reuse freed block memory (see allocator.py)
    ids = [v if isinstance(v, str) else str(v) for v in batch.column("id").to_pylist()]
    sel = np.arange(len(ids))
    if keep is not None or part is not None:
        sel = np.flatnonzero([(keep is None or v in keep)
                              and (part is None or _id_part(v, part[1]) == part[0])
                              for v in ids])
    if not len(sel):
        return
    pass_no = _current_pass(state, key, epoch)
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
        yield _map_fn(batch, **kw)


def row_group_index(uri: str, fs, paths: Sequence[str], storage_cfg=None) -> list:
    """``[(path, row group, rows), ...]`` of the non-empty row groups of ``paths``: their
    footers read on up to 16 threads (one small read per shard; S3 latency overlaps)."""
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    def one(path):
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        return [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                if meta.row_group(g).num_rows]

    with storage.storage_errors(uri, storage_cfg):
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
            return [g for per_file in pool.map(one, paths) for g in per_file]


def _row_group_dataset(uri: str, fs, paths: list, cfg, common: dict, passes: int = 1,
                       rank: int = 0, world_size: int = 1, footers: Optional[dict] = None):
    """multimix's own reader: ``from_items`` slots → a generator ``map_batches`` that reads
    row groups with pyarrow (footers read once, here), picked by a seeded per-pass permutation
    (no per-pass listing; see the module docstring).

    ``passes`` consecutive passes over the pool make one execution: the items are
    ``(pass k, slot)`` in pass order, and a task renders pass ``base + k`` (``base``: the
    state actor's value when the task starts, set by the workers before each execution).
    With ``world_size > 1`` the dataset holds rank ``rank``'s part (:func:`_task_groups`)."""
    import ray.data

    if footers is None:
        footers = {}
    key = (uri, tuple(paths))
    if key not in footers:
        footers[key] = row_group_index(uri, fs, paths, cfg.storage)
    groups = footers[key]
    if not groups:
        raise DataError(f"{uri}: the Parquet shards hold no rows")
    # Ranks get every world_size-th row group of each pass's permutation; with fewer row
    # groups than ranks, every rank reads them all and keeps the rows whose id hashes to it.
    by_rows = len(groups) < world_size
    mine = len(groups) if by_rows else -(-(len(groups) - rank) // world_size)
    rows = sum(g[2] for g in groups) / (world_size if by_rows else 1) * mine / len(groups)
    # Few, large tasks: one per ~TASK_ROWS rows (at least min(row groups, 4) so the CPUs stay
    # busy), each reading several row groups that a seeded per-pass permutation scatters over
    # the dataset, and shuffling their rows together.
    n_tasks = min(mine, _MAX_ITEMS, max(min(mine, 4), -(-int(rows) // TASK_ROWS)))
    per_task = -(-mine // n_tasks)
    n_tasks = -(-mine // per_task)
    fn = partial(_read_map_fn, fs=fs, groups=tuple(groups), per_task=per_task,
                 part=(rank, world_size, by_rows), **common)
    passes = max(1, min(int(passes), _MAX_PASSES, _MAX_ITEMS // n_tasks))
    items = [{"pass": p, "slot": k} for p in range(passes) for k in range(n_tasks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(fn, batch_size=1, batch_format="numpy", zero_copy_batch=True,
                          **_map_kwargs(cfg, world_size))


#: rows one pipeline task reads, decodes and augments (several row groups)
TASK_ROWS = 1024


def _yield_rows(size: int) -> int:
    """Rows per block a task yields: ~16 MB of pixels per view (256 rows at 256²), so blocks
    are few (little per-block overhead) but a task still streams several of them."""
    return max(16, min(1024, (16 << 20) // max(1, size * size)))


def _task_groups(slot: int, n_groups: int, per_task: int, seed: int, pass_no: int,
                 stream: str, rank: int = 0, world_size: int = 1) -> list:
    """Row groups of task ``slot`` in pass ``pass_no``: a seeded permutation of all row groups,
    new every pass, dealt to the ``world_size`` ranks in turn (rank ``rank`` gets positions
    ``rank, rank + world_size, ...``; all of them when ``world_size`` is 1), and the rank's
    share cut into consecutive runs of ``per_task``."""
    perm = np.random.default_rng([seed, pass_no, zlib.crc32(stream.encode()), 7]
                                 ).permutation(n_groups)[rank::world_size]
    return sorted(int(g) for g in perm[slot * per_task:(slot + 1) * per_task])


def _read_map_fn(items, *, fs, groups, per_task, columns, batch_size, state, stream, epoch,
                 seed, keep, key, part=(0, 1, False), **kw):
    """Read a task's row groups, shuffle their rows together and yield decoded/augmented
    blocks of ``batch_size`` rows (generator UDF). ``part = (rank, world_size, by_rows)``:
    the rank's row groups (:func:`_task_groups`), or with ``by_rows`` all of them and the rows
    whose id hashes to the rank (:func:`_id_part`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from multimix.data.allocator import keep_freed_memory

    keep_freed_memory()  # once per worker process: reuse freed block memory (see allocator.py)
    # once per task: a task belongs to one execution
    base = _current_pass(state, key, epoch)
    rank, world, by_rows = part
    deal = (0, 1) if by_rows else (rank, world)  # by rows: every rank reads all row groups
    for k, slot in zip(np.asarray(items["pass"]).tolist(), np.asarray(items["slot"]).tolist()):
        pass_no = base + int(k)
        tables = []
        for g in _task_groups(int(slot), len(groups), per_task, seed, pass_no, stream, *deal):
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
        row_ids = table.column("id").to_pylist()
        if by_rows:
            order = [i for i in order if _id_part(row_ids[i], world) == rank]
        yield from _render_rows(table, row_ids, order, columns=columns,
                                batch_size=batch_size, stream=stream, seed=seed, state=state,
                                epoch=epoch, pass_no=pass_no, **kw)


def build_datasets(cfg, splits: Mapping[str, Any], state=None,
                   world_size: Optional[int] = None) -> dict:
    """The streaming datasets a variant needs.

    Args:
        splits: ``{"cls": Split, "seg": Split}`` (objects with ``labeled``, ``val`` and
            ``unlabeled`` id lists; a task the variant does not use may be missing).
        state: :func:`create_state` handle (strongly recommended for training).
        world_size: None → ``{"unl_cls": Dataset, "unl_seg": Dataset}``, one dataset per
            stream for all workers (``TorchTrainer(datasets=...)`` with :func:`dataset_config`
            splits it: ``data.sharding=streaming_split``); a number → ``{"unl_cls": [Dataset
            of rank 0, ..., rank world_size - 1], ...}``, one dataset per Train worker, which
            that worker iterates itself (``data.sharding=per_worker``: no split coordinator).

    ``unl_cls`` yields ``weak_img``/``strong_img``; ``unl_seg`` yields ``useg_img`` drawn from
    the unlabeled classification images (``data.unlabeled_seg_from="cls"``, the paper) or the
    segmentation images beyond the label budget (``"seg"``). With ``data.reader=row_groups``
    one execution spans :func:`passes_per_execution` passes.
    """
    configure_data_context()
    need = set(streams_for(cfg.model.variant))
    passes = passes_per_execution(cfg)
    want = []
    if "weak" in need:
        want.append(("unl_cls", cfg.data.cls_data, _split(splits, "cls").unlabeled,
                     dict(mode="pair")))
    if "useg" in need:
        src = cfg.data.unlabeled_seg_from
        uri = cfg.data.cls_data if src == "cls" else cfg.data.seg_data
        want.append(("unl_seg", uri, _split(splits, src).unlabeled,
                     dict(mode="useg", augment=cfg.augment.seg_augment)))
    out: dict = {}
    footers: dict = {}  # each dataset's row-group index, read once for all ranks
    for name, uri, ids, kw in want:
        if world_size is None:
            out[name] = stream_dataset(uri, ids, cfg, stream=name, state=state, passes=passes,
                                       footers=footers, **kw)
        else:
            out[name] = [stream_dataset(uri, ids, cfg, stream=name, state=state,
                                        passes=passes, rank=r, world_size=world_size,
                                        footers=footers, **kw)
                         for r in range(world_size)]
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


# ---------------------------------------------------------------------------------------------
# worker side


class _Cycler:
    """Fixed-size batches from one unlabeled stream (a Ray Data shard or a per-worker
    dataset: anything with ``iter_batches``), starting a new execution when one runs out.

    With ``shuffle_rows=0`` (``data.shuffle_buffer_rows``, the default) it takes whole blocks
    from Ray Data and cuts its batches from them itself, copying each batch's rows once (out
    of the read-only object store memory: torch tensors must be writable). With
    ``shuffle_rows > 0`` Ray Data's local shuffle buffer of that many rows also mixes the
    blocks of concurrent tasks (one more copy of every row, in this process).

    Execution ``e`` (counted from 0 on this object) renders augmentation passes
    ``epoch * 1000 + e * passes + k`` for its ``k < passes`` passes: the base is set on the
    state actor under ``key`` (:func:`pass_key`) before the execution starts. Made per epoch
    by :class:`TrainBatches` from a shard, or once per run by :func:`open_streams` (one long
    execution then serves many epochs).
    """

    def __init__(self, shard, batch_size: int, stream: str, state, epoch: int, seed: int,
                 rank: int, passes: int = 1, key: Optional[str] = None, shuffle_rows: int = 0):
        self.shard, self.b, self.stream = shard, batch_size, stream
        self.state, self.epoch, self.seed, self.rank = state, epoch, seed, rank
        self.passes, self.key = max(1, int(passes)), key or stream
        self.shuffle_rows = max(0, int(shuffle_rows or 0))
        self.restart = 0
        self.parts: deque = deque()  # blocks (or batches) received, not yet handed out
        self.off = 0  # rows of parts[0] already handed out
        self.have = 0  # rows available: sum of the parts' rows - off
        self.it = None

    def _start_pass(self):
        if self.state is not None:
            import ray

            ray.get(self.state.set_pass.remote(
                self.key, self.epoch * _PASS_STRIDE + self.restart * self.passes))
        if self.shuffle_rows:
            it = self.shard.iter_batches(
                batch_size=self.b, batch_format="numpy", prefetch_batches=4,
                local_shuffle_buffer_size=max(self.shuffle_rows, self.b),
                local_shuffle_seed=mix_keys(self.seed, self.epoch, self.restart,
                                            self.rank) % (2**31))
        else:
            # whole blocks: each task already shuffled the rows it read (row groups that a
            # seeded permutation scatters over the pool, stored in a hashed order)
            it = self.shard.iter_batches(batch_size=None, batch_format="numpy",
                                         prefetch_batches=2)
        self.it = iter(it)
        self.restart += 1

    def next(self) -> dict:
        empty_passes = 0
        got = True
        while self.have < self.b:
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
            part = {k: np.asarray(v) for k, v in part.items()}
            n = len(next(iter(part.values()))) if part else 0
            if n:
                self.parts.append(part)
                self.have += n
        pieces = []
        need = self.b
        while need:
            head = self.parts[0]
            n = len(next(iter(head.values())))
            take = min(need, n - self.off)
            pieces.append({k: v[self.off:self.off + take] for k, v in head.items()})
            self.off += take
            need -= take
            if self.off == n:
                self.parts.popleft()
                self.off = 0
        self.have -= self.b
        if len(pieces) == 1:  # a view of one block: read-only when it lies in the object store
            return {k: v if v.flags.writeable else v.copy() for k, v in pieces[0].items()}
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def close(self):
        self.it = None


def open_streams(cfg, shards: Mapping[str, Any], rank: int, start_epoch: int, state=None,
                 world_size: int = 1, shared: bool = False) -> dict:
    """One cursor per unlabeled stream for one Train worker, made once per run (or resume)
    and handed to every epoch's :class:`TrainBatches`, so a stream's execution spans epochs
    (Ray Data starts each execution with one task at a time for 1-2 s; see the module
    docstring).

    Args:
        shards: ``{"unl_cls": ..., "unl_seg": ...}``: this worker's per-worker datasets
            (:func:`build_datasets` with ``world_size``) or ``streaming_split`` shards
            (``shared=True``: every worker reads one execution, so all use one pass key).
        start_epoch: the first epoch of this run (a resume starts a fresh numbering of
            passes at ``start_epoch * 1000``).
    """
    batch = {"unl_cls": cfg.data.unlabeled_batch, "unl_seg": cfg.data.unlabeled_seg_batch}
    passes = passes_per_execution(cfg)
    return {name: _Cycler(sh, batch[name], name, state, start_epoch, cfg.optim.seed, rank,
                          passes=passes, shuffle_rows=cfg.data.shuffle_buffer_rows,
                          key=name if shared else pass_key(name, rank, world_size))
            for name, sh in shards.items() if name in batch}


def passes_per_execution(cfg) -> int:
    """Passes over an unlabeled pool in one Ray Data execution: ``optim.epochs`` with
    ``data.reader=row_groups`` (each epoch is about one pass: one execution serves the run),
    at most 500 (and at most 4,096 task items: see :func:`_row_group_dataset`); 1 with
    ``read_parquet`` (Ray's reader runs one pass per execution)."""
    if cfg.data.reader != "row_groups":
        return 1
    return max(1, min(int(cfg.optim.epochs), _MAX_PASSES))


class TrainBatches:
    """One epoch of training batches on one Train worker (DESIGN §3 format, torch uint8).

    Args:
        cfg: the run's :class:`~multimix.config.Config`.
        shards: ``{"unl_cls": ..., "unl_seg": ...}`` (only those the variant uses): the
            cursors of :func:`open_streams` (kept across epochs: a long execution serves
            many), or anything with ``iter_batches`` (a ``ray.train.get_dataset_shard``
            iterator, a Dataset), read from a new execution every epoch.
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
        self.need = set(streams_for(cfg.model.variant))
        self.aug = Augmenter.from_config(cfg.augment, cfg.data.image_size)
        for s, pool in (("cls", self.cls_pool), ("seg", self.seg_pool)):
            if s in self.need and (pool is None or len(pool) == 0):
                raise DataError(f"variant {cfg.model.variant} needs a labeled {s} pool")
        for s, name in (("weak", "unl_cls"), ("useg", "unl_seg")):
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
        owned = []  # cursors made for this epoch only (closed at its end)
        for s, name, b in (("weak", "unl_cls", d.unlabeled_batch),
                           ("useg", "unl_seg", d.unlabeled_seg_batch)):
            if s in self.need:
                c = self.shards[name]
                if not isinstance(c, _Cycler):
                    c = _Cycler(c, b, name, self.state, self.epoch, seed, self.rank,
                                shuffle_rows=d.shuffle_buffer_rows)
                    owned.append(c)
                cyclers[s] = c
        try:
            for step in range(self.steps):
                batch: dict = {}
                if "cls" in self.need:
                    idx, keys = self._labeled(self.cls_pool, d.cls_batch, step, "cls")
                    batch["cls_img"] = to_tensor(self.aug.weak(self.cls_pool.images[idx], keys))
                    batch["cls_label"] = torch.from_numpy(self.cls_pool.labels[idx].astype(np.int64))
                if "seg" in self.need:
                    idx, keys = self._labeled(self.seg_pool, d.seg_batch, step, "seg")
                    img, m, ig = (self.seg_pool.images[idx], self.seg_pool.masks[idx],
                                  self.seg_pool.ignore[idx])
                    if self.cfg.augment.seg_augment:
                        img, m, ig = self.aug.geometric(keys, img, m, ig)
                    batch["seg_img"], batch["seg_mask"], batch["seg_ignore"] = (
                        to_tensor(img), to_tensor(m), to_tensor(ig))
                if "weak" in cyclers:
                    u = cyclers["weak"].next()
                    batch["weak_img"] = to_tensor(u["weak_img"])
                    batch["strong_img"] = to_tensor(u["strong_img"])
                    if "id" in u:
                        batch["unl_id"] = list(u["id"])
                if "useg" in cyclers:
                    batch["useg_img"] = to_tensor(cyclers["useg"].next()["useg_img"])
                yield batch
        finally:
            for c in owned:
                c.close()
