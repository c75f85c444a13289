"""The one reader of the unlabeled pools: prepared Parquet shards → a Ray Dataset of decoded,
augmented ``uint8`` views (runs in Ray Data tasks).

:func:`stream_dataset` builds one stream's dataset (``unl_cls``: the weak and the strong view of
each image; ``unl_seg``: the unlabeled segmentation image); what the map tasks need travels as
one :class:`StreamSpec`. How it reads (DESIGN §3 has the measurements behind each choice):

- ``ray.data.from_items`` items ``(pass k, slot)`` → one generator ``map_batches`` per item:
  the task reads the row groups of its slot (a seeded permutation of all row groups, new every
  pass, cut into runs of ~:data:`TASK_ROWS` rows), shuffles their rows together, decodes the
  PNGs in place (:func:`multimix.data.decode.binary_cells`) and renders the views, yielding
  blocks of :func:`block_rows` rows. Footers are read once, on the driver
  (:func:`multimix.data.verify.open_dataset`, which checks the shards against the manifest
  with them); nothing is listed again per pass.
- one execution spans ``passes`` passes (the run's epochs, :func:`passes_per_execution`), so
  Ray Data's per-execution start-up is paid once per run; pass ``k`` of an execution renders
  augmentation pass ``base + k``, ``base`` being the state actor's value for the stream when
  the task starts (:mod:`multimix.data.state`). Augmentation parameters are a pure function of
  ``(seed, pass, stream, row id)`` (:func:`multimix.data.augment.row_keys`).
- each dataset is built with Ray Data's target block size at 3/4 of one yielded block
  (:func:`block_target`), so every yield leaves its task whole as soon as it is rendered.
- undecodable rows are dropped in the task, logged and counted on the state actor.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from multimix.data.augment import Augmenter, row_keys
from multimix.data.decode import binary_cells, decode_rows
from multimix.data.state import current_pass
from multimix.data.verify import open_dataset
from multimix.errors import DataError
from multimix.variants import DATASETS

logger = logging.getLogger(__name__)

__all__ = [
    "TASK_ROWS",
    "StreamSpec",
    "block_bytes",
    "block_rows",
    "block_target",
    "configure_data_context",
    "passes_per_execution",
    "stream_dataset",
]

#: rows one pipeline task reads, decodes and augments (several row groups)
TASK_ROWS = 1024

#: most passes over a pool in one execution, and most task items
MAX_PASSES = 500
_MAX_ITEMS = 4096


@dataclass(frozen=True)
class StreamSpec:
    """What the map tasks of one stream need (picklable; one object, not a kwargs bag).

    ``stream``: the dataset name (``unl_cls`` / ``unl_seg``, :data:`multimix.variants.DATASETS`),
    which also seeds the augmentation; ``size``: image side; ``seed``: ``optim.seed``;
    ``augmenter``: renders the views (``pair`` for ``unl_cls``, ``weak`` for ``unl_seg``);
    ``augment``: False leaves ``unl_seg`` images as decoded; ``rows``: rows per yielded block;
    ``state``: the state actor (None: base pass ``epoch``, skipped rows only logged);
    ``debug``: add an ``id`` column.
    """

    stream: str
    size: int
    seed: int
    augmenter: Any
    augment: bool = True
    rows: int = 256
    state: Any = None
    epoch: int = 0
    debug: bool = False


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


def block_rows(size: int) -> int:
    """Rows per block a task yields: ~16 MB of pixels per view (256 rows at 256²), so blocks
    are few (little per-block overhead) but a task still streams several of them."""
    return max(16, min(1024, (16 << 20) // max(1, size * size)))


def block_bytes(size: int) -> int:
    """Pixel bytes of one view of one block a task yields (:func:`block_rows` rows of
    ``size``² ``uint8``)."""
    return block_rows(size) * size * size


def block_target(size: int, stream: str) -> int:
    """Ray Data's ``target_max_block_size`` for ``stream``: 3/4 of one yielded block (all its
    views).

    Ray Data's output buffer merges a task's yields until they pass the target (128 MiB by
    default), which held every augmented block back until its task ended; blocks of 1.5
    targets or more it slices, and the slices left over are copied into the next block.
    At 3/4 each yield leaves the task whole as soon as it is rendered."""
    return max(1 << 20, block_bytes(size) * len(DATASETS[stream]) * 3 // 4)


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


def passes_per_execution(cfg) -> int:
    """Passes over an unlabeled pool in one Ray Data execution: ``optim.epochs`` (each epoch
    is about one pass: one execution serves the run), at most :data:`MAX_PASSES` (and at most
    4,096 task items)."""
    return max(1, min(int(cfg.optim.epochs), MAX_PASSES))


def stream_dataset(uri: str, ids: Optional[Sequence[str]], cfg, *, stream: str,
                   augment: bool = True, state=None, epoch: int = 0, debug: bool = False,
                   rows: Optional[int] = None, passes: int = 1,
                   augmenter: Optional[Augmenter] = None):
    """A Ray Dataset of the decoded, augmented rows ``ids`` of ``uri`` (all rows: None).

    Args:
        stream: ``"unl_cls"`` → columns ``weak_img``, ``strong_img`` (weak and strong view of
            the same image); ``"unl_seg"`` → ``useg_img`` (weak view when ``augment``). All
            ``uint8 (N, H, W)``; plus ``id`` with ``debug``.
        state: :func:`multimix.data.state.create_state` handle (augmentation pass, skipped
            counts) or None (base pass = ``epoch``; skipped rows only logged).
        rows: rows per yielded block (default :func:`block_rows`).
        passes: passes over the pool in one execution: pass ``k`` renders augmentation pass
            ``base + k`` (see :func:`passes_per_execution`).
        augmenter: what renders the views in the map tasks (default
            ``Augmenter.from_config(cfg.augment, image_size)``); any picklable object with the
            same ``pair`` / ``weak`` methods (``multimix bench data`` passes one that renders
            nothing, to measure the pipeline's own cost).
    """
    if stream not in DATASETS:
        raise ValueError(f"unknown stream dataset {stream!r} (one of {', '.join(DATASETS)})")
    size = cfg.data.image_size
    spec = StreamSpec(stream=stream, size=size, seed=int(cfg.optim.seed),
                      augmenter=augmenter or Augmenter.from_config(cfg.augment, size),
                      augment=augment, rows=rows or block_rows(size), state=state,
                      epoch=epoch, debug=debug)
    data = open_dataset(uri, cfg.storage)  # shards checked against the manifest
    with _block_size(block_target(size, stream)):
        return _row_group_dataset(uri, data, cfg, spec,
                                  frozenset(ids) if ids is not None else None, passes)


def _row_group_dataset(uri: str, data, cfg, spec: StreamSpec,
                       keep: Optional[frozenset], passes: int):
    """``from_items`` slots → a generator ``map_batches`` that reads row groups with pyarrow,
    picked by a seeded per-pass permutation (see the module docstring): ``passes``
    consecutive passes make one execution, the items being ``(pass k, slot)`` in pass order.
    ``data``: the :class:`~multimix.data.verify.VerifiedDataset` (its footers give the row
    groups)."""
    import ray.data

    fs, groups = data.fs, data.row_groups()
    if not groups:
        raise DataError(f"{uri}: the Parquet shards hold no rows")
    rows = sum(g[2] for g in groups)
    # Few, large tasks: one per ~TASK_ROWS rows (at least min(row groups, 4) so the CPUs stay
    # busy), each reading several row groups that a seeded per-pass permutation scatters over
    # the dataset, and shuffling their rows together.
    n = len(groups)
    n_tasks = min(n, _MAX_ITEMS, max(min(n, 4), -(-int(rows) // TASK_ROWS)))
    per_task = -(-n // n_tasks)
    n_tasks = -(-n // per_task)
    fn = partial(_read_map_fn, fs=fs, groups=tuple(groups), per_task=per_task, keep=keep,
                 spec=spec)
    passes = max(1, min(int(passes), MAX_PASSES, _MAX_ITEMS // n_tasks))
    items = [{"pass": p, "slot": k} for p in range(passes) for k in range(n_tasks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    kwargs: dict = {"num_cpus": cfg.scaling.data_cpus_per_task}
    if cfg.scaling.data_concurrency is not None:
        kwargs["compute"] = ray.data.TaskPoolStrategy(size=int(cfg.scaling.data_concurrency))
    return ds.map_batches(fn, batch_size=1, batch_format="numpy", zero_copy_batch=True,
                          **kwargs)


def task_groups(slot: int, n_groups: int, per_task: int, seed: int, pass_no: int,
                stream: str) -> list:
    """Row groups of task ``slot`` in pass ``pass_no``: a seeded permutation of all row groups,
    new every pass, cut into consecutive runs of ``per_task``."""
    perm = np.random.default_rng([seed, pass_no, zlib.crc32(stream.encode()), 7]
                                 ).permutation(n_groups)
    return sorted(int(g) for g in perm[slot * per_task:(slot + 1) * per_task])


def _read_map_fn(items, *, fs, groups, per_task, keep: Optional[frozenset], spec: StreamSpec):
    """Read a task's row groups, shuffle their rows together and yield decoded/augmented
    blocks of ``spec.rows`` rows (generator UDF)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from multimix.data.allocator import keep_freed_memory

    keep_freed_memory()  # once per worker process: reuse freed block memory (see allocator.py)
    # once per task: a task belongs to one execution
    base = current_pass(spec.state, spec.stream, spec.epoch)
    for k, slot in zip(np.asarray(items["pass"]).tolist(), np.asarray(items["slot"]).tolist()):
        pass_no = base + int(k)
        tables = []
        for g in task_groups(int(slot), len(groups), per_task, spec.seed, pass_no, spec.stream):
            path, group, _ = groups[g]
            with fs.open_input_file(path) as f:
                t = pq.ParquetFile(f).read_row_group(group, columns=["id", "image"])
            if keep is not None:
                ids = t.column("id").to_pylist()
                sel = [i for i, v in enumerate(ids) if v in keep]
                if len(sel) != len(ids):
                    t = t.take(pa.array(sel, pa.int64()))
            if t.num_rows:
                tables.append(t)
        if not tables:
            continue
        # shards may differ in nullability only (verify checks names and types)
        table = pa.concat_tables(tables, promote_options="default")
        order = np.random.default_rng([spec.seed, pass_no, int(slot), 11]
                                      ).permutation(table.num_rows).tolist()
        yield from _render_rows(table, order, spec, pass_no)


def _render_rows(table, order: list, spec: StreamSpec, pass_no: int):
    """Rows ``order`` (indices into the ``pyarrow.Table`` ``table``) → decoded, augmented
    blocks of ``spec.rows`` rows; the PNGs are read in place (:func:`binary_cells`)."""
    ids = table.column("id").to_pylist()
    cells = binary_cells(table.column("image"))
    for s in range(0, len(order), spec.rows):
        idx = order[s:s + spec.rows]
        yield render(spec, {"id": [ids[i] for i in idx], "image": [cells[i] for i in idx]},
                     pass_no)


def render(spec: StreamSpec, batch: Mapping[str, Any], pass_no: int) -> dict:
    """One block of rows (``{"id": [...], "image": [PNG bytes, ...]}``) → the stream's views
    for augmentation pass ``pass_no`` (``{view: uint8 (N, H, W)}``, + ``id`` with ``debug``).
    Undecodable rows are dropped, logged and counted on the state actor."""
    ids, arrays, skipped = decode_rows(batch, spec.size, ("image",))
    if skipped:
        logger.warning("multimix pipeline: skipped %d undecodable row(s) in stream %s, e.g. %s",
                       len(skipped), spec.stream, skipped[:3])
        if spec.state is not None:
            spec.state.add_skipped.remote(spec.stream, len(skipped), skipped[:10])
    keys = row_keys(ids, spec.seed, pass_no, spec.stream)
    img = arrays["image"]
    if spec.stream == "unl_cls":
        weak, strong = spec.augmenter.pair(img, keys)
        out = {"weak_img": weak, "strong_img": strong}
    else:
        out = {"useg_img": spec.augmenter.weak(img, keys) if spec.augment else img}
    if spec.debug:
        out["id"] = np.array(ids, dtype=object)
    return out
