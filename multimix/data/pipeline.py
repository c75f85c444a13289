"""The driver's entry point to the data: :func:`build_data` turns a config into
:class:`DataInputs` (splits, small labeled pools, streaming Ray Datasets, steps per epoch), which
``multimix train`` hands to the Train workers.

The data layer, one job per module (DESIGN §3 says why this cut):

- :mod:`multimix.data.decode` (no Ray): stored PNG bytes → ``uint8`` arrays;
- :mod:`multimix.data.pools` (no Ray): the labeled pools in memory and their eval batches;
- :mod:`multimix.data.state`: the small actor holding each stream's augmentation pass;
- :mod:`multimix.data.readers`: the row-group reader, Parquet → Ray Dataset of views;
- :mod:`multimix.data.batches`: the worker's stream cursors and each epoch's batches;
- this module: the driver side (which datasets a variant needs, how many steps an epoch has).

Driver side (before ``TorchTrainer``)::

    data = build_data(cfg, check_inputs(cfg))  # multimix.preflight
    trainer = TorchTrainer(train_fn, datasets=data.datasets,
                           dataset_config=dataset_config(data.datasets), ...)

Each dataset is split across the Train workers by Ray Train (``streaming_split``,
``equal=True``); the worker side is in :mod:`multimix.data.batches`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from multimix.data import overlap
from multimix.data.dataset import open_dataset
from multimix.data.pools import LabeledPool, StreamedPool, decoded_mb, load_labeled_pool
from multimix.data.readers import (Source, configure_data_context, passes_per_execution,
                                   source_rows, stream_dataset)
from multimix.data.splits import store_split
from multimix.data.state import create_state
from multimix.errors import DataError
from multimix.variants import datasets_for, streams_for

__all__ = [
    "DataInputs",
    "build_data",
    "build_datasets",
    "check_skipped",
    "contamination_guard",
    "dataset_config",
    "execution_options",
    "load_pools",
    "skipped_counts",
    "steps_per_epoch",
    "stream_sources",
    "unlabeled_pools",
]


@dataclass
class DataInputs:
    """Everything the driver prepares for training (:func:`build_data`).

    ``splits``: ``{"cls": Split, "seg": Split}`` (the tasks the variant uses);
    ``classes``: class names of the classification set (label order), ``[]`` without one;
    ``pools``: ``{"cls_labeled", "seg_labeled"}`` → :class:`~multimix.data.pools.LabeledPool`
    and ``{"cls_val", "seg_val"}`` → :class:`~multimix.data.pools.StreamedPool` (those that
    exist; :func:`load_pools`);
    ``datasets``: ``{"unl_cls", "unl_seg"}`` → Ray Dataset (those the variant reads);
    ``state``: the pipeline's state actor; ``steps``: global steps per epoch;
    ``contamination``: the contamination guard's report (``<run dir>/contamination.json``,
    :func:`contamination_guard`).
    """

    splits: dict = field(default_factory=dict)
    classes: list = field(default_factory=list)
    pools: dict = field(default_factory=dict)
    datasets: dict = field(default_factory=dict)
    state: Any = None
    steps: int = 1
    contamination: dict = field(default_factory=dict)


def build_data(cfg, checked) -> DataInputs:
    """Driver-side work before the trainer starts, on the inputs the checks passed
    (``checked``: the :class:`~multimix.preflight.Preflight` of
    :func:`multimix.preflight.check_inputs`): load the small pools unless the checks did and
    check what they lost (:func:`check_skipped`), write the split files (only now: a run
    refused earlier writes nothing into its datasets), build the streams.

    Raises:
        DataError: see :func:`check_skipped`.
    """
    out = DataInputs(splits=dict(checked.splits), classes=list(checked.classes))
    if checked.pools is not None:
        out.pools = checked.pools
    else:
        out.pools = load_pools(cfg, out.splits)
        check_skipped(cfg, out.pools, out.splits)
    for task, split in out.splits.items():  # made by the checks; written only now
        store_split(getattr(cfg.data, f"{task}_data"), split, cfg.storage)
    excluded, out.contamination = contamination_guard(cfg, out.splits)
    out.state = create_state()
    out.datasets = build_datasets(cfg, out.splits, state=out.state, excluded=excluded)
    n_unl = 0
    if "weak" in streams_for(cfg.model.variant):  # the rows of one unweighted pass
        n_unl = sum(source_rows(src, open_dataset(src.uri, cfg.storage))
                    for src in stream_sources(cfg, out.splits, "unl_cls", excluded)[0])
    lab = out.splits.get("cls") or out.splits.get("seg")
    out.steps = steps_per_epoch(cfg, n_unl, cfg.scaling.num_workers, n_labeled=len(lab.labeled))
    return out


def skipped_counts(pools: Mapping[str, LabeledPool]) -> dict[str, int]:
    """``{"skipped_<pool>": rows}`` of the labeled and validation pools (rows that could not
    be decoded when they were loaded)."""
    return {f"skipped_{name}": int(pool.skipped) for name, pool in sorted(pools.items())}


def check_skipped(cfg, pools: Mapping[str, LabeledPool], splits: Mapping[str, Any]) -> None:
    """Refuse a run whose labeled or validation pools lost more than ``data.allow_skipped``
    undecodable rows each (the split asked for them); print one line when rows
    were lost within that allowance.

    Raises:
        DataError: one line naming the dataset, every pool over the limit (lost / asked), an
            example row and the key.
    """
    allow = int(cfg.data.allow_skipped)
    lost = []
    for name, pool in sorted(pools.items()):
        if pool.skipped:
            task, part = name.split("_", 1)
            asked = len(getattr(splits[task], "labeled" if part == "labeled" else "val"))
            lost.append((name, pool, asked, getattr(cfg.data, f"{task}_data")))
    over = [x for x in lost if x[1].skipped > allow]
    if over:
        uri = over[0][3]
        what = " and ".join(f"{p.skipped} of the {asked} rows of the {name} pool"
                            for name, p, asked, u in over if u == uri)
        ex = over[0][1].skipped_examples
        example = f"; e.g. {ex[0][0]}: {ex[0][1]}" if ex else ""
        most = max(p.skipped for _, p, _, _ in over)
        raise DataError(f"{uri}: {what} could not be decoded{example} (repair the dataset, or "
                        f"--set data.allow_skipped={most} to train without them)")
    if lost:
        print("[multimix] data.allow_skipped=" + str(allow) + ": training without "
              + ", ".join(f"{p.skipped} undecodable row(s) of the {name} pool ({asked} asked)"
                          for name, p, asked, _ in lost), flush=True)


def load_pools(cfg, splits: Mapping[str, Any]) -> dict:
    """The labeled training pools in memory (``<task>_labeled``:
    :class:`~multimix.data.pools.LabeledPool`) and the held-out validation pools streamed
    (``<task>_val``, when the split has any: :class:`~multimix.data.pools.StreamedPool`,
    scanned once here so their undecodable rows are counted).

    Raises:
        DataError: a labeled pool would decode to more than ``data.max_labeled_mb`` (checked
            before anything is decoded), or see :func:`~multimix.data.pools.load_labeled_pool`.
    """
    size, limit = cfg.data.image_size, float(cfg.data.max_labeled_mb)
    for task, uri in (("cls", cfg.data.cls_data), ("seg", cfg.data.seg_data)):
        if task in splits:
            n = len(splits[task].labeled)
            mb = decoded_mb(n, size, seg=task == "seg")
            if mb > limit:
                raise DataError(
                    f"the {task}_labeled pool of {uri}: {n} rows at {size}² decode to "
                    f"{mb:,.0f} MB > data.max_labeled_mb={limit:g}, held on the driver and every "
                    f"Train worker (lower data.{task}_labeled, or raise data.max_labeled_mb if "
                    "each worker has the memory)")
    pools: dict = {}
    for task, uri in (("cls", cfg.data.cls_data), ("seg", cfg.data.seg_data)):
        if task not in splits:
            continue
        pools[f"{task}_labeled"] = load_labeled_pool(uri, splits[task].labeled, cfg)
        if splits[task].val:
            pools[f"{task}_val"] = StreamedPool(uri, splits[task].val, cfg).scan()
    return pools


def stream_sources(cfg, splits: Mapping[str, Any], name: str,
                   excluded: Optional[Mapping[str, frozenset]] = None
                   ) -> tuple[list[Source], Optional[list[float]]]:
    """The pools stream ``name`` reads and their mixing weights (None: by rows).

    ``unl_cls``: the unlabeled part of ``data.cls_data``, then every ``data.unlabeled_data``
    pool (all rows), weighted by ``data.unlabeled_weights``. ``unl_seg``: by
    ``data.unlabeled_seg_from``: ``cls`` / ``seg`` (the unlabeled part of that task's
    dataset), ``extra`` (every extra pool, weighted by the extra pools' entries of
    ``data.unlabeled_weights``), ``cls+extra`` (the ``unl_cls`` mix) or one extra pool's URI.
    ``excluded``: ``{pool URI: ids}`` the contamination guard removed (:func:`unlabeled_pools`
    names the pools).

    Raises:
        DataError: a task split the stream needs is missing.
    """
    d, excluded = cfg.data, excluded or {}

    def part(task: str) -> Source:
        if splits.get(task) is None:
            raise DataError(f"no {task} split given (needed by this model variant)")
        uri = getattr(d, f"{task}_data")
        return Source(uri, frozenset(splits[task].unlabeled), excluded.get(uri, frozenset()))

    def extra(uris) -> list:
        return [Source(u, None, excluded.get(u, frozenset())) for u in uris]

    w = list(d.unlabeled_weights) if d.unlabeled_weights is not None else None
    frm = d.unlabeled_seg_from if name == "unl_seg" else "cls+extra"
    if frm == "cls+extra":
        return [part("cls"), *extra(d.unlabeled_data)], w
    if frm in ("cls", "seg"):
        return [part(frm)], None
    if frm == "extra":
        return extra(d.unlabeled_data), (w[1:] if w is not None and sum(w[1:]) > 0 else None)
    return extra([frm]), None


def unlabeled_pools(cfg, splits: Mapping[str, Any]) -> list[Source]:
    """Every pool the variant's streams read, once each (by URI, before the guard)."""
    out: dict = {}
    for name in datasets_for(cfg.model.variant):
        for src in stream_sources(cfg, splits, name)[0]:
            out.setdefault(src.uri, src)
    return list(out.values())


def contamination_guard(cfg, splits: Mapping[str, Any]) -> tuple[dict, dict]:
    """The contamination guard (``data.contamination_guard``; DESIGN §3b): the rows of every
    unlabeled pool the run reads that are copies (same sha256, or phash within
    ``data.near_threshold`` bits) of a labeled or validation image of ``data.cls_data`` /
    ``data.seg_data`` or of any ``data.eval_data`` image. Reads only the id/hash/phash columns
    (:func:`multimix.data.overlap.iter_hashes`; a pool in chunks of whole shards, so the
    driver's memory does not grow with it), on the driver; prints one line.

    Returns:
        ``({pool URI: frozenset of excluded ids}, report)`` (``report``: the run's
        ``contamination.json``, :func:`multimix.data.overlap.guard_pools`; ``{"enabled":
        False}`` with the guard off).
    """
    if not cfg.data.contamination_guard:
        return {}, {"enabled": False}
    sources = unlabeled_pools(cfg, splits)
    if not sources:  # a variant without unlabeled streams: nothing to guard
        return {}, {"enabled": True, "pools": [], "removed": {"exact": 0, "near": 0}}

    def hashes(uri: str, ids=None, name=None, chunk_rows=None):
        return overlap.iter_hashes(uri, cfg.storage, name=name or uri, ids=ids,
                                   chunk_rows=chunk_rows)

    protected = []  # in memory: the labeled + validation ids, the evaluation sets
    for task, split in sorted(splits.items()):
        uri, name = getattr(cfg.data, f"{task}_data"), f"{{}} ({task} labeled + validation)"
        protected.append(overlap.concat(name.format(uri), list(hashes(
            uri, [*split.labeled, *split.val], name.format(uri)))))
    protected += [overlap.concat(u, list(hashes(u))) for u in cfg.data.eval_data]
    # the pools: read in chunks of whole shards (the driver never holds a large pool's hashes)
    pools = [(src.uri, hashes(src.uri, sorted(src.ids) if src.ids is not None else None,
                              chunk_rows=overlap.GUARD_CHUNK_ROWS))
             for src in sources]
    threshold = cfg.data.near_threshold
    res = overlap.guard_pools(protected, pools, overlap.NEAR_THRESHOLD if threshold is None
                              else threshold)
    print(f"[multimix] {res.line}", flush=True)
    return res.excluded, res.report


def build_datasets(cfg, splits: Mapping[str, Any], state=None,
                   excluded: Optional[Mapping[str, frozenset]] = None,
                   debug: bool = False) -> dict:
    """The streaming datasets the variant reads (:func:`multimix.variants.datasets_for`).

    Args:
        splits: ``{"cls": Split, "seg": Split}`` (objects with ``labeled``, ``val`` and
            ``unlabeled`` id lists; a task the variant does not use may be missing).
        state: :func:`multimix.data.state.create_state` handle (strongly recommended).
        excluded: ``{pool URI: ids}`` left out (the contamination guard's,
            :func:`contamination_guard`).
        debug: add the ``id`` and ``source`` columns (index into :func:`stream_sources`).

    Returns ``{"unl_cls": Dataset, "unl_seg": Dataset}``: ``unl_cls`` yields
    ``weak_img``/``strong_img`` from the unlabeled classification images and every
    ``data.unlabeled_data`` pool, mixed by ``data.unlabeled_weights``; ``unl_seg`` yields
    ``useg_img`` drawn from the pools ``data.unlabeled_seg_from`` names
    (:func:`stream_sources`). One execution spans
    :func:`~multimix.data.readers.passes_per_execution` passes.
    """
    configure_data_context()
    passes = passes_per_execution(cfg)
    out: dict = {}
    for name in datasets_for(cfg.model.variant):
        sources, weights = stream_sources(cfg, splits, name, excluded)
        augment = True if name == "unl_cls" else cfg.augment.seg_augment
        out[name] = stream_dataset(sources, None, cfg, stream=name, state=state, passes=passes,
                                   augment=augment, weights=weights, debug=debug)
    return out


def dataset_config(datasets: Mapping[str, Any], cfg=None):
    """``ray.train.DataConfig`` that splits every streaming dataset across the Train workers;
    with ``cfg``, each dataset's execution may hold at most ``data.readahead_mb`` of rendered
    blocks in the object store (:func:`execution_options`)."""
    import ray.train

    opts = execution_options(cfg) if cfg is not None else None
    return ray.train.DataConfig(datasets_to_split=list(datasets),
                                execution_options=({name: opts for name in datasets}
                                                   if opts is not None else None))


def execution_options(cfg):
    """Ray Data ``ExecutionOptions`` of one streaming dataset: what Train's default ingest
    options carry over from the driver's ``DataContext``, with ``resource_limits.object_store_memory = data.readahead_mb`` (None when that is null:
    Ray's default budget). Ray Data reads ahead until its object-store budget is full, so
    without a cap the rows decoded ahead grow with the pool up to a fraction of the object
    store (measured: 831–991 MB for a 200,000-row 64² pool against 85 MB for 5,000 rows, and
    fewer steps/s on 2 cores: the data tasks took the CPU)."""
    if cfg.data.readahead_mb is None:
        return None
    from ray.data import DataContext, ExecutionOptions, ExecutionResources

    ctx = DataContext.get_current().execution_options  # what Train would carry over
    return ExecutionOptions(
        resource_limits=ctx.resource_limits.copy(
            object_store_memory=float(cfg.data.readahead_mb) * (1 << 20)),
        preserve_order=ctx.preserve_order, verbose_progress=ctx.verbose_progress)


def steps_per_epoch(cfg, n_unlabeled: int, world_size: int, n_labeled: int = 0) -> int:
    """Global optimizer steps per epoch: ``optim.steps_per_epoch``, else the unlabeled pool //
    (unlabeled_batch × workers) (labeled pool // (cls_batch × workers) for variants without
    one)."""
    if cfg.optim.steps_per_epoch:
        return int(cfg.optim.steps_per_epoch)
    if n_unlabeled:
        return max(1, n_unlabeled // (cfg.data.unlabeled_batch * world_size))
    return max(1, n_labeled // (max(cfg.data.cls_batch, 1) * world_size))
